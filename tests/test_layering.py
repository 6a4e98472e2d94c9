"""The layering: the train state (bmask_jax/state.py) and the optimizer (bmask_jax/optim.py)
sit below training, evaluation, prediction and the weight import, and evaluation and the
weight import never load training. Checked twice: what a fresh interpreter loads, and (for
imports inside functions, which loading alone does not reach) every import statement in the
sources. Nothing compiles."""
import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = REPO / "bmask_jax"

# Module -> the bmask_jax modules it must never import, at module level or inside a function.
FORBIDDEN = {
    "bmask_jax.evaluate": {"bmask_jax.train"},
    "bmask_jax.weights": {"bmask_jax.train", "bmask_jax.evaluate"},
    "bmask_jax.state": {"bmask_jax.train", "bmask_jax.evaluate", "bmask_jax.predict", "bmask_jax.predictor",
                        "bmask_jax.weights"},
    "bmask_jax.optim": {"bmask_jax.train", "bmask_jax.evaluate", "bmask_jax.predict", "bmask_jax.predictor",
                        "bmask_jax.weights", "bmask_jax.state"},
}


def loaded_after(*modules: str) -> set[str]:
    """The bmask_jax modules a fresh interpreter holds after importing `modules`."""
    code = ("import importlib, json, sys\n"
            f"for name in {list(modules)!r}:\n"
            "    importlib.import_module(name)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'bmask_jax')))")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def under(modules: set[str], package: str) -> set[str]:
    return {m for m in modules if m == package or m.startswith(package + ".")}


def test_evaluate_and_weight_import_do_not_load_training():
    loaded = loaded_after("bmask_jax.evaluate", "bmask_jax.weights", "bmask_jax.state")
    assert {"bmask_jax.evaluate", "bmask_jax.weights", "bmask_jax.weights.importer", "bmask_jax.state"} <= loaded
    assert not under(loaded, "bmask_jax.train")


def test_state_and_optimizer_load_nothing_above_them():
    loaded = loaded_after("bmask_jax.state", "bmask_jax.optim")
    assert {"bmask_jax.state", "bmask_jax.optim"} <= loaded
    for above in ("bmask_jax.train", "bmask_jax.evaluate", "bmask_jax.weights", "bmask_jax.predict",
                  "bmask_jax.predictor"):
        assert not under(loaded, above), above


def imported_modules(source: str, package: str) -> set[str]:
    """Every module an import statement anywhere in `source` (functions included) may load,
    absolute: `from a import b` counts as both a and a.b (b may be a module)."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[:len(parts) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            out.add(module)
            out.update(f"{module}.{a.name}" for a in node.names)
    return out


def sources(module: str) -> list[tuple[pathlib.Path, str]]:
    """(file, the package its relative imports resolve against) of a module or a package."""
    path = REPO.joinpath(*module.split("."))
    if path.is_dir():
        return [(f, module) for f in sorted(path.glob("*.py"))]
    return [(path.with_suffix(".py"), module.rsplit(".", 1)[0])]


def forbidden_imports(source: str, package: str, forbidden: set[str]) -> set[str]:
    return {m for m in imported_modules(source, package) for f in forbidden if m == f or m.startswith(f + ".")}


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_no_import_statement_reaches_above(module):
    files = sources(module)
    assert files and all(f.is_file() for f, _ in files), files
    for path, package in files:
        bad = forbidden_imports(path.read_text(), package, FORBIDDEN[module])
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


@pytest.mark.parametrize("statement", [
    "from bmask_jax.train import create_train_state",
    "from bmask_jax import train",
    "import bmask_jax.train",
    "from .. import train",
    "from ..train import create_train_state",
    "def f():\n    from bmask_jax import checkpoints, train\n",
])
def test_the_source_check_sees_every_form_of_import(statement):
    """The check above can fail: each way of importing train, also inside a function, is caught."""
    assert "bmask_jax.train" in forbidden_imports(statement, "bmask_jax.weights", {"bmask_jax.train"})
    assert not forbidden_imports(statement.replace("train", "sharding"), "bmask_jax.weights", {"bmask_jax.train"})
