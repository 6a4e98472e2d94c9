"""The paper's claims at the embedded scale: Mask R-CNN vs BMask R-CNN (and the Sobel head)
over seeds, and the boundary ablations, on the procedurally generated shapes.

    python experiments/reproduce.py                      # everything, resuming
    python experiments/reproduce.py --only maskrcnn,bmask --seeds 3
    python experiments/reproduce.py --summarize          # tables and plot from what is there

Each run is `python -m bmask_jax.main` on configs/*.py:shapes with one seed, in its own
process; its metrics go to experiments/results/runs/<run>_seed<k>.json. A run whose JSON
exists is skipped, so the command can be stopped and started again. Afterwards
experiments/results/README.md gets the table (mean +- std over seeds of box AP, mask AP,
AP50, AP75 and Boundary AP) with the paper's two claims checked, and ap_vs_iou.png the
Fig. 1-style curves with seed bands.

The paper's ablations are BMask R-CNN with one boundary setting changed (SPEC section 6):
what supervises the boundary branch (its Table 4), which fusions it has (Table 6) and its
loss (Table 7). A row whose setting is BMask R-CNN's own default is BMask R-CNN's runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results")     # --results changes it

# name -> (config file, overrides, label); BMask R-CNN's defaults: supervision "boundary",
# both fusions, loss "dice_bce".
MODELS = {
    "maskrcnn": ("configs/mask_rcnn.py:shapes", {}, "Mask R-CNN"),
    "bmask": ("configs/bmask_rcnn.py:shapes", {}, "BMask R-CNN"),
    "sobel": ("configs/bmask_rcnn.py:shapes", {"model.mask_head.name": "sobel"}, "Sobel mask head"),
}
B = "model.boundary."
ABLATIONS = {
    "supervision": [("supervision_none", {B + "supervision": "none"}, "no boundary supervision"),
                    ("supervision_mask", {B + "supervision": "mask"}, "supervised by mask targets"),
                    ("bmask", {}, "supervised by boundary targets (BMask)")],
    "fusion": [("no_fusion", {B + "mask_to_boundary": False, B + "boundary_to_mask": False}, "no fusion"),
               ("m2b_only", {B + "boundary_to_mask": False}, "mask-to-boundary only"),
               ("b2m_only", {B + "mask_to_boundary": False}, "boundary-to-mask only"),
               ("bmask", {}, "both (BMask)")],
    "loss": [("loss_bce", {B + "loss": "bce"}, "BCE"),
             ("loss_weighted_bce", {B + "loss": "weighted_bce"}, "weighted BCE"),
             ("loss_dice", {B + "loss": "dice"}, "Dice"),
             ("bmask", {}, "Dice + BCE (BMask)")],
}
RUNS = dict(MODELS)
for rows in ABLATIONS.values():
    for name, overrides, label in rows:
        RUNS.setdefault(name, ("configs/bmask_rcnn.py:shapes", overrides, label))

COLUMNS = [("bbox", "AP", "box AP"), ("segm", "AP", "mask AP"), ("segm", "AP50", "mask AP50"),
           ("segm", "AP75", "mask AP75"), ("boundary", "AP", "Boundary AP")]


def run_path(name: str, seed: int) -> str:
    return os.path.join(RESULTS, "runs", f"{name}_seed{seed}.json")


def processor() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def train_one(name: str, seed: int, workdir_root: str, extra: list[str]) -> dict:
    """Train and evaluate one run in its own process; write and return its result."""
    config, overrides, label = RUNS[name]
    workdir = os.path.join(workdir_root, f"{name}_seed{seed}")
    args = [sys.executable, "-m", "bmask_jax.main", "--config", config, "--workdir", workdir,
            f"--config.seed={seed}"] + [f"--config.{k}={v}" for k, v in overrides.items()] + extra
    print(f"[{time.strftime('%H:%M:%S')}] {name} seed {seed}: {' '.join(args[1:])}", flush=True)
    start = time.time()
    subprocess.run(args, check=True, cwd=ROOT)
    seconds = time.time() - start
    with open(os.path.join(workdir, "metrics.json")) as f:
        metrics = json.load(f)
    result = {"run": name, "label": label, "seed": seed, "config": config, "overrides": overrides,
              "extra_flags": extra, "seconds": round(seconds, 1), "processor": processor(),
              "metrics": metrics}
    path = run_path(name, seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)     # a stopped run leaves no half-written result
    return result


def plan(names: list[str], seeds: int, ablation_seeds: int) -> list[tuple[str, int]]:
    """(run, seed) pairs in the order to do them: the model comparison first, then every
    ablation row at seed 0, then the further ablation seeds."""
    models = [(n, s) for s in range(seeds) for n in MODELS if n in names]
    ablation_names = [n for n in RUNS if n not in MODELS and n in names]
    ablations = [(n, s) for s in range(ablation_seeds) for n in ablation_names]
    return models + ablations


def load_results() -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    folder = os.path.join(RESULTS, "runs")
    for file in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if file.endswith(".json"):
            with open(os.path.join(folder, file)) as f:
                r = json.load(f)
            out.setdefault(r["run"], []).append(r)
    return out


def stats(runs: list[dict], kind: str, key: str) -> tuple[float, float]:
    values = np.array([100 * r["metrics"][kind][key] for r in runs])
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else float("nan")


def cell(runs: list[dict], kind: str, key: str) -> str:
    mean, std = stats(runs, kind, key)
    return f"{mean:.1f}" if np.isnan(std) else f"{mean:.1f} ± {std:.1f}"


def table(results: dict, rows: list[tuple[str, str]]) -> list[str]:
    lines = ["| | seeds | " + " | ".join(c[2] for c in COLUMNS) + " | processors |",
             "|---|---|" + "---|" * len(COLUMNS) + "---|"]
    for name, label in rows:
        runs = results.get(name, [])
        if not runs:
            lines.append(f"| {label} | 0 (not run) |" + " |" * len(COLUMNS) + " |")
            continue
        seeds = f"{len(runs)}" + (" (one seed only)" if len(runs) == 1 else "")
        lines.append(f"| {label} | {seeds} | " + " | ".join(cell(runs, k, m) for k, m, _ in COLUMNS)
                     + f" | {processors(runs)} |")
    return lines


def processors(runs: list[dict]) -> str:
    """Which processor each seed ran on, e.g. "AMD EPYC (seeds 0-4)"."""
    by_proc: dict[str, list[int]] = {}
    for r in runs:
        by_proc.setdefault(r["processor"], []).append(int(r["seed"]))
    return "; ".join(f"{p} (seed{'s' if len(v) > 1 else ''} {', '.join(map(str, sorted(v)))})"
                     for p, v in sorted(by_proc.items()))


def gain(results: dict, kind: str, key: str) -> tuple[float, float]:
    """BMask minus Mask R-CNN: difference of the seed means, and its standard error."""
    a, b = results["bmask"], results["maskrcnn"]
    ma, sa = stats(a, kind, key)
    mb, sb = stats(b, kind, key)
    return ma - mb, float(np.sqrt(sa ** 2 / len(a) + sb ** 2 / len(b)))


def claims(results: dict) -> list[str]:
    if not results.get("bmask") or not results.get("maskrcnn"):
        return ["The claims need both Mask R-CNN and BMask R-CNN runs."]
    g50, e50 = gain(results, "segm", "AP50")
    g75, e75 = gain(results, "segm", "AP75")
    gm, em = gain(results, "segm", "AP")
    gb, eb = gain(results, "boundary", "AP")
    holds = lambda ok: "**holds**" if ok else "**does not hold**"  # noqa: E731
    return [
        "BMask R-CNN minus Mask R-CNN, mean over seeds ± the standard error of that difference:",
        "",
        f"- mask AP50 {g50:+.1f} ± {e50:.1f}, mask AP75 {g75:+.1f} ± {e75:.1f}: the gain is larger at "
        f"AP75 than at AP50: {holds(g75 > g50)} on the means"
        + (f" (the difference {g75 - g50:+.1f} is within one standard error)"
           if abs(g75 - g50) < np.hypot(e50, e75) else "") + ".",
        f"- mask AP {gm:+.1f} ± {em:.1f}, Boundary AP {gb:+.1f} ± {eb:.1f}: the gain is larger on "
        f"Boundary AP than on mask AP: {holds(gb > gm)} on the means"
        + (f" (the difference {gb - gm:+.1f} is within one standard error)"
           if abs(gb - gm) < np.hypot(em, eb) else "") + ".",
    ]


def plot(results: dict, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(10, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    for i, (kind, title) in enumerate([("segm", "mask AP"), ("boundary", "Boundary AP")]):
        ax = fig.add_subplot(1, 2, i + 1)
        for name, marker in (("maskrcnn", "o"), ("bmask", "s")):
            runs = results.get(name, [])
            if not runs:
                continue
            keys = sorted(runs[0]["metrics"][kind]["AP_per_iou"], key=float)
            x = np.array([float(k) for k in keys])
            y = np.array([[100 * r["metrics"][kind]["AP_per_iou"][k] for k in keys] for r in runs])
            ax.plot(x, y.mean(0), marker=marker, label=f"{RUNS[name][2]} ({len(runs)} seeds)")
            ax.fill_between(x, y.min(0), y.max(0), alpha=0.2)
        ax.set_xlabel("IoU threshold")
        ax.set_ylabel(f"{title} (%)")
        ax.set_title(f"{title} vs IoU threshold (band: min-max over seeds)", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def summarize() -> str:
    results = load_results()
    lines = ["# Reproduction at the embedded scale", "",
             "Written by `python experiments/reproduce.py` from the JSON files in `runs/` (one per "
             "run: metrics, config, seconds, processor). Values are COCO AP (%) on the 200 "
             "held-out shapes images, mean ± sample standard deviation over seeds.", "",
             "## Mask R-CNN vs BMask R-CNN", ""]
    lines += table(results, [(n, label) for n, (_, _, label) in MODELS.items()])
    lines += ["", "## The paper's claims", ""] + claims(results)
    for title, rows in ABLATIONS.items():
        lines += ["", f"## Ablation: boundary {title}", ""]
        lines += table(results, [(n, label) for n, _, label in rows])
    all_runs = [r for runs in results.values() for r in runs]
    if all_runs:
        procs = sorted({r["processor"] for r in all_runs})
        secs = [r["seconds"] for r in all_runs]
        lines += ["", f"{len(all_runs)} runs on {', '.join(procs)}; {min(secs):.0f}-{max(secs):.0f} s each "
                  "(train, evaluate and pictures)."]
    os.makedirs(RESULTS, exist_ok=True)
    if results.get("bmask") or results.get("maskrcnn"):
        plot(results, os.path.join(RESULTS, "ap_vs_iou.png"))
        lines += ["", "![AP against IoU threshold](ap_vs_iou.png)"]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(RESULTS, "README.md"), "w") as f:
        f.write(text)
    return text


def main():
    global RESULTS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds per model (Mask R-CNN, BMask, Sobel)")
    p.add_argument("--ablation_seeds", type=int, default=2, help="seeds per ablation row")
    p.add_argument("--only", default="", help="comma-separated run names (default: all): " + ",".join(RUNS))
    p.add_argument("--workdirs", default=os.path.join(ROOT, "runs", "reproduce"),
                   help="where the runs' checkpoints and pictures go (not committed)")
    p.add_argument("--summarize", action="store_true", help="only rewrite the tables and the plot")
    p.add_argument("--results", default="", help="where the run JSONs, the table and the plot go")
    p.add_argument("extra", nargs="*", help="more flags for every run, e.g. --config.train.max_iter=100")
    a = p.parse_args()
    RESULTS = os.path.abspath(a.results or RESULTS)
    names = [n for n in a.only.split(",") if n] or list(RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        p.error(f"unknown run names {unknown}; choose from {list(RUNS)}")
    if not a.summarize:
        for name, seed in plan(names, a.seeds, a.ablation_seeds):
            if os.path.exists(run_path(name, seed)):
                continue
            train_one(name, seed, a.workdirs, a.extra)
            summarize()
    print(summarize())


if __name__ == "__main__":
    main()
