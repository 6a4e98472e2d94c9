"""bmask-jax: BMask R-CNN's commands (also `python -m bmask_jax COMMAND`).

    bmask-jax train          --config configs/bmask_rcnn.py:shapes --workdir runs/shapes_bmask
    bmask-jax evaluate       --config ... --workdir ...
    bmask-jax predict        --config ... --workdir ... --config.predict.inputs=photos/
    bmask-jax export         --config ... --workdir ... --output exported/shapes_bmask
    bmask-jax demo           --config ... --workdir ...         # a page to try the model in a browser
    bmask-jax zoo                                              # the pretrained models
    bmask-jax summary        --config configs/bmask_rcnn.py:r50_fpn_1x   # parameters, FLOPs, memory
    bmask-jax import-weights --config ... --source model_final.pkl --output runs/imported

train, evaluate and predict are `python -m bmask_jax.main --mode COMMAND` (any --config.*
override works as there); `bmask-jax COMMAND --help` lists a command's flags. An error that is
yours to fix (a file, URL or key) is one line; `--verbose` (or BMASK_JAX_VERBOSE=1) adds its
traceback.
"""
from __future__ import annotations

import runpy
import sys

# command -> (module run as __main__, arguments put first)
COMMANDS = {
    "train": ("bmask_jax.main", ["--mode=train"]),
    "evaluate": ("bmask_jax.main", ["--mode=evaluate"]),
    "predict": ("bmask_jax.main", ["--mode=predict"]),
    "export": ("bmask_jax.inference.export", []),
    "demo": ("bmask_jax.inference.demo", []),
    "zoo": ("bmask_jax.weights.model_zoo", []),
    "summary": ("bmask_jax.engine.summary", []),
    "import-weights": ("bmask_jax.weights", []),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        sys.exit(0 if argv else 2)
    from bmask_jax import errors
    command, rest = argv[0], errors.take_verbose_flag(argv[1:])
    if command not in COMMANDS:
        sys.exit(f"bmask-jax: no command {command!r}; the commands: {', '.join(COMMANDS)} (bmask-jax --help)")
    module, first = COMMANDS[command]
    if first and any(a == "--mode" or a.startswith("--mode=") for a in rest):
        sys.exit(f"bmask-jax {command}: --mode is the command itself; drop it")
    sys.argv = [f"bmask-jax {command}", *first, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
