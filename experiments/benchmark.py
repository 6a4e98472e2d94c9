"""Speed of configs on this machine: compile time, train step, images/s, inference latency
(mask pasting included), peak host memory, and XLA's FLOPs set against the matmul peak
measured in the same run. Optionally times torchvision's maskrcnn_resnet50_fpn on the same
inputs and thread count when torchvision is importable.

    python experiments/benchmark.py --config configs/mask_rcnn.py:r50_fpn_1x \
        --config configs/bmask_rcnn.py:r50_fpn_1x --batch 2 --repeats 5 --torchvision --out bench.json

Several --config flags are measured one after another in the same process, and each is set
against the first (e.g. BMask R-CNN over Mask R-CNN); torchvision is set against the first.
Numbers are medians over --repeats runs after one warm-up run.

Both models get random weights in the pretrained layout (frozen BatchNorm, stem and res2
frozen, as detectron2's R50-FPN config and torchvision with a pretrained backbone), with every
frozen BatchNorm set to normalise what it sees on the benchmark image, as pretrained statistics
would: with identity statistics a random ResNet-50's activations grow into the thousands and
its class scores saturate, which is not the regime a real model runs in.

Inference runs with a score threshold of --score_threshold (0 by default) on both sides, so
that both return detections_per_image (100) detections even with random weights, which
otherwise give scores under detectron2's 0.05 and no detections at all: the mask head and
mask pasting would then not run on one side. The detection counts are reported.
"""
from __future__ import annotations

import argparse
import ast
import gc
import json
import os
import resource
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bmask_jax.ops.postprocess import postprocess  # noqa: E402
from bmask_jax.models.bmask_rcnn import BMaskRCNN  # noqa: E402
from bmask_jax.models.layers import BatchNorm, FrozenBatchNorm  # noqa: E402
from bmask_jax.engine.optim import make_optimizer  # noqa: E402
from bmask_jax.engine.state import create_train_state  # noqa: E402
from bmask_jax.engine.variables import dummy_batch  # noqa: E402
from bmask_jax.train import MODEL_KEYS, train_step  # noqa: E402


def dict_copy(config, **model_fields):
    """A copy of config with the given model fields set."""
    out = config.copy_and_resolve_references()
    out.model.update(model_fields)
    return out


def load_config(spec: str):
    import importlib.util
    path, _, variant = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()


def timed(fn, repeats: int) -> list[float]:
    fn()                                             # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    t = statistics.median(timed(lambda: f(a).block_until_ready(), repeats))
    return 2 * n ** 3 / t / 1e9


def flops_of(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def memory_of(compiled) -> dict:
    """XLA's compiled memory analysis of one program, in bytes per device: arguments, outputs,
    temporaries, the part of the outputs aliased to (donated) arguments, and the peak."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
    # XLA:CPU's own peak_memory_in_bytes comes out below its temporaries, so the peak here is
    # the whole buffer assignment: what is live if everything is live at once, an upper bound.
    out["xla_peak_field"] = int(getattr(m, "peak_memory_in_bytes", 0))
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def synthetic_batch(config, batch: int, num_gt: int = 12, seed: int = 0) -> dict:
    b = dummy_batch(config, batch)
    rng = np.random.default_rng(seed)
    h, w = b["image"].shape[1:3]
    b["image"] = rng.integers(0, 255, b["image"].shape).astype(np.uint8)
    g = b["gt_boxes"].shape[1]
    xy = rng.uniform(0, [w * 0.7, h * 0.7], (batch, g, 2))
    b["gt_boxes"] = np.concatenate([xy, xy + rng.uniform(min(h, w) * 0.05, min(h, w) * 0.3, (batch, g, 2))], -1).astype(np.float32)
    b["gt_classes"] = rng.integers(0, config.model.num_classes, (batch, g)).astype(np.int32)
    b["gt_valid"] = np.arange(g)[None].repeat(batch, 0) < num_gt
    return b


def calibrate_frozen_norms(model, variables: dict, images, image_hw) -> dict:
    """'frozen' with each FrozenBatchNorm's scale and shift (each BatchNorm's running mean and
    variance) in the backbone and FPN set so that it normalises its input on these images to
    zero mean and unit variance per channel, layer after layer in one forward pass (each layer
    sees the already calibrated layers before it)."""
    frozen = jax.tree_util.tree_map(np.asarray, variables["frozen"])

    def interceptor(next_fun, args, kwargs, context):
        norm = isinstance(context.module, (FrozenBatchNorm, BatchNorm))
        if not (norm and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        x = args[0].astype(jnp.float32)
        mean, var = jnp.mean(x, (0, 1, 2)), jnp.var(x, (0, 1, 2))
        scale = 1.0 / jnp.sqrt(var + 1e-5)
        node = frozen
        for name in context.module.path:
            node = node[name]
        if isinstance(context.module, BatchNorm):        # running statistics (its affine is 1, 0 at init)
            node["mean"], node["var"] = np.asarray(mean), np.asarray(var)
        else:
            node["scale"], node["shift"] = np.asarray(scale), np.asarray(-mean * scale)
        return ((x - mean) * scale).astype(args[0].dtype)

    with nn.intercept_methods(interceptor):
        model.apply({**variables, "frozen": frozen}, images, image_hw, method=lambda m, im, hw: m.pyramid(im, hw))
    return jax.tree_util.tree_map(jnp.asarray, frozen)


def bench_ours(config, batch: int, repeats: int) -> dict:
    """Times our train step, inference and backbone for one config."""
    model = BMaskRCNN(config.model)
    state, tx = create_train_state(config, model, jax.random.PRNGKey(0))
    data = {k: jnp.asarray(v) for k, v in synthetic_batch(config, batch).items() if k in MODEL_KEYS}
    state = state.replace(frozen=calibrate_frozen_norms(
        model, {"params": state.params, "frozen": state.frozen}, data["image"][:1], data["image_hw"][:1]))
    step = jax.jit(lambda s, b: train_step(s, b, model, tx, 0, False))
    t = time.perf_counter()
    compiled_step = step.lower(state, data).compile()
    compile_train = time.perf_counter() - t
    holder = {"state": state}

    def run_step():
        holder["state"], metrics = compiled_step(holder["state"], data)
        jax.block_until_ready(metrics)

    train_times = timed(run_step, repeats)

    # How many mask-head slots per image the train step ran (the foreground bucket) and the
    # foreground it had to hold, from one forward pass on the same batch.
    _, inter = jax.jit(lambda s, b: model.apply(
        {"params": s.params, "frozen": s.frozen}, b, rngs={"sampling": jax.random.PRNGKey(0)},
        mutable=["intermediates"]))(holder["state"], data)
    inter = inter["intermediates"]
    mask_slots = int(inter["mask_slots"][0])
    most_foreground = int(inter["most_foreground_per_image"][0]) if "most_foreground_per_image" in inter else None

    variables = {"params": holder["state"].params, "frozen": holder["state"].frozen}
    one = {"image": data["image"][:1], "image_hw": data["image_hw"][:1]}
    detect = jax.jit(lambda v, b: model.apply(v, b, train=False))
    t = time.perf_counter()
    compiled_detect = detect.lower(variables, one).compile()
    compile_infer = time.perf_counter() - t
    scale, orig_hw = np.ones(2, np.float32), np.asarray(one["image_hw"][0])

    counts = []

    def run_infer():
        det = jax.device_get(compiled_detect(variables, one))
        # Paste masks at full size, as evaluation does (boundaries only go into pictures).
        inst = postprocess(det, 0, scale, orig_hw, 0.5, boundaries=False)
        counts.append(len(inst["masks"]))

    infer_times = timed(run_infer, repeats)

    pyramid = jax.jit(lambda v, x: model.apply(v, x, method=lambda m, im: m.backbone(m.normalize(im))))
    compiled_backbone = pyramid.lower(variables, one["image"]).compile()
    backbone_times = timed(lambda: jax.block_until_ready(compiled_backbone(variables, one["image"])), repeats)

    train_s = statistics.median(train_times)
    backbone_s = statistics.median(backbone_times)
    return {
        "compile_train_s": compile_train, "compile_inference_s": compile_infer,
        "train_step_s": train_s, "train_images_per_s": batch / train_s,
        "inference_latency_s": statistics.median(infer_times),
        "backbone_forward_s": backbone_s,
        "train_step_gflops": flops_of(compiled_step) / 1e9,
        "inference_gflops": flops_of(compiled_detect) / 1e9,
        "backbone_forward_gflops": flops_of(compiled_backbone) / 1e9,
        "backbone_gflops_per_s": flops_of(compiled_backbone) / 1e9 / backbone_s,
        "train_times_s": train_times, "inference_times_s": infer_times,
        "inference_detections": counts[-1],
        "train_mask_slots_per_image": mask_slots, "train_most_foreground_per_image": most_foreground,
    }


def bench_torchvision(config, batch: int, repeats: int, threads: int, v2: bool = False) -> dict:
    """torchvision's R50-FPN Mask R-CNN on the same batch and threads. v2: maskrcnn_resnet50_fpn_v2
    with no weights, the large-scale-jitter baselines' model (torchvision ported it from
    detectron2's): trainable BatchNorm in the backbone and FPN, a 2-conv RPN head, the 4conv1fc
    box head and the mask head with BatchNorm convs."""
    import torch
    from torchvision.models import resnet50
    from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn_v2
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.misc import FrozenBatchNorm2d
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    h, w = config.data.canvas_buckets[0]
    if v2:
        model = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=config.model.num_classes + 1,
                                         min_size=min(h, w), max_size=max(h, w))
    else:
        # maskrcnn_resnet50_fpn's own construction for a pretrained backbone: frozen BatchNorm,
        # layer2-4 trainable (detectron2's freeze_at=2); with no weights at all it would switch to
        # trainable BatchNorm everywhere, a different (costlier) model from ours.
        backbone = _resnet_fpn_extractor(resnet50(weights=None, norm_layer=FrozenBatchNorm2d), 3)
        model = MaskRCNN(backbone, num_classes=config.model.num_classes + 1, min_size=min(h, w), max_size=max(h, w))
    data = synthetic_batch(config, batch)
    images = [torch.from_numpy(data["image"][i]).permute(2, 0, 1).float() / 255 for i in range(batch)]

    def calibrate(module, inputs):   # as calibrate_frozen_norms does for ours
        module.running_mean.copy_(inputs[0].mean((0, 2, 3)))
        module.running_var.copy_(inputs[0].var((0, 2, 3), unbiased=False))

    hooks = [m.register_forward_pre_hook(calibrate) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    model.eval()
    with torch.no_grad():
        model(images[:1])
    for hook in hooks:
        hook.remove()
    targets = []
    for i in range(batch):
        valid = data["gt_valid"][i]
        boxes = torch.from_numpy(data["gt_boxes"][i][valid])
        masks = torch.zeros((len(boxes), h, w), dtype=torch.uint8)
        for j, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
            masks[j, y1:y2, x1:x2] = 1
        targets.append({"boxes": boxes, "labels": torch.from_numpy(data["gt_classes"][i][valid]).long() + 1,
                        "masks": masks})
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    model.train()

    def run_step():
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()

    train_times = timed(run_step, repeats)
    model.eval()
    model.roi_heads.detections_per_img = config.model.roi_heads.detections_per_image
    model.roi_heads.score_thresh = config.model.roi_heads.score_threshold
    counts = []

    def run_infer():
        with torch.no_grad():
            counts.append(len(model(images[:1])[0]["masks"]))

    infer_times = timed(run_infer, repeats)
    return {"train_step_s": statistics.median(train_times), "train_images_per_s": batch / statistics.median(train_times),
            "inference_latency_s": statistics.median(infer_times), "train_times_s": train_times,
            "inference_times_s": infer_times, "inference_detections": counts[-1], "torch_threads": threads}


def bench_detectron2_vitdet(config, batch: int, repeats: int, threads: int, name: str) -> dict:
    """detectron2's own ViTDet (its LazyConfig projects/ViTDet/configs/COCO/<name>.py, from its
    newest sources on PYTHONPATH) on the same synthetic batch and thread count: a training step
    (AdamW, stochastic depth on) and inference on one image, float32 as ours."""
    import importlib.util
    import types

    import torch
    if importlib.util.find_spec("detectron2._C") is None:
        sys.modules["detectron2._C"] = types.ModuleType("detectron2._C")
    import detectron2
    from detectron2.config import LazyConfig, instantiate
    from detectron2.structures import BitMasks, Boxes, Instances
    from detectron2.utils.events import EventStorage
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    path = os.path.join(os.path.dirname(os.path.dirname(detectron2.__file__)), "projects", "ViTDet", "configs", "COCO",
                        f"{name}.py")
    cfg = LazyConfig.load(path)
    cfg.model.roi_heads.num_classes = config.model.num_classes
    model = instantiate(cfg.model)
    h, w = config.data.canvas_buckets[0]
    data = synthetic_batch(config, batch)
    inputs = []
    for i in range(batch):
        valid = data["gt_valid"][i]
        boxes = torch.from_numpy(data["gt_boxes"][i][valid])
        masks = torch.zeros((len(boxes), h, w), dtype=torch.bool)
        for j, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
            masks[j, y1:y2, x1:x2] = True
        inst = Instances((h, w), gt_boxes=Boxes(boxes), gt_masks=BitMasks(masks),
                         gt_classes=torch.from_numpy(data["gt_classes"][i][valid]).long())
        inputs.append({"image": torch.from_numpy(data["image"][i]).permute(2, 0, 1).float(), "height": h, "width": w,
                       "instances": inst})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    model.train()

    def run_step():
        with EventStorage(0):                  # detectron2's losses log into one, as its trainer does
            loss = sum(model(inputs).values())
        opt.zero_grad()
        loss.backward()
        opt.step()

    train_times = timed(run_step, repeats)
    model.eval()
    model.roi_heads.box_predictor.test_score_thresh = config.model.roi_heads.score_threshold
    model.roi_heads.box_predictor.test_topk_per_image = config.model.roi_heads.detections_per_image
    one = [{k: inputs[0][k] for k in ("image", "height", "width")}]
    counts = []

    def run_infer():
        with torch.no_grad():
            counts.append(len(model(one)[0]["instances"]))

    infer_times = timed(run_infer, repeats)
    return {"train_step_s": statistics.median(train_times), "train_images_per_s": batch / statistics.median(train_times),
            "inference_latency_s": statistics.median(infer_times), "train_times_s": train_times,
            "inference_times_s": infer_times, "inference_detections": counts[-1], "torch_threads": threads,
            "config": path}


def train_step_memory(config, per_device_batch: int, compute_dtype: str, kernels: str = "xla") -> dict:
    """XLA's memory analysis of the train step compiled for one device at `per_device_batch`:
    what each chip of a data-parallel run needs (parameters and optimizer state are
    replicated, activations scale with the per-device batch; the gradient all-reduce adds no
    buffer of its own size). Compiled with XLA's own kernels ("xla"), the program a GPU or TPU
    runs, and with the state donated, as in training. Only abstract shapes: nothing runs."""
    config = dict_copy(config, compute_dtype=compute_dtype, kernels=kernels)
    model = BMaskRCNN(config.model)
    state = jax.eval_shape(lambda: create_train_state(config, model, jax.random.PRNGKey(0))[0])
    tx = make_optimizer(config, state.params)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
             for k, v in dummy_batch(config, per_device_batch).items() if k in MODEL_KEYS}
    step = jax.jit(lambda s, b: train_step(s, b, model, tx, 0, False), donate_argnums=0)
    t = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    return dict(memory_of(compiled), compile_s=time.perf_counter() - t)


def inference_memory(config, per_device_batch: int, compute_dtype: str, kernels: str = "xla") -> dict:
    """XLA's memory analysis of inference (the evaluation detector) compiled for one device at
    `per_device_batch` images of the config's largest canvas; abstract shapes only."""
    config = dict_copy(config, compute_dtype=compute_dtype, kernels=kernels)
    model = BMaskRCNN(config.model)
    state = jax.eval_shape(lambda: create_train_state(config, model, jax.random.PRNGKey(0))[0])
    variables = {"params": state.params, "frozen": state.frozen}
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
             for k, v in dummy_batch(config, per_device_batch).items() if k in ("image", "image_hw")}
    detect = jax.jit(lambda v, b: model.apply(v, b, train=False))
    t = time.perf_counter()
    compiled = detect.lower(variables, batch).compile()
    return dict(memory_of(compiled), compile_s=time.perf_counter() - t)


def memory_table(specs, configs, batches=(1, 2, 4), dtypes=("float32", "bfloat16"),
                 inference_batches=()) -> list[dict]:
    """train_step_memory for every config, per-device batch and compute dtype; prints a row
    each as it comes."""
    rows = []
    gib = 2 ** 30
    print(f"{'config':40s} {'dtype':9s} {'batch':>5s} {'args':>7s} {'outputs':>8s} {'temps':>7s} "
          f"{'peak':>7s}  (GiB per device)", flush=True)
    for spec, config in zip(specs, configs):
        for dtype in dtypes:
            for b in batches:
                m = train_step_memory(config, b, dtype)
                rows.append(dict(m, config=spec, compute_dtype=dtype, per_device_batch=b))
                print(f"{spec:40s} {dtype:9s} {b:5d} {m['argument'] / gib:7.2f} {m['output'] / gib:8.2f} "
                      f"{m['temp'] / gib:7.2f} {m['peak'] / gib:7.2f}", flush=True)
                gc.collect()
            for b in inference_batches:
                m = inference_memory(config, b, dtype)
                rows.append(dict(m, config=spec, compute_dtype=dtype, per_device_batch=b, program="inference"))
                print(f"{spec + ' inference':40s} {dtype:9s} {b:5d} {m['argument'] / gib:7.2f} "
                      f"{m['output'] / gib:8.2f} {m['temp'] / gib:7.2f} {m['peak'] / gib:7.2f}", flush=True)
                gc.collect()
    return rows


def ratios(ours: dict, base: dict) -> dict:
    return {"train_step": ours["train_step_s"] / base["train_step_s"],
            "inference": ours["inference_latency_s"] / base["inference_latency_s"]}


def print_run(spec: str, o: dict):
    print(f"{spec}")
    print(f"  compile: train {o['compile_train_s']:.1f} s, inference {o['compile_inference_s']:.1f} s")
    print(f"  train step {o['train_step_s']:.3f} s ({o['train_images_per_s']:.2f} img/s, "
          f"{o['train_step_gflops']:.0f} GFLOP; mask head on {o['train_mask_slots_per_image']} slots per image, "
          f"foreground up to {o['train_most_foreground_per_image']})")
    print(f"  inference {o['inference_latency_s']:.3f} s/img, {o['inference_detections']} detections "
          f"({o['inference_gflops']:.0f} GFLOP)")
    print(f"  backbone forward {o['backbone_forward_s']:.3f} s, {o['backbone_gflops_per_s']:.0f} GFLOP/s = "
          f"{100 * o['backbone_fraction_of_matmul_peak']:.0f}% of matmul peak")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append",
                   help="CONFIG[:VARIANT]; repeat to measure several side by side "
                        "(default configs/mask_rcnn.py:r50_fpn_1x)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--score_threshold", type=float, default=0.0,
                   help="inference score threshold on both sides (see above)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key in every config, e.g. model.roi_heads.foreground_buckets=()")
    p.add_argument("--torchvision_v2", action="store_true",
                   help="with --torchvision: torchvision's maskrcnn_resnet50_fpn_v2 (BatchNorm everywhere, the LSJ "
                        "baselines' heads), for the *_lsj configs")
    p.add_argument("--torchvision", action="store_true", help="also time torchvision's R50-FPN Mask R-CNN (a like-for-like comparison for the first config if it is R50-FPN)")
    p.add_argument("--detectron2_vitdet", default="", metavar="NAME",
                   help="also time detectron2's own ViTDet, its LazyConfig projects/ViTDet/configs/COCO/NAME.py "
                        "(e.g. mask_rcnn_vitdet_b_100ep; its newest sources on PYTHONPATH), against the first config")
    p.add_argument("--kernels", default="",
                   help="comma-separated model.kernels choices (xla,cpu): each config is measured with each")
    p.add_argument("--memory", action="store_true",
                   help="only the memory table: XLA's memory analysis of the train step per device, "
                        "per-device batch 1, 2, 4, float32 and bfloat16, compiled with XLA's own kernels")
    p.add_argument("--memory_batches", type=int, nargs="+", default=[1, 2, 4],
                   help="per-device train batches of the memory table")
    p.add_argument("--memory_inference", type=int, nargs="*", default=[],
                   help="per-device inference batches to add to the memory table (e.g. 1)")
    p.add_argument("--out", default="")
    args = p.parse_args()
    specs = args.config or ["configs/mask_rcnn.py:r50_fpn_1x"]
    configs = [load_config(spec) for spec in specs]
    if args.kernels:
        # Each config once per kernel choice, side by side in this process.
        kernels = args.kernels.split(",")
        configs = [dict_copy(c, kernels=k) for c in configs for k in kernels]
        specs = [f"{spec} kernels={k}" for spec in specs for k in kernels]
    for config in configs:
        config.model.roi_heads.score_threshold = args.score_threshold
        for item in args.set:
            key, _, value = item.partition("=")
            node = config
            *parents, leaf = key.split(".")
            for name in parents:
                node = node[name]
            node[leaf] = ast.literal_eval(value)
    threads = os.cpu_count() or 1
    result = {"configs": specs, "overrides": args.set, "batch": args.batch, "canvas": list(configs[0].data.canvas_buckets[0]),
              "devices": [str(d) for d in jax.devices()], "threads": threads,
              "score_threshold": args.score_threshold,
              "matmul_peak_gflops_per_s": matmul_peak_gflops(), "runs": {}}
    print(f"batch {args.batch}  canvas {result['canvas']}  matmul peak "
          f"{result['matmul_peak_gflops_per_s']:.0f} GFLOP/s  score threshold {args.score_threshold}", flush=True)

    def save():   # after every stage, so that a later failure loses nothing measured
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)

    if args.memory:
        result["memory_per_device"] = memory_table(specs, configs, args.memory_batches,
                                                   inference_batches=args.memory_inference)
        save()
        return

    for spec, config in zip(specs, configs):
        run = bench_ours(config, args.batch, args.repeats)
        run["backbone_fraction_of_matmul_peak"] = run["backbone_gflops_per_s"] / result["matmul_peak_gflops_per_s"]
        run["peak_host_memory_gb_so_far"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        result["runs"][spec] = run
        print_run(spec, run)
        save()
        gc.collect()
    first = result["runs"][specs[0]]
    if len(specs) > 1:
        result["ratios_over_first"] = {spec: ratios(result["runs"][spec], first) for spec in specs[1:]}
        for spec, r in result["ratios_over_first"].items():
            print(f"{spec} / {specs[0]}: train step {r['train_step']:.3f}, inference {r['inference']:.3f}")
    if args.torchvision:
        try:
            tv = result["torchvision"] = bench_torchvision(configs[0], args.batch, args.repeats, threads,
                                                           args.torchvision_v2)
            r = result["ratios_first_over_torchvision"] = ratios(first, tv)
            print(f"torchvision: train step {tv['train_step_s']:.3f} s, inference {tv['inference_latency_s']:.3f} s/img, "
                  f"{tv['inference_detections']} detections")
            print(f"{specs[0]} / torchvision: train step {r['train_step']:.3f}, inference {r['inference']:.3f}")
        except ImportError as e:
            result["torchvision"] = {"error": f"torchvision not importable: {e}"}
            print(result["torchvision"]["error"])
    if args.detectron2_vitdet:
        d2 = result["detectron2"] = bench_detectron2_vitdet(configs[0], args.batch, args.repeats, threads,
                                                            args.detectron2_vitdet)
        r = result["ratios_first_over_detectron2"] = ratios(first, d2)
        print(f"detectron2 {args.detectron2_vitdet}: train step {d2['train_step_s']:.3f} s, inference "
              f"{d2['inference_latency_s']:.3f} s/img, {d2['inference_detections']} detections")
        print(f"{specs[0]} / detectron2: train step {r['train_step']:.3f}, inference {r['inference']:.3f}")
    result["peak_host_memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"peak host memory {result['peak_host_memory_gb']:.1f} GB")
    save()


if __name__ == "__main__":
    main()
