"""Docs that cannot rot: in README.md, CONTRIBUTING.md and docs/*.md, every relative link and #anchor resolves,
every `configs/<file>.py:<variant>` builds, every `python -m bmask_jax.X` and `bmask-jax COMMAND`
exists and answers --help, and every `--config.KEY=` names a real key."""
import os
import re
import subprocess
import sys

import pytest

from bmask_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", "CONTRIBUTING.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(REPO, "docs"))
                               if f.endswith(".md"))


def text(page: str) -> str:
    with open(os.path.join(REPO, page)) as f:
        return f.read()


def anchors(page: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    in_code = False
    for line in text(page).splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        title = line.lstrip("#").strip().lower()
        out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def links(page: str) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", text(page))


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_and_anchors_resolve(page):
    broken = []
    for link in links(page):
        if re.match(r"(https?|mailto):", link):
            continue
        path, _, anchor = link.partition("#")
        target = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(os.path.join(REPO, target)):
            broken.append(f"{link}: no file {target}")
        elif anchor and target.endswith(".md") and anchor not in anchors(target):
            broken.append(f"{link}: no heading #{anchor} in {target}")
    assert not broken, f"{page}: " + "; ".join(broken)


def found(pattern: str) -> set[str]:
    """Every match of `pattern` (its group, if it has one) in the pages."""
    return {m for page in PAGES for m in re.findall(pattern, text(page))}


@pytest.mark.parametrize("spec", sorted(found(r"configs/(?:mask_rcnn|bmask_rcnn|cityscapes|paper)\.py:[a-z0-9_]+")))
def test_named_configs_build(spec):
    if spec.startswith("configs/paper.py"):
        from configs import paper
        c = paper.get_config(spec.split(":")[1])
    else:
        c = config_lib.from_file(spec)
    assert c.model.num_classes > 0


@pytest.mark.parametrize("module", sorted(found(r"python -m (bmask_jax(?:\.\w+)*)")))
def test_named_commands_answer_help(module):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    out = done.stdout + done.stderr
    # absl's --help prints the usage and exits 1; the others exit 0.
    assert done.returncode in (0, 1) and "Traceback" not in out, out[-2000:]
    assert f"python -m {module}" in out or "flags:" in out, out[-2000:]


@pytest.mark.parametrize("command", sorted(found(r"`?bmask-jax ([a-z][\w-]*)")))
def test_named_bmask_jax_commands_answer_help(command):
    """`bmask-jax COMMAND` as `python -m bmask_jax COMMAND` (the same entry point; the script
    itself is on PATH only after pip install)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, "-m", "bmask_jax", command, "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    out = done.stdout + done.stderr
    assert done.returncode in (0, 1) and "Traceback" not in out, out[-2000:]
    assert f"bmask-jax {command}" in out or "flags:" in out, out[-2000:]


def test_config_flags_in_the_docs_are_real_keys():
    base = config_lib.base()
    missing = []
    for key in sorted(found(r"--config\.([a-z_][\w.]*)=")):      # lower case: not the KEY placeholder
        node = base
        for part in key.split("."):
            if part not in node:
                missing.append(key)
                break
            node = node[part]
    assert not missing, missing
