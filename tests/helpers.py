"""Shared test helpers: the tiny config, its first training batch, the reference files, and an HTTP
server on 127.0.0.1 (with fixtures) for the download tests."""
import http.server
import threading
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from bmask_jax import config as config_lib
from bmask_jax.data.pipeline import TrainBatches, build_dataset
from bmask_jax.train import MODEL_KEYS

# The repo is cloned with shared/ beside it (CI does the same).
REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference"


def reference(name: str):
    path = REFERENCE_DIR / name
    if not path.exists():
        pytest.skip(f"reference file {path} not found (expected the shared/ directory beside the repo)")
    return np.load(path)


def tiny_config(head: str = "bmask"):
    return config_lib.mask_head(config_lib.tiny(config_lib.base()), head)


def fresh_checkpoint(c, path: str) -> str:
    """A workdir at `path` holding a step-0 checkpoint of config c's model (fresh weights)."""
    import jax

    from bmask_jax.engine import checkpoints
    from bmask_jax.models.bmask_rcnn import BMaskRCNN
    from bmask_jax.engine.state import create_train_state
    state, _ = create_train_state(c, BMaskRCNN(c.model), jax.random.PRNGKey(0))
    mgr = checkpoints.manager(path, 1, async_save=False)
    checkpoints.save(mgr, 0, state, force=True)
    mgr.wait_until_finished()
    return path


def first_batch(c) -> dict:
    """The model inputs of training step 0 for config c."""
    loader = TrainBatches(build_dataset(c.data, "train"), c.data, c.train.batch_size, 0)
    try:
        return {k: jnp.asarray(v) for k, v in loader.batch(0).items() if k in MODEL_KEYS}
    finally:
        loader.close()


def iou_brute_force(a, b) -> float:
    """IoU of two (x1, y1, x2, y2) boxes from the definition, in plain Python."""
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# detectron2 / MSRA checkpoint layouts, written from a config's numbers
# ---------------------------------------------------------------------------------------------

def d2_shapes(config) -> dict[str, tuple]:
    """{detectron2 key: torch shape} of Mask R-CNN / BMask R-CNN for a config, from its numbers
    (written from detectron2's module layout, independently of our parameter tree)."""
    m, b = config.model, config.model.backbone
    shapes = {}

    def conv(name, cout, cin, k, bias=True):
        shapes[f"{name}.weight"] = (cout, cin, k, k)
        if bias:
            shapes[f"{name}.bias"] = (cout,)

    def norm(name, c):
        for r in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.norm.{r}"] = (c,)
        if b.norm == "SyncBN":           # torch's BatchNorm buffers (FrozenBatchNorm2d has none)
            shapes[f"{name}.norm.num_batches_tracked"] = ()

    if b.name == "regnet":
        stage_channels = d2_regnet_shapes(shapes, b.regnet, b.norm)
    else:
        stage_channels = d2_resnet_shapes(shapes, b, conv, norm)
    c = m.fpn.channels
    for level, ci in zip((2, 3, 4, 5), stage_channels):
        for name, cin, k in ((f"backbone.fpn_lateral{level}", ci, 1), (f"backbone.fpn_output{level}", c, 3)):
            conv(name, c, cin, k, bias=not m.fpn.norm)
            if m.fpn.norm:
                norm(name, c)
    d2_rpn_and_roi_heads(shapes, config)
    return shapes


def d2_resnet_shapes(shapes: dict, b, conv, norm) -> list[int]:
    """detectron2's ResNet (BasicStem and the res2..res5 stages) keys for model.backbone `b`;
    returns the stages' output widths."""
    conv("backbone.bottom_up.stem.conv1", b.stem_channels, 3, 7, bias=False)
    norm("backbone.bottom_up.stem.conv1", b.stem_channels)
    blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[b.depth]
    cin, cout, bott, stage_channels = b.stem_channels, b.res2_out_channels, b.bottleneck_channels, []
    for s, n in enumerate(blocks):
        for i in range(n):
            p = f"backbone.bottom_up.res{s + 2}.{i}"
            stride = 2 if (i == 0 and s > 0) else 1
            convs = ([(cout, cin, 3), (cout, cout, 3)] if b.depth < 50
                     else [(bott, cin, 1), (bott, bott, 3), (cout, bott, 1)])
            if cin != cout or (b.depth < 50 and stride != 1):
                conv(f"{p}.shortcut", cout, cin, 1, bias=False)
                norm(f"{p}.shortcut", cout)
            for j, (o, ci, k) in enumerate(convs):
                conv(f"{p}.conv{j + 1}", o, ci, k, bias=False)
                norm(f"{p}.conv{j + 1}", o)
            cin = cout
        stage_channels.append(cout)
        cout, bott = cout * 2, bott * 2
    return stage_channels


# RegNet stage widths, depths, group width and SE ratio as pycls publishes them (RegNetX-4.0GF,
# RegNetY-4.0GF), written out rather than derived from (w_a, w_0, w_m).
D2_REGNETS = {"regnetx_4gf": ((80, 240, 560, 1360), (2, 5, 14, 2), 40, 0.0),
              "regnety_4gf": ((128, 192, 512, 1088), (2, 6, 12, 2), 64, 0.25)}


def d2_regnet_shapes(shapes: dict, name: str, norm_kind: str) -> list[int]:
    """detectron2's RegNet keys (modeling/backbone/regnet.py: SimpleStem, ResBottleneckBlock
    with bottleneck ratio 1, SE in RegNetY); returns the stages' output widths."""
    widths, depths, group_width, se_ratio = D2_REGNETS[name]
    root = "backbone.bottom_up"

    def bn(key, c):
        for r in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{key}.{r}"] = (c,)
        if norm_kind == "SyncBN":
            shapes[f"{key}.num_batches_tracked"] = ()

    shapes[f"{root}.stem.conv.weight"] = (32, 3, 3, 3)
    bn(f"{root}.stem.bn", 32)
    w_in = 32
    for s, (w, d) in enumerate(zip(widths, depths)):
        for i in range(d):
            p = f"{root}.s{s + 1}.b{i + 1}"
            if i == 0:                                      # stride 2 (and a new width): a projection
                shapes[f"{p}.proj.weight"] = (w, w_in, 1, 1)
                bn(f"{p}.bn", w)
            shapes[f"{p}.f.a.weight"] = (w, w_in, 1, 1)
            bn(f"{p}.f.a_bn", w)
            shapes[f"{p}.f.b.weight"] = (w, group_width, 3, 3)     # groups = w / group_width
            bn(f"{p}.f.b_bn", w)
            if se_ratio:
                se = int(round(w_in * se_ratio))
                shapes[f"{p}.f.se.f_ex.0.weight"], shapes[f"{p}.f.se.f_ex.0.bias"] = (se, w, 1, 1), (se,)
                shapes[f"{p}.f.se.f_ex.2.weight"], shapes[f"{p}.f.se.f_ex.2.bias"] = (w, se, 1, 1), (w,)
            shapes[f"{p}.f.c.weight"] = (w, w, 1, 1)
            bn(f"{p}.f.c_bn", w)
            w_in = w
    return list(widths)


def d2_rpn_and_roi_heads(shapes: dict, config) -> None:
    """Adds detectron2's RPN and ROI heads keys for a config: StandardRPNHead (one conv `conv`, or
    `conv.conv0`, `conv.conv1`, ... for conv_dims [-1, -1]), FastRCNNConvFCHead (convs with
    conv_norm, then FCs), the mask head's convs (with conv_norm), deconv and predictor, and the
    boundary-preserving head's. detectron2's Conv2d(norm=...) has no bias and keeps the norm
    under `.norm`: LayerNorm's weight and bias, BatchNorm's also running_mean and running_var."""
    m = config.model

    def conv(name, cout, cin, k, norm=""):
        shapes[f"{name}.weight"] = (cout, cin, k, k)
        if not norm:
            shapes[f"{name}.bias"] = (cout,)
        roles = {"": (), "LN": ("weight", "bias"), "SyncBN": ("weight", "bias", "running_mean", "running_var")}[norm]
        for r in roles:
            shapes[f"{name}.norm.{r}"] = (cout,)
        if norm == "SyncBN":
            shapes[f"{name}.norm.num_batches_tracked"] = ()

    def linear(name, out_f, in_f):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out_f, in_f), (out_f,)

    def deconv(name, cin, cout):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cin, cout, 2, 2), (cout,)

    c, a = m.fpn.channels, len(m.anchors.aspect_ratios)
    rpn = "proposal_generator.rpn_head"
    for k in range(m.rpn.num_convs):
        conv(f"{rpn}.conv" if m.rpn.num_convs == 1 else f"{rpn}.conv.conv{k}", c, c, 3)
    conv(f"{rpn}.objectness_logits", a, c, 1)
    conv(f"{rpn}.anchor_deltas", 4 * a, c, 1)
    r, fc, k = m.roi_heads.pooler_resolution, m.roi_heads.fc_dim, m.num_classes
    cascade = m.roi_heads.get("cascade") is not None and m.roi_heads.cascade.enabled
    stages = [f".{s}" for s in range(len(m.roi_heads.cascade.iou_thresholds))] if cascade else [""]
    deltas = 4 if cascade or m.roi_heads.get("class_agnostic_bbox_reg", False) else 4 * k
    for st in stages:                    # CascadeROIHeads: box_head.{stage}, box_predictor.{stage}
        cin = c
        for i, dim in enumerate(m.roi_heads.conv_dims):
            conv(f"roi_heads.box_head{st}.conv{i + 1}", dim, cin, 3, m.roi_heads.conv_norm)
            cin = dim
        cin = cin * r * r
        for i in range(m.roi_heads.num_fc):
            linear(f"roi_heads.box_head{st}.fc{i + 1}", fc, cin)
            cin = fc
        linear(f"roi_heads.box_predictor{st}.cls_score", k + 1, fc)
        linear(f"roi_heads.box_predictor{st}.bbox_pred", deltas, fc)
    dm, mh, norm = m.mask_head.conv_dim, "roi_heads.mask_head", m.mask_head.conv_norm
    for i in range(m.mask_head.num_conv):
        conv(f"{mh}.mask_fcn{i + 1}", dm, c if i == 0 else dm, 3, norm)
    if m.mask_head.name == "bmask":
        conv(f"{mh}.downsample", dm, c, 3, norm)
        conv(f"{mh}.mask_to_boundary", dm, dm, 1, norm)
        for i in range(m.boundary.num_conv):
            conv(f"{mh}.boundary_fcn{i + 1}", dm, dm, 3, norm)
        conv(f"{mh}.boundary_to_mask", dm, dm, 1, norm)
        conv(f"{mh}.mask_final_fusion", dm, dm, 3, norm)
        for name in ("mask_deconv", "boundary_deconv"):
            deconv(f"{mh}.{name}", dm, dm)
        for name in ("mask_predictor", "boundary_predictor"):
            conv(f"{mh}.{name}", k, dm, 1)
    else:
        deconv(f"{mh}.deconv", dm, dm)
        conv(f"{mh}.predictor", k, dm, 1)


def d2_vitdet_shapes(config) -> dict[str, tuple]:
    """{detectron2 key: torch shape} of a ViTDet Mask R-CNN (or BMask R-CNN head) for a config,
    written from detectron2's modeling/backbone/vit.py (ViT, SimpleFeaturePyramid), StandardRPNHead
    with conv_dims [-1, -1], FastRCNNConvFCHead with conv_norm "LN" and the mask head with LN
    convs: detectron2's Conv2d(norm=...) has no bias and keeps the norm under `.norm`."""
    m, v = config.model, config.model.backbone.vit
    shapes = {}
    d, p, c = v.embed_dim, v.patch_size, m.fpn.channels

    def linear(name, out_f, in_f):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out_f, in_f), (out_f,)

    def ln(name, ch):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (ch,), (ch,)

    def conv(name, cout, cin, k, norm=""):
        shapes[f"{name}.weight"] = (cout, cin, k, k)
        if norm:
            ln(f"{name}.norm", cout)
        else:
            shapes[f"{name}.bias"] = (cout,)

    def deconv(name, cin, cout):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cin, cout, 2, 2), (cout,)

    net = "backbone.net"
    shapes[f"{net}.patch_embed.proj.weight"], shapes[f"{net}.patch_embed.proj.bias"] = (d, 3, p, p), (d,)
    shapes[f"{net}.pos_embed"] = (1, (v.pretrain_img_size // p) ** 2 + int(v.pretrain_use_cls_token), d)
    for i in range(v.depth):
        b = f"{net}.blocks.{i}"
        size = v.img_size // p if i in tuple(v.global_blocks) else v.window_size
        ln(f"{b}.norm1", d)
        linear(f"{b}.attn.qkv", 3 * d, d)
        linear(f"{b}.attn.proj", d, d)
        shapes[f"{b}.attn.rel_pos_h"] = shapes[f"{b}.attn.rel_pos_w"] = (2 * size - 1, d // v.num_heads)
        ln(f"{b}.norm2", d)
        linear(f"{b}.mlp.fc1", int(d * v.mlp_ratio), d)
        linear(f"{b}.mlp.fc2", d, int(d * v.mlp_ratio))
    deconv("backbone.simfp_2.0", d, d // 2)
    ln("backbone.simfp_2.1", d // 2)
    deconv("backbone.simfp_2.3", d // 2, d // 4)
    conv("backbone.simfp_2.4", c, d // 4, 1, "LN")
    conv("backbone.simfp_2.5", c, c, 3, "LN")
    deconv("backbone.simfp_3.0", d, d // 2)
    conv("backbone.simfp_3.1", c, d // 2, 1, "LN")
    conv("backbone.simfp_3.2", c, c, 3, "LN")
    conv("backbone.simfp_4.0", c, d, 1, "LN")
    conv("backbone.simfp_4.1", c, c, 3, "LN")
    conv("backbone.simfp_5.1", c, d, 1, "LN")          # simfp_5.0 is the max-pool
    conv("backbone.simfp_5.2", c, c, 3, "LN")
    d2_rpn_and_roi_heads(shapes, config)
    return shapes


def random_d2_checkpoint(config, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    layout = d2_vitdet_shapes(config) if config.model.backbone.name == "vit" else d2_shapes(config)
    for key, shape in layout.items():
        if key.endswith("running_var"):
            out[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif key.endswith("norm.weight"):
            out[key] = rng.uniform(0.8, 1.2, shape).astype(np.float32)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 100
            out[key] = (rng.normal(size=shape) / np.sqrt(fan_in)).astype(np.float32)
    return out


D2_PIXELS = {"pixel_mean": np.array([103.53, 116.28, 123.675], np.float32).reshape(3, 1, 1),
             "pixel_std": np.ones((3, 1, 1), np.float32)}


def d2_to_msra(name: str) -> str:
    """detectron2 backbone module names -> Detectron (Caffe2) blob prefixes."""
    name = name.replace("stem.conv1.norm", "res_conv1_bn").replace("stem.conv1", "conv1")
    for j, branch in ((1, "2a"), (2, "2b"), (3, "2c")):
        name = name.replace(f".conv{j}", f"_branch{branch}")
    return name.replace(".shortcut", "_branch1").replace(".norm", "_bn").replace(".", "_")


def msra_blobs(d2_checkpoint: dict) -> dict[str, np.ndarray]:
    """The backbone of a detectron2-layout checkpoint as detectron2's ImageNet R-50.pkl holds
    it (Caffe2 blobs; the BN already folded to scale/shift: here simply weight/bias)."""
    blobs = {}
    for key, value in d2_checkpoint.items():
        if key.startswith("backbone.bottom_up.") and not key.endswith(("running_mean", "running_var")):
            stem, leaf = key[len("backbone.bottom_up."):].rsplit(".", 1)
            if stem.endswith("norm"):
                blobs[d2_to_msra(stem) + {"weight": "_s", "bias": "_b"}[leaf]] = value
            else:
                blobs[d2_to_msra(stem) + "_w"] = value
    return blobs


# ---------------------------------------------------------------------------------------------
# A Cityscapes tree in the official layout, made from the synthetic shapes
# ---------------------------------------------------------------------------------------------

# Shape class -> Cityscapes labelId (person, car, truck, bus, bicycle).
SHAPE_TO_CITYSCAPES = (24, 26, 27, 28, 33)
CITYSCAPES_CITIES = {"train": ("aachen", "bremen"), "val": ("frankfurt", "lindau"), "test": ("berlin",)}


def write_cityscapes_from_shapes(root, counts=None, image_size=(64, 128)) -> dict:
    """leftImg8bit/{split}/{city}/{city}_{seq:06d}_000019_leftImg8bit.png and gtFine's
    _instanceIds (16-bit: labelId * 1000 + k) and _labelIds PNGs from SyntheticShapes images,
    road below and sky above; the test split gets all-void placeholders, as the real one.
    Returns {split: [instanceIds paths]}."""
    import os

    from PIL import Image

    from bmask_jax.data.synthetic import SyntheticShapes
    counts = counts or {"train": 4, "val": 2, "test": 2}
    written = {}
    for split, n in counts.items():
        shapes = SyntheticShapes("val" if split == "test" else split, num_images=n, image_size=image_size,
                                 seed=7, max_instances=4, min_size=16, max_size=40)
        cities = CITYSCAPES_CITIES[split]
        written[split] = []
        for i in range(n):
            ex = shapes[i]
            city = cities[i % len(cities)]
            stem = f"{city}_{i:06d}_000019"
            label_ids = np.full(image_size, 7, np.uint8)          # road
            label_ids[: image_size[0] // 8] = 23                  # sky
            instance_ids = label_ids.astype(np.uint16)
            for k, (cls, mask) in enumerate(zip(ex["classes"], ex["masks"])):
                label = SHAPE_TO_CITYSCAPES[int(cls)]
                label_ids[mask > 0] = label
                instance_ids[mask > 0] = label * 1000 + k
            if split == "test":
                label_ids[:] = 0
                instance_ids[:] = 0
            for top in ("leftImg8bit", "gtFine"):
                os.makedirs(os.path.join(root, top, split, city), exist_ok=True)
            Image.fromarray(ex["image"]).save(os.path.join(root, "leftImg8bit", split, city, f"{stem}_leftImg8bit.png"))
            gt = os.path.join(root, "gtFine", split, city, f"{stem}_gtFine_instanceIds.png")
            Image.fromarray(instance_ids).save(gt)
            Image.fromarray(label_ids).save(os.path.join(root, "gtFine", split, city, f"{stem}_gtFine_labelIds.png"))
            written[split].append(gt)
    return written


def scale_d2_predictors(model, run) -> None:
    """Draws a detectron2 model's RPN and box predictors anew, scaled to the features they see
    when run() runs the model on the test image (logits over a few units, moderate deltas), so
    that tiny float differences between two implementations cannot reorder anything."""
    import torch
    rpn = model.proposal_generator.rpn_head
    rpn_features, box_features = [], []
    hook = rpn.conv.register_forward_hook(lambda _m, _i, out: rpn_features.append(torch.relu(out)))
    run()
    hook.remove()
    with torch.no_grad():
        rpn_norm = float(torch.cat([f.norm(dim=1).flatten() for f in rpn_features]).mean())
        rpn.objectness_logits.weight.normal_(0, 2.0 / rpn_norm)
        rpn.anchor_deltas.weight.normal_(0, 0.2 / rpn_norm)
    heads = model.roi_heads.box_head
    heads = list(heads) if isinstance(heads, torch.nn.ModuleList) else [heads]
    predictors = model.roi_heads.box_predictor
    predictors = list(predictors) if isinstance(predictors, torch.nn.ModuleList) else [predictors]
    hook = heads[0].register_forward_hook(lambda _m, _i, out: box_features.append(out))
    run()
    hook.remove()
    with torch.no_grad():
        box_norm = float(box_features[0].norm(dim=1).mean())
        for p in predictors:
            p.cls_score.weight.normal_(0, 2.0 / box_norm)
            p.bbox_pred.weight.normal_(0, 0.2 / box_norm)


def assert_same_detections(ours: dict, theirs: dict, label: str = "", score_atol: float = 1e-5) -> dict:
    """detectron2's detections (boxes, scores, classes, masks) against ours: each of theirs is
    paired with ours of the same class and nearest box (the score order alone is ambiguous
    where two scores agree to float precision); classes equal, scores within 1e-4, boxes within
    0.02 px, every mask IoU above 0.98 or a single pixel apart (a pixel whose pasted value lies
    at the 0.5 threshold within float noise can flip: in a 12-pixel mask that alone is IoU 0.92).
    Returns (and prints) the differences measured."""
    n = len(theirs["scores"])
    assert len(ours["scores"]) == n, (len(ours["scores"]), n)
    cost = np.abs(ours["boxes"][:, None] - theirs["boxes"][None]).max(-1)
    cost[ours["classes"][:, None] != theirs["classes"][None]] = np.inf
    pair = np.argmin(cost, axis=0)
    assert len(set(pair.tolist())) == n, "two of their detections pair with the same one of ours"
    mo, mt = ours["masks"][pair], theirs["masks"]
    union = (mo | mt).reshape(n, -1).sum(1)
    iou = np.where(union > 0, (mo & mt).reshape(n, -1).sum(1) / np.maximum(union, 1), 1.0)
    figures = {"detections": n, "max_score_diff": float(np.abs(ours["scores"][pair] - theirs["scores"]).max()),
               "max_box_diff_px": float(np.abs(ours["boxes"][pair] - theirs["boxes"]).max()),
               "min_mask_iou": float(iou.min()), "mask_pixels_differing": int((mo ^ mt).sum()),
               "mask_pixels": int(mt.sum())}
    print(label, figures)
    np.testing.assert_array_equal(ours["classes"][pair], theirs["classes"])
    np.testing.assert_allclose(ours["scores"][pair], theirs["scores"], rtol=1e-4, atol=score_atol)
    np.testing.assert_allclose(ours["boxes"][pair], theirs["boxes"], atol=0.02)
    differing = (mo ^ mt).reshape(n, -1).sum(1)
    assert ((iou > 0.98) | (differing <= 1)).all(), (iou, differing)
    return figures


# ---------------------------------------------------------------------------------------------
# An HTTP server on 127.0.0.1 for the download tests (nothing leaves the machine)
# ---------------------------------------------------------------------------------------------

class FileServer:
    """Serves {path: bytes}. Per path, `how[path]` is a dict of:
    drip: seconds between bytes; stall_after: bytes sent before it goes silent (for `stall_s`);
    cut: bytes sent before it hangs up; length: the Content-Length it claims (None: none);
    times: how many requests it behaves so (then it serves the file plainly)."""

    def __init__(self):
        self.files, self.how, self.requests = {}, {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                server.requests.append(self.path)
                body = server.files.get(self.path.split("?")[0])
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                how = server.how.get(self.path, {})
                if how.get("times", 1) <= 0:
                    how = {}
                elif how:
                    how["times"] = how.get("times", 1) - 1
                self.send_response(200)
                length = how.get("length", len(body))
                if length is not None:
                    self.send_header("Content-Length", str(length))
                self.end_headers()
                try:
                    if "drip" in how:
                        for k in range(len(body)):
                            self.wfile.write(body[k:k + 1])
                            self.wfile.flush()
                            time.sleep(how["drip"])
                    elif "stall_after" in how:
                        self.wfile.write(body[:how["stall_after"]])
                        self.wfile.flush()
                        time.sleep(how["stall_s"])
                    else:
                        self.wfile.write(body[:how.get("cut", len(body))])
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def file_server():
    s = FileServer()
    yield s
    s.close()


@pytest.fixture
def weights_home(tmp_path, monkeypatch):
    """An empty $BMASK_JAX_HOME of the test's own, and no mirror unless the test sets one."""
    home = tmp_path / "home"
    monkeypatch.setenv("BMASK_JAX_HOME", str(home))
    monkeypatch.delenv("BMASK_JAX_MIRROR", raising=False)
    return home
