"""`model.weights`, as detectron2's MODEL.WEIGHTS: where a run's parameters come from when its
workdir has no checkpoint, and the config values those weights imply.

One place for every mode: training (applied once, before step 0; a resumed run ignores it and
says so), `--mode evaluate`, `--mode predict`, the Predictor and export (applied when the workdir
has no checkpoint, so a zoo model evaluates or predicts without a training step).

The weights fix the input format, pixel mean/std, stride placement and norm (MSRA: BGR, std 1,
stride in the 1x1 conv; torchvision: RGB, ImageNet mean/std; detectron2 models: what they
store). Those values are applied to the config, logged, and recorded in
WORKDIR/weights_import.json, which later runs on that workdir (resume, evaluate, predict, export)
apply in turn. A value set on the command line (`--config.model.input_format=RGB`) that
contradicts them is an error naming both.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

from bmask_jax.weights import download, model_zoo
from bmask_jax.weights.convert import detect_kind, implied_config_changes
from bmask_jax.weights.errors import DamagedWeightsError, UnsafeCheckpointError
from bmask_jax.weights.importer import apply_config_changes
from bmask_jax.weights.safe_pickle import read_checkpoint

RECORD = "weights_import.json"


class WeightsConflictError(ValueError):
    """A command-line config value contradicts what the weights imply."""


def user_errors() -> tuple[type[Exception], ...]:
    """The errors of model.weights that are the user's to fix, each one line that names the
    flag, file or URL: commands print them without a traceback."""
    from bmask_jax.weights.download import DownloadError
    from bmask_jax.weights.errors import UnsafeCheckpointError, WeightImportError
    return (WeightsConflictError, DownloadError, model_zoo.WeightsNotFoundError, WeightImportError,
            UnsafeCheckpointError)


@dataclasses.dataclass
class Weights:
    """A model.weights value, resolved: the file, its arrays and its kind (the config it
    implies is applied by resolve; the ImportReport of the load carries it too)."""
    spec: str
    path: str
    kind: str
    checkpoint: dict


def checkpoint_step(workdir: str | None) -> int | None:
    """The newest step under workdir/checkpoints, or None (no workdir, or no checkpoint)."""
    if not workdir:
        return None
    folder = os.path.join(workdir, "checkpoints")
    steps = [int(n) for n in os.listdir(folder) if n.isdigit()] if os.path.isdir(folder) else []
    return max(steps) if steps else None


def _same(a, b) -> bool:
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        try:
            return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
        except TypeError:
            return False
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b)))
    return a == b


def check_overrides(changes: dict[str, Any], overrides: dict[str, Any] | None, source: str) -> None:
    """Raise WeightsConflictError if a command-line value contradicts what the weights imply."""
    conflicts = [f"--config.{k}={overrides[k]!r} contradicts {source}, which needs {k}={v!r}"
                 for k, v in changes.items() if overrides and k in overrides and not _same(overrides[k], v)]
    if conflicts:
        raise WeightsConflictError("; ".join(conflicts) + " (drop the flag, or use other weights)")


def recorded_config(config, workdir: str | None, overrides: dict[str, Any] | None = None):
    """config with the values recorded in workdir/weights_import.json applied (by a weight import
    or a model.weights run), each change logged; a copy. Command-line values must agree."""
    config = config.copy_and_resolve_references()
    path = os.path.join(workdir, RECORD) if workdir else None
    if path is None or not os.path.exists(path):
        return config
    with open(path) as f:
        record = json.load(f)
    if not record.get("config_changes_applied", True):
        return config
    # Older records of `python -m bmask_jax.weights` hold only the values that differed.
    wanted = record.get("config_changes") or {k: new for k, (_, new) in record.get("config_differences", {}).items()}
    wanted = {k: tuple(v) if isinstance(v, list) else v for k, v in wanted.items()}
    check_overrides(wanted, overrides, f"the weights recorded in {path}")
    _log_changes(apply_config_changes(config, wanted), path)
    return config


def _log_changes(changed: dict, source: str) -> None:
    if changed:
        logging.warning("config values set for the weights of %s: %s", source,
                        "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items()))


def resolve(config, workdir: str | None = None, overrides: dict[str, Any] | None = None,
            progress: bool = True):
    """(config for this run, Weights to load or None). With a checkpoint in workdir: the config
    its weights record implies, and None (model.weights is not applied, and the log says so).
    Otherwise model.weights is fetched (zoo name, URL, file), read, and the config values it
    implies are applied (a copy; logged); "" gives (config, None). overrides: the command line's
    --config.* values, checked against the implied ones."""
    spec = config.model.weights
    step = checkpoint_step(workdir)
    if step is not None or not spec:
        # The parameters come from the workdir (or from nowhere yet): so does their config.
        config = recorded_config(config, workdir, overrides)
        if step is not None and spec:
            logging.warning("%s holds a checkpoint (step %d): starting from it; model.weights=%s is not applied",
                            os.path.join(workdir, "checkpoints"), step, spec)
        return config, None
    config = config.copy_and_resolve_references()
    path, checkpoint = read_weights(spec, progress)
    kind = detect_kind(checkpoint, path)
    changes, _ = implied_config_changes(kind, checkpoint)
    check_overrides(changes, overrides, f"model.weights={spec} ({kind} weights)")
    _log_changes(apply_config_changes(config, changes), f"model.weights={spec} ({kind})")
    return config, Weights(spec, path, kind, checkpoint)


def read_weights(spec: str, progress: bool = True) -> tuple[str, dict]:
    """(local path, arrays) of a model.weights value. A downloaded file that cannot be read (cut
    short, damaged) or is refused (unsafe) is set aside and downloaded once more; a second
    failure is the error. A download that nothing else vouched for is confirmed by this read."""
    for attempt in range(2):
        path = model_zoo.weights_file(spec, progress=progress)
        try:
            checkpoint = read_checkpoint(path)
        except (DamagedWeightsError, UnsafeCheckpointError) as e:
            if not download.is_downloaded(path):
                raise                                    # the user's own file: theirs to replace
            download.set_aside(path, str(e).removeprefix(f"{path}: "), again=attempt == 0)
            if attempt == 1:
                raise
            continue
        download.confirm(path)
        return path, checkpoint
    raise AssertionError("unreachable")


def load_into_state(state, weights: Weights):
    """The weights in a TrainState's params and frozen collection (layers they do not cover keep
    the state's values); returns (state, ImportReport)."""
    from bmask_jax.weights.importer import load_into_state as load
    state, report = load(state, weights.path, weights.kind, weights.checkpoint)
    _log_report(weights, report)
    return state, report


def _log_report(weights: Weights, report) -> None:
    logging.warning("model.weights=%s: %s", weights.spec, str(report).replace("\n", "; "))


def write_record(workdir: str, weights: Weights, report) -> None:
    """workdir/weights_import.json: what was loaded and the config values it implies."""
    os.makedirs(workdir, exist_ok=True)
    record = dict(report.to_dict(), weights=weights.spec, path=weights.path, config_changes_applied=True)
    tmp = os.path.join(workdir, RECORD + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2, default=str)
    os.replace(tmp, os.path.join(workdir, RECORD))


def inference_variables(config, workdir: str | None = None, overrides: dict[str, Any] | None = None):
    """(config, {"params", "frozen"}) for evaluate, predict, the Predictor and export: workdir's
    newest checkpoint with its recorded config, else model.weights (recorded in workdir, if
    given). Raises FileNotFoundError when there is neither. Variables only: no optimizer, no
    train state."""
    from bmask_jax.engine.variables import restore_variables
    from bmask_jax.weights.importer import imported_variables
    config, weights = resolve(config, workdir, overrides)
    if weights is None:
        if checkpoint_step(workdir) is None:
            where = os.path.join(workdir, "checkpoints") if workdir else "no workdir"
            raise FileNotFoundError(f"no checkpoint ({where}) and no model.weights: train first (--mode train), "
                                    "point --workdir at a trained run, or set --config.model.weights "
                                    "(bmask-jax zoo lists pretrained models)")
        return config, restore_variables(config, workdir)
    variables, report = imported_variables(config, weights.checkpoint, weights.kind, weights.path)
    _log_report(weights, report)
    if workdir:
        write_record(workdir, weights, report)
    return config, variables
