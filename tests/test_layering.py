"""The package's layers, by folder. Each place (a folder of bmask_jax, or one of the modules
left on top) may import the places in ALLOWED and never any other, at module level or inside
a function: no import runs back up and none forms a cycle. Checked twice: every import
statement in the sources (functions included), and what a fresh interpreter loads.
Nothing compiles.

    layer  place                     may import (besides itself)
    6      main                      everything below; __main__ runs the commands by name
    5      train                     inference is not one of them: training never serves
    4      inference                 evaluation, weights, engine, models, data, ops
    3      evaluation                engine, models, data, ops
    3      weights                   engine, models, data, ops, config
    2      engine                    models, data, ops
    1      models                    ops
    0      ops, data, config         errors
    -1     errors                    nothing of bmask_jax

Inference and evaluation restore variables, never a train state: they do not import
engine.state or engine.optim (tests/test_predictor.py runs a restore with the optimizer
broken). The exported-model runtime (inference/serving.py) loads no flax, PIL or model code
(tests/test_serving.py)."""
import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = REPO / "bmask_jax"

LAYERS = {
    "main": 6, "__main__": 6,
    "train": 5,
    "inference": 4,
    "evaluation": 3, "weights": 3,
    "engine": 2,
    "models": 1,
    "ops": 0, "data": 0, "config": 0,
    "_moved": 0,
    "errors": -1,        # every command's error boundary: anything may import it
    "__init__": 7,       # the package's own __init__: `bmask_jax.Predictor`, lazily
}

ALLOWED = {
    "main": {"train", "inference", "evaluation", "weights", "engine", "models", "data", "ops", "config"},
    "__main__": set(),                    # runpy by module name (and the error flag)
    "train": {"evaluation", "weights", "engine", "models", "data", "ops", "config"},
    "inference": {"evaluation", "weights", "engine", "models", "data", "ops", "config"},
    "evaluation": {"engine", "models", "data", "ops"},
    "weights": {"engine", "models", "data", "ops", "config"},
    "engine": {"models", "data", "ops"},
    "models": {"ops"},
    "ops": set(), "data": set(), "config": set(), "_moved": set(),
    "errors": set(),
    "__init__": {"_moved", "inference"},
}
for _place in ALLOWED:                   # errors, the bottom layer, serves every place
    if _place != "errors":
        ALLOWED[_place].add("errors")

# Modules a place never imports though its layer would allow it.
NEVER = {
    "inference": {"bmask_jax.engine.state", "bmask_jax.engine.optim"},
    "evaluation": {"bmask_jax.engine.state", "bmask_jax.engine.optim"},
}


def place_of(module: str) -> str:
    """'bmask_jax.inference.predictor' -> 'inference'; 'bmask_jax' -> '__init__'."""
    parts = module.split(".")
    assert parts[0] == "bmask_jax", module
    return parts[1] if len(parts) > 1 else "__init__"


def module_of(path: pathlib.Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool) -> set[str]:
    """Every module an import statement anywhere in `source` (functions included) may load,
    absolute: `from a import b` counts as both a and a.b (b may be a module)."""
    package = module if is_package else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[:len(parts) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            out.add(target)
            out.update(f"{target}.{a.name}" for a in node.names)
    return out


def package_imports(source: str, module: str, is_package: bool) -> set[str]:
    """The bmask_jax modules among imported_modules, without the package itself (which every
    import of a submodule loads first)."""
    return {m for m in imported_modules(source, module, is_package)
            if m.split(".")[0] == "bmask_jax" and m != "bmask_jax"}


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    place = place_of(module)
    bad = []
    for target in sorted(package_imports(source, module, is_package)):
        to = place_of(target)
        if target in NEVER.get(place, ()):
            bad.append(f"{module} imports {target} (never: {place} restores variables, not a train state)")
        elif to != place and to not in ALLOWED[place] and to in LAYERS:
            bad.append(f"{module} imports {target} ({place} may import {sorted(ALLOWED[place]) or 'nothing'})")
    return bad


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_place_is_in_the_table():
    places = {place_of(module_of(p)) for p in SOURCES}
    assert places == set(LAYERS), (places ^ set(LAYERS))


def test_the_allowed_imports_run_down_the_layers_only():
    """No place may import one on its own layer or above: the table has no cycle."""
    for place, allowed in ALLOWED.items():
        for other in allowed:
            assert LAYERS[other] < LAYERS[place], f"{place} (layer {LAYERS[place]}) may import {other} " \
                                                  f"(layer {LAYERS[other]})"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_import_statement_reaches_a_place_it_may_not(path):
    bad = violations(path.read_text(), module_of(path), path.name == "__init__.py")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("statement,module,culprit", [
    ("from bmask_jax.train import train_and_evaluate", "bmask_jax.evaluation.evaluate", "bmask_jax.train"),
    ("from bmask_jax import train", "bmask_jax.weights.pretrained", "bmask_jax.train"),
    ("import bmask_jax.inference.predictor", "bmask_jax.engine.checkpoints", "bmask_jax.inference.predictor"),
    ("from ..train import x", "bmask_jax.models.box_head", "bmask_jax.train"),
    ("from ..inference import export", "bmask_jax.engine.sharding", "bmask_jax.inference"),
    ("def f():\n    from bmask_jax.engine import checkpoints, state\n", "bmask_jax.inference.predict",
     "bmask_jax.engine.state"),
    ("def f():\n    from bmask_jax.engine.optim import make_optimizer\n", "bmask_jax.evaluation.evaluate",
     "bmask_jax.engine.optim"),
    ("from bmask_jax.models import losses", "bmask_jax.ops.boxes", "bmask_jax.models"),
])
def test_the_source_check_sees_every_form_of_import(statement, module, culprit):
    """The check above can fail: each form of import, also inside a function and relative,
    is caught, and the same statement from a place allowed to make it is not."""
    bad = violations(statement, module)
    assert bad and any(culprit in b for b in bad), bad
    assert not violations(statement, "bmask_jax.main"), statement


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


def test_inference_evaluation_and_weight_import_load_neither_training_nor_the_optimizer():
    loaded = loaded_after("bmask_jax.inference.predictor", "bmask_jax.inference.predict",
                          "bmask_jax.inference.export", "bmask_jax.evaluation.evaluate", "bmask_jax.weights")
    assert {"bmask_jax.inference.predictor", "bmask_jax.weights.importer", "bmask_jax.evaluation.evaluate"} <= loaded
    for absent in ("bmask_jax.train", "bmask_jax.engine.state", "bmask_jax.engine.optim"):
        assert not under(loaded, absent), absent


def test_engine_loads_nothing_above_it():
    loaded = loaded_after("bmask_jax.engine.state", "bmask_jax.engine.variables", "bmask_jax.engine.sharding",
                          "bmask_jax.engine.summary")
    assert {"bmask_jax.engine.state", "bmask_jax.engine.optim"} <= loaded
    for above in ("bmask_jax.train", "bmask_jax.evaluation", "bmask_jax.weights", "bmask_jax.inference"):
        assert not under(loaded, above), above
