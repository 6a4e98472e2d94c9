"""Names from before the package was split into folders (bmask_jax.predictor, python -m
bmask_jax.demo, ...). Each still answers, with one line giving its new name: importing one
raises ImportError, running one (`python -m`) exits with status 1. Standard library only, as
bmask_jax/__init__.py installs it for every import of the package (serving included)."""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

# The modules that moved, by the folder they went to.
MOVED = {f"bmask_jax.{name}": f"bmask_jax.{folder}.{name}" for folder, names in {
    "inference": ("predictor", "predict", "export", "serving", "video", "demo"),
    "evaluation": ("evaluate", "coco_eval", "cityscapes_eval", "visualize"),
    "weights": ("pretrained", "model_zoo", "download"),
    "engine": ("state", "optim", "sharding", "checkpoints", "jit_cache", "events", "summary"),
    "models": ("losses",),
    "ops": ("postprocess",),
}.items() for name in names}

# The old commands, and the command each is now.
COMMANDS = {"bmask_jax.demo": "bmask-jax demo", "bmask_jax.export": "bmask-jax export",
            "bmask_jax.model_zoo": "bmask-jax zoo", "bmask_jax.summary": "bmask-jax summary"}


def message(old: str) -> str:
    new = MOVED[old]
    if old in COMMANDS:
        return f"python -m {old} is now `{COMMANDS[old]}` (or python -m {new}); the flags are the same"
    return f"{old} moved to {new}: import it from there (docs/design.md#the-package-map)"


class _MovedLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        # ImportError, not ModuleNotFoundError: `from bmask_jax import predictor` would swallow
        # the latter and say only "cannot import name".
        raise ImportError(message(module.__name__), name=module.__name__)

    def get_code(self, fullname):          # python -m runs this
        return compile(f"raise SystemExit({message(fullname)!r})", fullname, "exec")


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.machinery.ModuleSpec(fullname, _MovedLoader())
        return None


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())     # last: a real module of that name would win
