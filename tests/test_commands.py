"""The command line: `bmask-jax COMMAND` (= `python -m bmask_jax COMMAND`) runs each command
under the module that defines it, and every name from before the package's folders (modules
and `python -m` commands) answers with one line giving the new one. Nothing compiles."""
import importlib
import os
import re
import shutil
import subprocess
import sys

import pytest

from bmask_jax import __main__ as cli
from bmask_jax import _moved

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_console_script_is_declared_for_the_dispatcher():
    with open(os.path.join(REPO, "setup.py")) as f:
        assert re.search(r"bmask-jax\s*=\s*bmask_jax\.__main__:main", f.read())


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_command_names_a_module_that_exists(command):
    module, _ = cli.COMMANDS[command]
    spec = importlib.util.find_spec(module)
    assert spec is not None and not isinstance(spec.loader, _moved._MovedLoader), module


def test_help_lists_every_command_and_no_command_is_an_error():
    done = run("-m", "bmask_jax", "--help")
    assert done.returncode == 0
    for command in cli.COMMANDS:
        assert f"bmask-jax {command}" in done.stdout, command
    done = run("-m", "bmask_jax")
    assert done.returncode == 2 and "bmask-jax train" in done.stdout


def test_an_unknown_command_and_a_second_mode_are_one_line_errors():
    done = run("-m", "bmask_jax", "trian")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip() == ("bmask-jax: no command 'trian'; the commands: " + ", ".join(cli.COMMANDS)
                                   + " (bmask-jax --help)")
    done = run("-m", "bmask_jax", "train", "--mode=evaluate", "--config", "configs/bmask_rcnn.py:tiny")
    assert done.returncode != 0 and done.stderr.strip() == "bmask-jax train: --mode is the command itself; drop it"


def test_zoo_runs_under_the_new_command():
    done = run("-m", "bmask_jax", "zoo")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| `mask_rcnn_R_50_FPN_3x` |" in done.stdout and "cache:" in done.stdout


def test_train_passes_its_mode_and_flags_to_main(tmp_path):
    """`bmask-jax evaluate` is main with --mode=evaluate: with no checkpoint it says so in one line."""
    done = run("-m", "bmask_jax", "evaluate", "--config", "configs/bmask_rcnn.py:tiny", "--workdir", str(tmp_path))
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("error: no checkpoint"), done.stderr[-2000:]


def test_the_installed_script_runs():
    script = shutil.which("bmask-jax")
    if script is None:
        pytest.skip("bmask-jax is not on PATH: pip install -e . puts it there")
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and "bmask-jax import-weights" in done.stdout


@pytest.mark.parametrize("old", sorted(_moved.MOVED))
def test_an_old_module_name_says_where_it_went(old):
    new = _moved.MOVED[old]
    with pytest.raises(ImportError, match=re.escape(f"{old} moved to {new}") if old not in _moved.COMMANDS
                       else re.escape(_moved.COMMANDS[old])):
        importlib.import_module(old)
    parent, name = old.rsplit(".", 1)
    with pytest.raises(ImportError, match=re.escape(new)):
        exec(f"from {parent} import {name}", {})
    assert importlib.util.find_spec(new) is not None


@pytest.mark.parametrize("old", sorted(_moved.COMMANDS))
def test_an_old_command_answers_with_one_line_giving_the_new_one(old):
    done = run("-m", old, "--help")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [f"python -m {old} is now `{_moved.COMMANDS[old]}` "
                                                f"(or python -m {_moved.MOVED[old]}); the flags are the same"]


def test_the_commands_that_did_not_move_still_run():
    for module in ("bmask_jax.main", "bmask_jax.weights"):
        done = run("-m", module, "--help")
        assert done.returncode in (0, 1) and "Traceback" not in done.stderr and "flags:" in done.stdout + done.stderr
