"""Entry point: python -m bmask_jax.main --config configs/bmask_rcnn.py:shapes --workdir DIR
[--mode train|evaluate|predict] [--config.train.max_iter=...]."""
from __future__ import annotations

import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from bmask_jax import errors

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, optionally with a variant: file.py:variant.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and pictures.")
flags.DEFINE_enum("mode", "train", ["train", "evaluate", "predict"],
                  "train (then evaluate), evaluate the latest checkpoint, or predict on images.")
flags.DEFINE_string("coordinator", "", "host:port of process 0 for multi-host runs (jax.distributed).")
flags.DEFINE_integer("num_processes", 0, "Number of processes in a multi-host run.")
flags.DEFINE_integer("process_id", -1, "This process's index in a multi-host run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    # Our own progress goes to the progress bar and stdout; libraries (orbax) log at INFO.
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    # Compiled programs are cached across runs (tests, resume, evaluate after train).
    import jax
    jax.config.update("jax_compilation_cache_dir",
                      os.environ.get("BMASK_JAX_CACHE", os.path.expanduser("~/.cache/bmask_jax/xla")))
    from bmask_jax.engine import sharding
    sharding.initialize_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    config = FLAGS.config
    # What the command line set: model.weights may not contradict it (pretrained.py).
    overrides = config_flags.get_override_values(FLAGS["config"])
    with errors.boundary():        # names the flag, file or URL; the traceback would bury it
        failures, out_dir = run_mode(FLAGS.mode, config, FLAGS.workdir, overrides)
    if failures:
        # Listed last, where they are seen; the exit status tells scripts.
        from bmask_jax.inference.predict import FAILURES_FILE
        sys.exit(f"could not read {len(failures)} image(s), skipped (also in "
                 f"{os.path.join(out_dir, FAILURES_FILE)}):\n"
                 + "\n".join(f"  {f['error']}" for f in failures))      # the error names the file


def run_mode(mode: str, config, workdir: str, overrides: dict) -> tuple[list, str | None]:
    """Train, evaluate or predict; returns predict's failures and output folder."""
    if mode == "train":
        from bmask_jax.train import train_and_evaluate
        train_and_evaluate(config, workdir, overrides)
    elif mode == "evaluate":
        from bmask_jax.evaluation.evaluate import evaluate
        from bmask_jax.weights.pretrained import inference_variables
        errors.writable_folder(workdir, "--workdir")    # its metrics and pictures go there, at the end
        config, variables = inference_variables(config, workdir, overrides)
        evaluate(config, workdir, variables)
    else:
        from bmask_jax.inference.predict import predict
        out_dir = config.predict.output_dir or os.path.join(workdir, "predictions")
        path, failures = predict(config, workdir, out_dir, overrides=overrides)
        if path:
            print(f"wrote pictures and {path}")
        return failures, out_dir
    return [], None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with one-line errors: a --config.* value of the wrong type (absl's own
    message), or an override naming a key the config does not have (ml_collections raises a
    bare KeyError from deep inside; we name the flag and pass on its "did you mean"), and a
    --config file that does not exist (ml_collections would fail later, deep in the run)."""
    check_config_file(argv)
    try:
        rest = FLAGS(argv)
        FLAGS.config             # loads the file now: its errors are one line here, not a traceback later
        return rest
    except flags.Error as e:
        message = str(e)
        if "Error whilst parsing config file" in message and "Traceback" in message:
            # ml_collections puts the config file's traceback in the message: keep its last line.
            message = message.split("\n", 1)[0].rstrip(": ") + ": " + message.strip().splitlines()[-1]
        sys.exit(f"FATAL Flags parsing error: {message}\nPass --helpshort or --helpfull to see help on flags.")
    except (KeyError, AttributeError) as e:
        message = e
        while isinstance(message, BaseException):
            message = message.args[0] if message.args else ""
        message = str(message)
        found = re.search(r"'(\w+)'", message)
        missing = found.group(1) if found else message
        hint = message.split("\n", 1)[1] if "\n" in message else ""
        culprit = next((a for a in argv if a.startswith("--config.")
                        and missing in a.split("=")[0].split(".")), "a --config.* override")
        sys.exit(f"FATAL Flags parsing error: {culprit}: the config has no key {missing!r}. {hint}".rstrip())
    except Exception as e:  # noqa: BLE001 - the config file's own error (an unknown variant, a bug in it)
        root = e
        while root.__cause__ is not None or root.__context__ is not None:
            root = root.__cause__ or root.__context__
        sys.exit(f"FATAL --config: {type(root).__name__}: {str(root).strip().splitlines()[-1]}")


def check_config_file(argv: list[str]) -> None:
    """Exit with one line if --config names a file that does not exist."""
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else (
            arg.split("=", 1)[1] if arg.startswith("--config=") else None)
        if value is None:
            continue
        path = value.split(":", 1)[0]
        if not os.path.isfile(path):
            sys.exit(f"FATAL --config {value}: no config file {os.path.abspath(path)}")


if __name__ == "__main__":
    sys.argv = errors.take_verbose_flag(sys.argv)
    app.run(main, flags_parser=parse_flags)
