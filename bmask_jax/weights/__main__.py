"""The command, python -m bmask_jax.weights: its usage (--help) is the package's docstring."""
from __future__ import annotations

import os

from bmask_jax import errors, weights
from bmask_jax.weights.importer import config_flags_for, import_weights
from bmask_jax.weights.layouts import KINDS

__doc__ = weights.__doc__   # absl's --help prints the __main__ module's docstring


def _define_flags():
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "Config file, optionally with a variant: file.py:variant.",
                                    lock_config=True)
    flags.DEFINE_string("source", None, "Weight file: detectron2 .pth/.pkl, MSRA R-50.pkl, torchvision .pth, HRNet ImageNet .pth.")
    flags.DEFINE_string("output", None, "Directory to write the Orbax checkpoint to (a --workdir).")
    flags.DEFINE_enum("kind", "auto", ("auto",) + KINDS, "What the weight file is.")
    flags.DEFINE_bool("apply_config_changes", True,
                      "Apply the pixel format/normalisation/stride/norm the weights imply.")
    flags.mark_flags_as_required(["config", "source", "output"])


def main(argv):
    del argv
    from absl import flags
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    f = flags.FLAGS
    with errors.boundary():
        report, differ = import_weights(f.config, f.source, f.output, f.kind, f.apply_config_changes)
    print(report)
    print(f"wrote a step-0 checkpoint to {os.path.join(f.output, 'checkpoints')}")
    if not differ:
        print("the config already matches what the weights imply")
        return
    print(("changed the config for these weights: " if f.apply_config_changes else
           "WARNING: the config differs from what the weights imply: ")
          + "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in differ.items()))
    if f.apply_config_changes:
        print(f"recorded in {os.path.join(f.output, 'weights_import.json')}: train, evaluate, predict or export "
              f"--workdir {f.output} with the same config and they are applied (the flags: "
              + config_flags_for({k: new for k, (_, new) in differ.items()}) + ")")


if __name__ == "__main__":
    import sys

    from absl import app
    sys.argv = errors.take_verbose_flag(sys.argv)
    _define_flags()
    app.run(main)
