"""A GPU check in one command (issue 11, item 5): train and inference speed, compile times and
memory of our R50-FPN Mask R-CNN and BMask R-CNN at 800x1344 in bfloat16, beside torchvision's
maskrcnn_resnet50_fpn on the same chip, then BMask R-CNN on ViTDet-B at 1024x1024 (issue 28).
It starts no stage after 8 minutes on one H100/H200-class GPU, compiles included (the last
may run on: give it 10), and rewrites its JSON after every stage, so that a timeout loses
nothing measured.

On a GPU machine that has Python 3.12, jax with its CUDA plugin, flax, optax, orbax-checkpoint,
torch and torchvision but no network, fetch the other wheels here first, into an ignored folder
that travels with the checkout (`experiments/device_wheels.sh build/wheels`), then run there:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site build/wheels/*.whl && \
        PYTHONPATH=/tmp/site:. timeout 590 python3 experiments/device_check.py \
        --out $OUT/device_check.json

On the CPU, in seconds, with the tiny configs:   python experiments/device_check.py --smoke

What it measures:
  train        per-chip batch 2 and 8, ViTDet-B 1 and 2 (global batch = per-chip batch x jax.device_count(),
               sharded over bmask_jax.engine.sharding's 'data' mesh with the state replicated and
               donated, as bmask_jax/train.py does): step time (median of --repeats after one
               warm-up), images/s, compile time, XLA's compiled memory analysis (memory_of in
               experiments/benchmark.py) and the device's peak_bytes_in_use so far. That peak
               never resets, so the stages run from the smallest batch up.
  inference    batch 1 on one device, score threshold 0 so that random weights still give 100
               detections: ms/image with mask pasting (bmask_jax.ops.postprocess.postprocess, on the
               host as evaluation does it) and ms on the device alone.
  torchvision  the same canvas and per-chip batch with frozen BN, bf16 autocast and
               cudnn.benchmark, in a subprocess so that its CUDA libraries and allocator stay
               apart from JAX's. Without torch/torchvision or CUDA it is skipped with the reason.
  ratios       our Mask R-CNN train images/s per chip over torchvision's (aim >= 1.3), and BMask
               R-CNN inference over our Mask R-CNN's (aim <= 1.08: the paper's 63.7 vs 59.0 ms).
Weights are random, with every frozen BatchNorm calibrated on the benchmark image on both sides,
as in experiments/benchmark.py. Set BMASK_JAX_CACHE to use a persistent compilation cache (the
JSON records it: compile times are then cache reads).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

T0 = time.perf_counter()   # the budget counts from here: jax's import and start-up are in it

# JAX grows its GPU memory on demand instead of taking 75% up front: the torchvision subprocess
# needs the rest, and peak_bytes_in_use then tells what was used, not what was reserved.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# A smoke run only proves that everything runs: XLA's cheapest CPU codegen halves its compile
# time. XLA reads these flags once, when jax is imported, hence before the import.
if "--smoke" in sys.argv[1:]:
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
                                        "--xla_llvm_disable_expensive_passes=true"]).strip()

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmark import (
    calibrate_frozen_norms,
    flops_of,
    load_config,
    memory_of,
    synthetic_batch,
    timed,
)

from bmask_jax.engine import sharding
from bmask_jax.ops.postprocess import postprocess
from bmask_jax.models.bmask_rcnn import BMaskRCNN
from bmask_jax.engine.state import create_train_state
from bmask_jax.train import MODEL_KEYS, train_step

# name: (config file, variant of the GPU check, variant of --smoke)
MODELS = {"mask_rcnn": ("configs/mask_rcnn.py", "r50_fpn_1x", "tiny"),
          "bmask_rcnn": ("configs/bmask_rcnn.py", "r50_fpn_1x", "tiny"),
          "bmask_vitdet_b": ("configs/bmask_rcnn.py", "vitdet_b", "tiny_vitdet")}
CLASSIC = ("mask_rcnn", "bmask_rcnn")     # the R50-FPN pair that the ratios and torchvision compare
GIB = 2.0 ** 30


def mode_settings(smoke: bool) -> dict:
    """The per-chip batches, timed repeats and time budget of a run: the R50-FPN and ViTDet-B
    check for one GPU, or the tiny configs on the CPU (seconds) for --smoke. ViTDet-B trains on
    its 1024x1024 canvas at 1 and 2 images a chip (detectron2 trains it at one a GPU)."""
    if smoke:
        return {"smoke": True, "batches": [1, 2], "vitdet_batches": [1], "repeats": 1, "budget_s": 0.0}
    return {"smoke": False, "batches": [2, 8], "vitdet_batches": [1, 2], "repeats": 5, "budget_s": 480.0}


def prepare_config(spec: str, dtype: str, kernels: str = "auto"):
    """A config for speed: `dtype` compute, `kernels` where the config has the key ("auto": XLA's
    own kernels off the CPU), and score threshold 0 so that random weights still give
    detections_per_image detections."""
    config = load_config(spec)
    config.model.compute_dtype = dtype
    if "kernels" in config.model:
        config.model.kernels = kernels
    config.model.roi_heads.score_threshold = 0.0
    return config


def device_memory() -> dict:
    """Device 0's allocator statistics in bytes (None where the backend keeps none, e.g. CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return {k: stats.get(k) for k in ("peak_bytes_in_use", "bytes_in_use")}


def model_inputs(config, batch: int, keys=MODEL_KEYS) -> dict:
    """The synthetic benchmark batch, restricted to `keys`, as host arrays."""
    return {k: v for k, v in synthetic_batch(config, batch).items() if k in keys}


@dataclasses.dataclass
class Subject:
    """One model under test and its latest train state: each train step donates it and returns
    the next, from the inference row (the calibrated weights) through every train row."""
    config: Any
    module: BMaskRCNN
    tx: Any
    state: Any
    setup_s: float


def build(spec: str, dtype: str, kernels: str, mesh) -> Subject:
    """Initialises a model (random weights, frozen norms calibrated as in benchmark.py) and
    replicates its train state over the mesh."""
    start = time.perf_counter()
    config = prepare_config(spec, dtype, kernels)
    module = BMaskRCNN(config.model)
    state, tx = create_train_state(config, module, jax.random.PRNGKey(0))
    one = model_inputs(config, 1)
    frozen = calibrate_frozen_norms(module, {"params": state.params, "frozen": state.frozen},
                                    jnp.asarray(one["image"]), jnp.asarray(one["image_hw"]))
    state = jax.block_until_ready(jax.device_put(state.replace(frozen=frozen), sharding.replicated(mesh)))
    return Subject(config, module, tx, state, time.perf_counter() - start)


def compile_timed(jitted, *args) -> tuple[Any, float, float]:
    """jitted compiled for args; the seconds it took in all, and of them tracing and lowering
    (Python) before XLA's own compile."""
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return compiled, time.perf_counter() - start, lowered_at - start


def train_row(subject: Subject, per_chip: int, mesh, repeats: int) -> dict:
    """Compiles and times the sharded, donating train step at per_chip images per device."""
    global_batch = per_chip * mesh.size
    batch_sharding, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    data = jax.device_put(model_inputs(subject.config, global_batch), batch_sharding)
    step = jax.jit(lambda s, b: train_step(s, b, subject.module, subject.tx, 0, False),
                   in_shardings=(rep, batch_sharding), out_shardings=(rep, rep), donate_argnums=0)
    compiled, compile_s, lower_s = compile_timed(step, subject.state, data)
    last = {}

    def run() -> None:
        subject.state, last["metrics"] = compiled(subject.state, data)
        jax.block_until_ready(last["metrics"])

    times = timed(run, repeats)
    step_s = statistics.median(times)
    return {"per_chip_batch": per_chip, "global_batch": global_batch, "step_s": step_s,
            "images_per_s": global_batch / step_s, "images_per_s_per_chip": per_chip / step_s,
            "compile_s": compile_s, "trace_and_lower_s": lower_s, "step_times_s": times,
            "gflops_per_step": flops_of(compiled) / 1e9, "final_total_loss": float(last["metrics"]["total_loss"]),
            "xla_memory_bytes": memory_of(compiled), "device_memory_so_far": device_memory()}


def inference_row(subject: Subject, repeats: int) -> dict:
    """Compiles and times batch-1 inference on device 0, with and without host mask pasting."""
    device = jax.devices()[0]
    variables = jax.device_put({"params": subject.state.params, "frozen": subject.state.frozen}, device)
    one = jax.device_put(model_inputs(subject.config, 1, ("image", "image_hw")), device)
    detect = jax.jit(lambda v, b: subject.module.apply(v, b, train=False))
    compiled, compile_s, lower_s = compile_timed(detect, variables, one)
    scale, orig_hw = np.ones(2, np.float32), np.asarray(one["image_hw"][0])
    counts = []

    def end_to_end() -> None:
        det = jax.device_get(compiled(variables, one))
        counts.append(len(postprocess(det, 0, scale, orig_hw, 0.5, boundaries=False)["masks"]))

    total = timed(end_to_end, repeats)
    device_only = timed(lambda: jax.block_until_ready(compiled(variables, one)), repeats)
    return {"batch": 1, "ms_per_image": 1e3 * statistics.median(total),
            "device_ms_per_image": 1e3 * statistics.median(device_only), "compile_s": compile_s,
            "trace_and_lower_s": lower_s, "detections": counts[-1], "times_s": total,
            "device_times_s": device_only,
            "gflops": flops_of(compiled) / 1e9, "xla_memory_bytes": memory_of(compiled),
            "device_memory_so_far": device_memory()}


# ---- torchvision, in its own process ----

def torchvision_model(config, device: str):
    """maskrcnn_resnet50_fpn built as benchmark.py's bench_torchvision builds it: frozen BatchNorm
    and layer2-4 trainable, as with a pretrained backbone (torchvision's builder given no weights
    would switch to trainable BatchNorm everywhere, a costlier model than ours)."""
    import torch
    from torchvision.models import resnet50
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.misc import FrozenBatchNorm2d
    torch.manual_seed(0)
    h, w = config.data.canvas_buckets[0]
    heads = config.model.roi_heads
    backbone = _resnet_fpn_extractor(resnet50(weights=None, norm_layer=FrozenBatchNorm2d), 3)
    return MaskRCNN(backbone, num_classes=config.model.num_classes + 1, min_size=min(h, w),
                    max_size=max(h, w), box_detections_per_img=heads.detections_per_image,
                    box_score_thresh=heads.score_threshold).to(device)


def torch_inputs(config, batch: int, device: str) -> tuple[list, list]:
    """The same synthetic images and boxes as ours, with box-filling masks, in torchvision's form."""
    import torch
    data = synthetic_batch(config, batch)
    h, w = data["image"].shape[1:3]
    images = [torch.from_numpy(im).to(device).permute(2, 0, 1).float() / 255 for im in data["image"]]
    targets = []
    for boxes, classes, valid in zip(data["gt_boxes"], data["gt_classes"], data["gt_valid"]):
        masks = torch.zeros((int(valid.sum()), h, w), dtype=torch.uint8)
        for j, (x1, y1, x2, y2) in enumerate(boxes[valid].astype(int).tolist()):
            masks[j, y1:y2, x1:x2] = 1
        targets.append({"boxes": torch.from_numpy(boxes[valid]).to(device), "masks": masks.to(device),
                        "labels": torch.from_numpy(classes[valid]).long().to(device) + 1})
    return images, targets


def calibrate_torch(model, images: list) -> None:
    """Sets every FrozenBatchNorm2d to normalise what it sees on `images`, layer after layer, as
    calibrate_frozen_norms does for ours."""
    import torch
    from torchvision.ops.misc import FrozenBatchNorm2d

    def hook(module, inputs) -> None:
        x = inputs[0].float()
        module.running_mean.copy_(x.mean((0, 2, 3)))
        module.running_var.copy_(x.var((0, 2, 3), unbiased=False))

    hooks = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    model.eval()
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()


def torch_timed(fn: Callable[[], None], repeats: int, device: str) -> list[float]:
    """benchmark.timed with the device synchronised before and after each run."""
    import torch
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def synced() -> None:
        sync()
        fn()
        sync()

    return timed(synced, repeats)


def torch_train_row(model, config, batch: int, repeats: int, device: str) -> dict:
    """torchvision's train step (SGD with momentum) under bf16 autocast."""
    import torch
    images, targets = torch_inputs(config, batch, device)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    model.train()
    last = {}

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16):
            last["loss"] = loss = sum(model(images, targets).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = torch_timed(step, repeats, device)
    step_s = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"per_chip_batch": batch, "step_s": step_s, "images_per_s": batch / step_s, "step_times_s": times,
            "final_total_loss": float(last["loss"]), "peak_memory_bytes": peak}


def torch_inference_row(model, config, repeats: int, device: str) -> dict:
    """torchvision's batch-1 inference under bf16 autocast, masks pasted (on the device)."""
    import torch
    images, _ = torch_inputs(config, 1, device)
    model.eval()
    counts = []

    def infer() -> None:
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            counts.append(len(model(images)[0]["masks"]))

    times = torch_timed(infer, repeats, device)
    return {"batch": 1, "ms_per_image": 1e3 * statistics.median(times), "times_s": times,
            "detections": counts[-1]}


def torchvision_child(request: dict, out: str) -> None:
    """The torchvision subprocess: inference (first, on the calibrated weights, as ours), then
    train rows from the smallest batch up, its JSON rewritten after each so that the parent
    keeps what finished before a timeout."""
    result: dict = {"train": {}}

    def save() -> None:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)

    try:
        import torch
        import torchvision
    except ImportError as e:
        result["skipped"] = f"torch/torchvision not importable: {e}"
        return save()
    cuda = torch.cuda.is_available()
    if not cuda and request["require_cuda"]:
        result["skipped"] = "CUDA is not available to torch"
        return save()
    device = "cuda" if cuda else "cpu"
    torch.backends.cudnn.benchmark = True
    config = prepare_config(request["spec"], "bfloat16")
    result.update(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                  torchvision=torchvision.__version__, cudnn_benchmark=True, autocast="bfloat16")
    model = torchvision_model(config, device)
    calibrate_torch(model, torch_inputs(config, 1, device)[0])
    result["inference"] = torch_inference_row(model, config, request["repeats"], device)
    save()
    for batch in request["batches"]:
        result["train"][str(batch)] = torch_train_row(model, config, batch, request["repeats"], device)
        save()


def run_torchvision(mode: str, spec: str, settings: dict, timeout_s: float) -> dict:
    """Runs torchvision_child in a subprocess and returns its results, or why there are none."""
    if mode == "no" or (mode == "auto" and settings["smoke"]):
        return {"skipped": "not asked for (--torchvision no, or a smoke run without --torchvision yes)"}
    request = {"spec": spec, "batches": settings["batches"], "repeats": settings["repeats"],
               "require_cuda": mode == "auto"}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "torchvision.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--torchvision_child", json.dumps(request), "--out", out]
        error = None
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout_s)
            if proc.returncode:
                error = f"exit {proc.returncode}: {proc.stderr[-2000:]}"
        except subprocess.TimeoutExpired:
            error = f"timed out after {timeout_s:.0f} s"
        result = {}
        if os.path.exists(out):
            with open(out) as f:
                result = json.load(f)
    if error:
        result["error"] = error
    return result


# ---- the run ----

def ratios(result: dict) -> dict:
    """The issue's aims: ours over torchvision (train images/s per chip, per batch) and BMask
    over Mask R-CNN (inference, end to end and on the device alone)."""
    out = {}
    train = {(r["model"], r["per_chip_batch"]): r for r in result["train"]}
    tv = result.get("torchvision", {})
    for batch in result["per_chip_batches"]:
        ours, theirs = train.get(("mask_rcnn", batch)), tv.get("train", {}).get(str(batch))
        if ours and theirs:
            out[f"mask_rcnn_over_torchvision_train_images_per_s_b{batch}"] = (
                ours["images_per_s_per_chip"] / theirs["images_per_s"])
        if ("bmask_rcnn", batch) in train and ours:
            out[f"bmask_over_mask_train_step_b{batch}"] = train[("bmask_rcnn", batch)]["step_s"] / ours["step_s"]
    infer = {r["model"]: r for r in result["inference"]}
    if "bmask_rcnn" in infer and "mask_rcnn" in infer:
        out["bmask_over_mask_inference"] = infer["bmask_rcnn"]["ms_per_image"] / infer["mask_rcnn"]["ms_per_image"]
        out["bmask_over_mask_inference_device_only"] = (
            infer["bmask_rcnn"]["device_ms_per_image"] / infer["mask_rcnn"]["device_ms_per_image"])
    if "mask_rcnn" in infer and "inference" in tv:
        out["mask_rcnn_over_torchvision_inference_ms"] = (
            infer["mask_rcnn"]["ms_per_image"] / tv["inference"]["ms_per_image"])
    return out


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def print_table(result: dict) -> None:
    """The summary: one line per train, inference and torchvision row, then the ratios."""
    print(f"\n{'train':<12} {'chip bs':>7} {'global':>6} {'step s':>8} {'img/s':>8} {'compile s':>9} "
          f"{'peak GiB':>8} {'XLA GiB':>8}")
    for r in result["train"]:
        print(f"{r['model']:<12} {r['per_chip_batch']:>7} {r['global_batch']:>6} {r['step_s']:>8.3f} "
              f"{r['images_per_s']:>8.2f} {r['compile_s']:>9.1f} "
              f"{gib(r['device_memory_so_far']['peak_bytes_in_use']):>8} "
              f"{gib(r['xla_memory_bytes'].get('peak')):>8}")
    tv = result.get("torchvision", {})
    for batch, r in tv.get("train", {}).items():
        print(f"{'torchvision':<12} {batch:>7} {batch:>6} {r['step_s']:>8.3f} {r['images_per_s']:>8.2f} "
              f"{'-':>9} {gib(r['peak_memory_bytes']):>8} {'-':>8}")
    if "skipped" in tv or "error" in tv:
        print(f"torchvision: {tv.get('skipped') or tv.get('error')}")
    print(f"\n{'inference':<12} {'ms/img':>8} {'device ms':>9} {'dets':>5} {'compile s':>9}")
    for r in result["inference"]:
        print(f"{r['model']:<12} {r['ms_per_image']:>8.1f} {r['device_ms_per_image']:>9.1f} "
              f"{r['detections']:>5} {r['compile_s']:>9.1f}")
    if "inference" in tv:
        r = tv["inference"]
        print(f"{'torchvision':<12} {r['ms_per_image']:>8.1f} {'-':>9} {r['detections']:>5}")
    for name, value in result["ratios"].items():
        print(f"{name}: {value:.3f}")
    for name in result["skipped_stages"]:
        print(f"skipped {name} (time budget)")
    for name, error in result["errors"].items():
        print(f"failed {name}: {error[:300]}")


def header(args, settings: dict) -> dict:
    """What the figures depend on: devices, versions, configs, dtype, batches, cache."""
    devices = jax.devices()
    return {"mode": "smoke" if args.smoke else "full", "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "backend": jax.default_backend(), "device_kind": devices[0].device_kind,
            "device_count": len(devices), "devices": [str(d) for d in devices],
            "configs": {name: f"{path}:{smoke if settings['smoke'] else full}"
                        for name, (path, full, smoke) in MODELS.items()},
            "compute_dtype": args.dtype, "kernels": args.kernels, "per_chip_batches": settings["batches"],
            "vitdet_per_chip_batches": settings["vitdet_batches"],
            "repeats": settings["repeats"],
            "compilation_cache": os.environ.get("BMASK_JAX_CACHE"),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "budget_s": settings["budget_s"],
            "train": [], "inference": [], "skipped_stages": [], "errors": {}, "setup_s": {}}


def stages(result: dict, args, settings: dict, mesh) -> list[tuple[str, Callable[[], None]]]:
    """The run in order, smallest batch first (JAX's peak memory never goes down): inference
    (on the calibrated weights, before any training step moves them), train at the first batch,
    torchvision at every batch (its own process: the train images/s ratio is in before the
    larger batches compile), then train at the other batches; ViTDet-B last (inference, then
    its batches), so that a budget cut leaves the R50-FPN comparison whole."""
    subjects: dict[str, Subject] = {}

    def subject(name: str) -> Subject:
        if name not in subjects:
            subjects[name] = build(result["configs"][name], args.dtype, args.kernels, mesh)
            result["setup_s"][name] = subjects[name].setup_s
        return subjects[name]

    def train(name: str, batch: int) -> None:
        row = {"model": name, **train_row(subject(name), batch, mesh, settings["repeats"])}
        result["train"].append(row)
        print(f"train {name} {batch}/chip: {row['step_s']:.3f} s, {row['images_per_s']:.2f} img/s, "
              f"compile {row['compile_s']:.1f} s", flush=True)

    def infer(name: str) -> None:
        row = {"model": name, **inference_row(subject(name), settings["repeats"])}
        result["inference"].append(row)
        print(f"inference {name}: {row['ms_per_image']:.1f} ms/img ({row['device_ms_per_image']:.1f} on the "
              f"device), {row['detections']} detections, compile {row['compile_s']:.1f} s", flush=True)

    def torchvision() -> None:
        # Its own process, at most 150 s and no further than a minute past the budget.
        elapsed = time.perf_counter() - result["_start"]
        left = settings["budget_s"] + 60 - elapsed if settings["budget_s"] else 150
        tv = result["torchvision"] = run_torchvision(args.torchvision, result["configs"]["mask_rcnn"], settings,
                                                     min(150.0, max(left, 30.0)))
        rows = [f"{b}/chip {r['step_s']:.3f} s, {r['images_per_s']:.2f} img/s"
                for b, r in tv.get("train", {}).items()]
        if "inference" in tv:
            rows.append(f"inference {tv['inference']['ms_per_image']:.1f} ms/img")
        print("torchvision: " + "; ".join([*rows, tv.get("skipped") or tv.get("error") or ""]).strip("; "),
              flush=True)

    first, *rest = settings["batches"]
    out = [(f"inference {name}", functools.partial(infer, name)) for name in CLASSIC]
    out += [(f"train {name} {first}/chip", functools.partial(train, name, first)) for name in CLASSIC]
    out.append(("torchvision", torchvision))
    for batch in rest:
        out += [(f"train {name} {batch}/chip", functools.partial(train, name, batch)) for name in CLASSIC]
    out.append(("inference bmask_vitdet_b", functools.partial(infer, "bmask_vitdet_b")))
    out += [(f"train bmask_vitdet_b {batch}/chip", functools.partial(train, "bmask_vitdet_b", batch))
            for batch in settings["vitdet_batches"]]
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="device_check.json", help="JSON path, rewritten after every stage")
    p.add_argument("--smoke", action="store_true",
                   help="tiny configs on the CPU, per-chip batch 1 and 2, 1 repeat")
    p.add_argument("--dtype", default="bfloat16", help="model.compute_dtype")
    p.add_argument("--kernels", default="auto", help="model.kernels, where the config has the key")
    p.add_argument("--repeats", type=int, help="timed runs after one warm-up (default 5; smoke 1)")
    p.add_argument("--batches", type=int, nargs="+", help="per-chip train batches (default 2 8; smoke 1 2)")
    p.add_argument("--vitdet_batches", type=int, nargs="*",
                   help="ViTDet-B's per-chip train batches (default 1 2; smoke 1; none: no ViTDet train rows)")
    p.add_argument("--budget_s", type=float,
                   help="start no new stage after this many seconds, 0 for none (default 400; smoke 0)")
    p.add_argument("--torchvision", choices=("auto", "yes", "no"), default="auto",
                   help="auto: on CUDA only, not in a smoke run; yes: also on the CPU")
    p.add_argument("--torchvision_child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    """Runs every stage within the budget, printing each row and saving the JSON as it goes."""
    args = parse_args(argv)
    if args.torchvision_child:
        return torchvision_child(json.loads(args.torchvision_child), args.out)
    if args.smoke:
        jax.config.update("jax_platforms", "cpu")
    if os.environ.get("BMASK_JAX_CACHE"):
        jax.config.update("jax_compilation_cache_dir", os.environ["BMASK_JAX_CACHE"])
    settings = mode_settings(args.smoke)
    for key in ("repeats", "batches", "vitdet_batches", "budget_s"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    result = header(args, settings)
    result["_start"] = start = T0

    def save() -> None:
        result["elapsed_s"] = time.perf_counter() - start
        result["ratios"] = ratios(result)
        with open(args.out, "w") as f:
            json.dump({k: v for k, v in result.items() if not k.startswith("_")}, f, indent=2)

    print(f"{result['device_count']} x {result['device_kind']} ({result['backend']}), jax {result['jax']}, "
          f"{args.dtype}, per-chip batches {settings['batches']}, {settings['repeats']} repeats", flush=True)
    mesh = sharding.make_mesh()
    for name, run in stages(result, args, settings, mesh):
        if settings["budget_s"] and time.perf_counter() - start > settings["budget_s"]:
            result["skipped_stages"].append(name)
            print(f"skipped {name}: past the {settings['budget_s']:.0f} s budget", flush=True)
        else:
            try:
                run()
            except Exception as e:   # noqa: BLE001  keep going: the later stages still measure
                result["errors"][name] = f"{type(e).__name__}: {e}"[:3000]
                print(f"failed {name}: {result['errors'][name][:500]}", flush=True)
        save()
    print_table(result)
    print(f"total {result['elapsed_s']:.0f} s; wrote {args.out}")
    return result


if __name__ == "__main__":
    outcome = main()
    sys.exit(1 if outcome and outcome["errors"] else 0)
