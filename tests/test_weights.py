"""Weight import (bmask_jax/weights/).

PyTorch reference modules written like detectron2's (FrozenBatchNorm2d, Conv2d with a norm,
BottleneckBlock, BasicStem, FPN) and torchvision's ResNet are built by hand with random
weights, saved with torch.save (zip and legacy) or as numpy pickles under the checkpoint
names, read back with our reader (never torch.load) and run through our Flax modules: outputs
must match. A whole random detectron2-layout BMask R-CNN checkpoint of a tiny config goes
through the import, an Orbax round trip and the command. Malicious pickles are refused
without running anything.
"""
import os
import pickle
import subprocess
import sys
import zipfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import D2_PIXELS, d2_shapes, d2_to_msra, msra_blobs, random_d2_checkpoint, tiny_config  # noqa: F401

from bmask_jax import weights

from bmask_jax.engine import checkpoints
from bmask_jax.models.bmask_rcnn import BMaskRCNN
from bmask_jax.models.box_head import BoxHead, BoxPredictor
from bmask_jax.models.fpn import FPN
from bmask_jax.models.layers import Conv, Deconv2x, FrozenBatchNorm
from bmask_jax.models.resnet import BottleneckBlock, ResNet
from bmask_jax.engine.state import create_train_state, new_train_state
from bmask_jax.engine.variables import init_variables

try:
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(1)
except ImportError:          # pragma: no cover - CI installs the 'test' extra, which has torch
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed (pip install -e '.[torch]'): "
                                 "it writes the reference checkpoints and computes the reference outputs")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def assert_close(ours, theirs, tol=1e-4):
    """|ours - theirs| <= tol * max(1, max |theirs|), elementwise."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    scale = max(1.0, float(np.abs(theirs).max()))
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=tol * scale)


def nhwc(t):
    return jnp.asarray(t.detach().numpy().transpose(0, 2, 3, 1))


def nchw_np(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


def numpy_state(state_dict, prefix=""):
    return {prefix + k: v.detach().numpy() for k, v in state_dict.items()}


def write_checkpoint(tmp_path, state_dict, container, prefix="", name="model"):
    """Write {prefix + name: tensor} as a detectron2-style file: a torch.save zip ('pth'), the
    legacy torch stream ('pth_legacy'), a wrapped numpy pickle ('pkl', as the model zoo's) or a
    flat protocol-2 numpy pickle ('pkl_flat', as Detectron's blobs)."""
    named = {prefix + k: v for k, v in state_dict.items()}
    if container.startswith("pth"):
        path = tmp_path / f"{name}.pth"
        torch.save({"model": named, "iteration": 3}, path,
                   _use_new_zipfile_serialization=container == "pth")
    else:
        path = tmp_path / f"{name}.pkl"
        arrays = {k: v.detach().numpy() for k, v in named.items()}
        obj = arrays if container == "pkl_flat" else {"model": arrays, "__author__": "test",
                                                      "matching_heuristics": True}
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2 if container == "pkl_flat" else pickle.HIGHEST_PROTOCOL)
    return str(path)


def abstract_variables(module, *inputs):
    """Shapes of a module's variables as zeros (no compilation)."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *inputs))
    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def import_into(module_path: tuple, variables: dict, path: str, kind="auto", **kw):
    """Import a checkpoint file into one module's variables placed at module_path of the
    model tree; returns its converted variables and the report."""
    def nest(tree):
        for name in reversed(module_path):
            tree = {name: tree}
        return tree

    def unnest(tree):
        for name in module_path:
            tree = tree[name]
        return tree

    params, frozen, report = weights.convert(weights.read_checkpoint(path), nest(variables.get("params", {})),
                                             nest(variables.get("frozen", {})), kind, path, **kw)
    out = {"params": unnest(params)} if variables.get("params") else {}
    if variables.get("frozen"):
        out["frozen"] = unnest(frozen)
    return out, report


# ---------------------------------------------------------------------------------------------
# PyTorch references, written like detectron2 and torchvision
# ---------------------------------------------------------------------------------------------

if torch is not None:
    class TorchFrozenBN(torch.nn.Module):
        """detectron2.layers.FrozenBatchNorm2d."""

        def __init__(self, c):
            super().__init__()
            self.register_buffer("weight", 1 + 0.2 * torch.randn(c))
            self.register_buffer("bias", 0.2 * torch.randn(c))
            self.register_buffer("running_mean", 0.2 * torch.randn(c))
            self.register_buffer("running_var", 0.5 + torch.rand(c))

        def forward(self, x):
            scale = self.weight * (self.running_var + 1e-5).rsqrt()
            bias = self.bias - self.running_mean * scale
            return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)

    class D2Conv(torch.nn.Conv2d):
        """detectron2.layers.Conv2d: padding k // 2 and an optional norm inside."""

        def __init__(self, cin, cout, k, stride=1, bias=False, norm=True):
            super().__init__(cin, cout, k, stride, padding=k // 2, bias=bias)
            self.norm = TorchFrozenBN(cout) if norm else None

        def forward(self, x):
            x = super().forward(x)
            return self.norm(x) if self.norm is not None else x

    class D2Bottleneck(torch.nn.Module):
        """detectron2.modeling.backbone.resnet.BottleneckBlock."""

        def __init__(self, cin, cout, bottleneck, stride, stride_in_1x1):
            super().__init__()
            self.shortcut = D2Conv(cin, cout, 1, stride) if cin != cout else None
            s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
            self.conv1 = D2Conv(cin, bottleneck, 1, s1)
            self.conv2 = D2Conv(bottleneck, bottleneck, 3, s3)
            self.conv3 = D2Conv(bottleneck, cout, 1)

        def forward(self, x):
            out = F.relu(self.conv2(F.relu(self.conv1(x))))
            out = self.conv3(out)
            return F.relu(out + (self.shortcut(x) if self.shortcut is not None else x))

    class D2Stem(torch.nn.Module):
        """detectron2's BasicStem: 7x7/2 conv + norm, ReLU, 3x3/2 max-pool with padding 1."""

        def __init__(self, cout):
            super().__init__()
            self.conv1 = D2Conv(3, cout, 7, 2)

        def forward(self, x):
            return F.max_pool2d(F.relu(self.conv1(x)), kernel_size=3, stride=2, padding=1)

    def d2_stage(cin, cout, bottleneck, num_blocks, stride, stride_in_1x1):
        return torch.nn.Sequential(*[D2Bottleneck(cin if i == 0 else cout, cout, bottleneck,
                                                  stride if i == 0 else 1, stride_in_1x1)
                                     for i in range(num_blocks)])

    class D2ResNet(torch.nn.Module):
        """detectron2's ResNet: stem, res2..res5; state-dict keys stem.conv1.*, res2.0.conv1.*"""

        def __init__(self, stem, res2_out, bottleneck, blocks, stride_in_1x1):
            super().__init__()
            self.stem = D2Stem(stem)
            cin, cout = stem, res2_out
            for s, n in enumerate(blocks):
                self.add_module(f"res{s + 2}", d2_stage(cin, cout, bottleneck, n, 1 if s == 0 else 2,
                                                        stride_in_1x1))
                cin, cout, bottleneck = cout, cout * 2, bottleneck * 2

        def forward(self, x):
            x = self.stem(x)
            out = {}
            for s in range(2, 6):
                x = out[f"res{s}"] = getattr(self, f"res{s}")(x)
            return out

    class D2FPN(torch.nn.Module):
        """detectron2's FPN top-down (sum after nearest 2x) with LastLevelMaxPool."""

        def __init__(self, in_channels, out):
            super().__init__()
            for level, c in zip((2, 3, 4, 5), in_channels):
                self.add_module(f"fpn_lateral{level}", torch.nn.Conv2d(c, out, 1))
                self.add_module(f"fpn_output{level}", torch.nn.Conv2d(out, out, 3, padding=1))

        def forward(self, feats):
            prev = self.fpn_lateral5(feats[3])
            results = [self.fpn_output5(prev)]
            for level in (4, 3, 2):
                top_down = F.interpolate(prev, scale_factor=2.0, mode="nearest")
                prev = getattr(self, f"fpn_lateral{level}")(feats[level - 2]) + top_down
                results.insert(0, getattr(self, f"fpn_output{level}")(prev))
            results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0))
            return dict(zip(("p2", "p3", "p4", "p5", "p6"), results))

    class TVBottleneck(torch.nn.Module):
        """torchvision.models.resnet.Bottleneck (stride in the 3x3 conv), eval-mode BatchNorm."""

        def __init__(self, cin, width, cout, stride):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(cin, width, 1, bias=False)
            self.bn1 = torch.nn.BatchNorm2d(width)
            self.conv2 = torch.nn.Conv2d(width, width, 3, stride, padding=1, bias=False)
            self.bn2 = torch.nn.BatchNorm2d(width)
            self.conv3 = torch.nn.Conv2d(width, cout, 1, bias=False)
            self.bn3 = torch.nn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride, bias=False),
                                                      torch.nn.BatchNorm2d(cout))

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = F.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return F.relu(out + (self.downsample(x) if self.downsample is not None else x))

    class TVResNet(torch.nn.Module):
        """torchvision.models.resnet.ResNet with Bottleneck blocks, base width `width`."""

        def __init__(self, width, blocks):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.bn1 = torch.nn.BatchNorm2d(width)
            cin = width
            for i, n in enumerate(blocks):
                w = width * 2 ** i
                layer = [TVBottleneck(cin if j == 0 else 4 * w, w, 4 * w, (1 if i == 0 else 2) if j == 0 else 1)
                         for j in range(n)]
                self.add_module(f"layer{i + 1}", torch.nn.Sequential(*layer))
                cin = 4 * w
            self.fc = torch.nn.Linear(cin, 10)
            for m in self.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.weight.data = 1 + 0.2 * torch.randn_like(m.weight)
                    m.bias.data = 0.2 * torch.randn_like(m.bias)
                    m.running_mean = 0.2 * torch.randn_like(m.running_mean)
                    m.running_var = 0.5 + torch.rand_like(m.running_var)
            self.eval()

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
            out = {}
            for i in range(4):
                x = out[f"res{i + 2}"] = getattr(self, f"layer{i + 1}")(x)
            return out


# ---------------------------------------------------------------------------------------------
# single layers
# ---------------------------------------------------------------------------------------------

@needs_torch
@pytest.mark.parametrize("container", ["pth", "pth_legacy", "pkl", "pkl_flat"])
@pytest.mark.parametrize("kernel,stride", [(3, 1), (3, 2), (1, 1)])
def test_conv_matches_torch(tmp_path, container, kernel, stride):
    torch.manual_seed(0)
    ref = D2Conv(6, 5, kernel, stride, bias=True, norm=False)
    x = torch.randn(2, 6, 9, 11)
    path = write_checkpoint(tmp_path, ref.state_dict(), container, "roi_heads.mask_head.mask_fcn1.")
    conv = Conv(5, kernel, stride)
    variables, report = import_into(("mask_head", "mask_fcn1"), abstract_variables(conv, nhwc(x)), path)
    assert report.loaded == ["roi_heads.mask_head.mask_fcn1.weight", "roi_heads.mask_head.mask_fcn1.bias"]
    assert_close(nchw_np(conv.apply(variables, nhwc(x))), ref(x).detach().numpy())


@needs_torch
def test_frozen_bn_matches_torch(tmp_path):
    torch.manual_seed(1)
    ref = TorchFrozenBN(7)
    x = torch.randn(2, 7, 4, 5)
    path = write_checkpoint(tmp_path, ref.state_dict(), "pth", "backbone.bottom_up.stem.conv1.norm.")
    bn = FrozenBatchNorm()
    variables, report = import_into(("backbone", "stem_norm"), abstract_variables(bn, nhwc(x)), path)
    assert set(variables) == {"frozen"} and len(report.loaded) == 4
    assert_close(nchw_np(bn.apply(variables, nhwc(x))), ref(x).detach().numpy())


@needs_torch
def test_transposed_conv_matches_torch(tmp_path):
    torch.manual_seed(2)
    ref = torch.nn.ConvTranspose2d(6, 4, 2, stride=2)
    x = torch.randn(3, 6, 7, 7)
    path = write_checkpoint(tmp_path, ref.state_dict(), "pth", "roi_heads.mask_head.boundary_deconv.")
    deconv = Deconv2x(4)
    variables, _ = import_into(("mask_head", "boundary_branch", "boundary_deconv"),
                               abstract_variables(deconv, nhwc(x)), path)
    assert_close(nchw_np(deconv.apply(variables, nhwc(x))), ref(x).detach().numpy())


@needs_torch
def test_box_head_and_predictor_match_torch_incl_chw_flatten(tmp_path):
    """fc1 sees the 7x7 RoI features flattened (C, H, W) in detectron2 and (H, W, C) here."""
    torch.manual_seed(3)
    c, res, fc, k = 6, 7, 16, 3
    fc1, fc2 = torch.nn.Linear(c * res * res, fc), torch.nn.Linear(fc, fc)
    cls_score, bbox_pred = torch.nn.Linear(fc, k + 1), torch.nn.Linear(fc, 4 * k)
    sd = {**{f"roi_heads.box_head.fc1.{n}": v for n, v in fc1.state_dict().items()},
          **{f"roi_heads.box_head.fc2.{n}": v for n, v in fc2.state_dict().items()},
          **{f"roi_heads.box_predictor.cls_score.{n}": v for n, v in cls_score.state_dict().items()},
          **{f"roi_heads.box_predictor.bbox_pred.{n}": v for n, v in bbox_pred.state_dict().items()}}
    path = write_checkpoint(tmp_path, sd, "pkl")
    x = torch.randn(4, c, res, res)
    hidden = F.relu(fc2(F.relu(fc1(x.flatten(1)))))
    head, predictor = BoxHead(2, fc), BoxPredictor(k)
    target_params = {"box_head": abstract_variables(head, nhwc(x))["params"],
                     "box_predictor": abstract_variables(predictor, jnp.zeros((1, fc)))["params"]}
    params, _, report = weights.convert(weights.read_checkpoint(path), target_params, {}, "detectron2",
                                        path, roi_channels=c)
    assert len(report.loaded) == 8
    ours = head.apply({"params": params["box_head"]}, nhwc(x))
    assert_close(ours, hidden.detach().numpy())
    logits, deltas = predictor.apply({"params": params["box_predictor"]}, ours)
    assert_close(logits, cls_score(hidden).detach().numpy())
    assert_close(deltas, bbox_pred(hidden).detach().numpy())


def test_dense_kernel_chw_permutation():
    """kernel[(h, w, c)] = weight[:, (c, h, w)], by brute force."""
    c, h, w, out = 3, 2, 4, 5
    weight = np.random.default_rng(0).normal(size=(out, c * h * w))
    kernel = weights.dense_kernel(weight, (c, h, w))
    for ci in range(c):
        for hi in range(h):
            for wi in range(w):
                np.testing.assert_array_equal(kernel[(hi * w + wi) * c + ci], weight[:, (ci * h + hi) * w + wi])


# ---------------------------------------------------------------------------------------------
# ResNet stage, whole backbones (detectron2, torchvision, MSRA), FPN
# ---------------------------------------------------------------------------------------------

class Stage(nn.Module):
    """Blocks res3_0.. of our ResNet, on their own."""
    num_blocks: int
    out_channels: int
    bottleneck: int
    stride_in_1x1: bool

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_blocks):
            x = BottleneckBlock(self.out_channels, self.bottleneck, 2 if i == 0 else 1, self.stride_in_1x1,
                                "FrozenBN", name=f"res3_{i}")(x)
        return x


@needs_torch
@pytest.mark.parametrize("stride_in_1x1", [True, False])
def test_resnet_stage_matches_detectron2_bottleneck_blocks(tmp_path, stride_in_1x1):
    torch.manual_seed(4)
    ref = d2_stage(8, 16, 4, 3, 2, stride_in_1x1)
    x = torch.randn(2, 8, 12, 10)
    path = write_checkpoint(tmp_path, ref.state_dict(), "pth", "backbone.bottom_up.res3.")
    stage = Stage(3, 16, 4, stride_in_1x1)
    variables, report = import_into(("backbone",), abstract_variables(stage, nhwc(x)), path)
    assert len(report.loaded) == len(ref.state_dict())
    assert_close(nchw_np(stage.apply(variables, nhwc(x))), ref(x).detach().numpy())


NARROW_R50 = {"depth": 50, "stem_channels": 8, "res2_out_channels": 32, "bottleneck_channels": 8}


def check_backbone(variables, stride_in_1x1, reference, x):
    resnet = ResNet(**NARROW_R50, stride_in_1x1=stride_in_1x1, norm="FrozenBN", freeze_at=0)
    ours = resnet.apply(variables, nhwc(x))
    theirs = reference(x)
    for name in ("res2", "res3", "res4", "res5"):
        assert_close(nchw_np(ours[name]), theirs[name].detach().numpy())


def narrow_resnet_variables(x):
    return abstract_variables(ResNet(**NARROW_R50, norm="FrozenBN", freeze_at=0), nhwc(x))


@needs_torch
def test_detectron2_resnet_matches_torch(tmp_path):
    torch.manual_seed(5)
    ref = D2ResNet(8, 32, 8, (3, 4, 6, 3), stride_in_1x1=True)
    x = torch.randn(1, 3, 64, 64)
    path = write_checkpoint(tmp_path, ref.state_dict(), "pth", "backbone.bottom_up.")
    variables, report = import_into(("backbone",), narrow_resnet_variables(x), path)
    assert report.kind == "detectron2" and len(report.loaded) == len(ref.state_dict())
    check_backbone(variables, True, ref, x)


@needs_torch
def test_msra_pkl_backbone_matches_torch(tmp_path):
    """Caffe2 blobs: conv *_w, BN already folded into *_bn_s / *_bn_b; a flat protocol-2 pickle
    with the ImageNet classifier (pred_w/b) and '_momentum' blobs, which are ignored."""
    torch.manual_seed(6)
    ref = D2ResNet(8, 32, 8, (3, 4, 6, 3), stride_in_1x1=True)
    blobs = {"pred_w": np.zeros((10, 256), np.float32), "pred_b": np.zeros(10, np.float32),
             "conv1_w_momentum": np.zeros(1, np.float32)}
    for name, module in ref.named_modules():
        if isinstance(module, TorchFrozenBN):
            scale, shift = weights.frozen_bn(*(getattr(module, n).numpy() for n in
                                               ("weight", "bias", "running_mean", "running_var")))
            blobs[d2_to_msra(name) + "_s"], blobs[d2_to_msra(name) + "_b"] = scale, shift
        elif isinstance(module, torch.nn.Conv2d):
            blobs[d2_to_msra(name) + "_w"] = module.weight.detach().numpy()
    assert "res2_0_branch2a_w" in blobs and "res3_0_branch1_bn_s" in blobs and "res_conv1_bn_b" in blobs
    path = tmp_path / "R-50.pkl"
    with open(path, "wb") as f:
        pickle.dump({"blobs": blobs}, f, protocol=2)
    x = torch.randn(1, 3, 64, 64)
    variables, report = import_into(("backbone",), narrow_resnet_variables(x), str(path))
    assert report.kind == "msra"
    assert sorted(report.ignored) == ["pred_b", "pred_w"]
    assert report.config_changes["model.input_format"] == "BGR"
    assert report.config_changes["model.backbone.stride_in_1x1"] is True
    assert report.config_changes["model.pixel_std"] == (1.0, 1.0, 1.0)
    check_backbone(variables, True, ref, x)


@needs_torch
def test_torchvision_resnet_matches_torch(tmp_path):
    """torchvision names and real eval-mode nn.BatchNorm2d; the stride sits in the 3x3 conv."""
    torch.manual_seed(7)
    ref = TVResNet(8, (3, 4, 6, 3))
    x = torch.randn(1, 3, 64, 64)
    path = tmp_path / "resnet50.pth"
    torch.save(ref.state_dict(), path)            # a bare state dict, as torchvision's files
    variables, report = import_into(("backbone",), narrow_resnet_variables(x), str(path))
    assert report.kind == "torchvision"
    assert "fc.weight" in report.ignored and "layer1.0.bn1.num_batches_tracked" in report.ignored
    assert report.config_changes["model.input_format"] == "RGB"
    assert report.config_changes["model.backbone.stride_in_1x1"] is False
    check_backbone(variables, False, ref, x)


@needs_torch
def test_fpn_matches_detectron2_fpn(tmp_path):
    torch.manual_seed(8)
    in_channels, out = (8, 16, 32, 64), 12
    ref = D2FPN(in_channels, out)
    feats = [torch.randn(2, c, 32 // 2 ** i, 24 // 2 ** i) for i, c in enumerate(in_channels)]
    path = write_checkpoint(tmp_path, ref.state_dict(), "pth", "backbone.")
    fpn = FPN(out)
    ours_in = {f"res{i + 2}": nhwc(f) for i, f in enumerate(feats)}
    variables, report = import_into(("fpn",), abstract_variables(fpn, ours_in), path)
    assert len(report.loaded) == 16
    ours, theirs = fpn.apply(variables, ours_in), ref(feats)
    for name in ("p2", "p3", "p4", "p5", "p6"):
        assert_close(nchw_np(ours[name]), theirs[name].detach().numpy())


# ---------------------------------------------------------------------------------------------
# The reader: tensor geometry, dtypes, safety
# ---------------------------------------------------------------------------------------------

@needs_torch
@pytest.mark.parametrize("legacy", [False, True])
def test_torch_reader_dtypes_offsets_strides(tmp_path, legacy):
    torch.manual_seed(9)
    base = torch.randn(5, 6)
    tensors = {"transposed": base.t(), "offset_view": base.reshape(-1)[7:19].reshape(3, 4),
               "half": torch.randn(3, 2).half(), "bfloat16": torch.randn(4).bfloat16(),
               "int64": torch.arange(6).reshape(2, 3), "bool": torch.tensor([True, False]),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3), "param": torch.nn.Parameter(torch.ones(2))}
    path = tmp_path / "t.pth"
    torch.save({"state_dict": tensors}, path, _use_new_zipfile_serialization=not legacy)
    got = weights.read_checkpoint(str(path))
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        expected = t.detach().float().numpy() if t.dtype == torch.bfloat16 else t.detach().numpy()
        np.testing.assert_array_equal(np.asarray(got[name], expected.dtype), expected)
        assert got[name].shape == tuple(t.shape)


class _Evil:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _EvilEval:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return eval, (self.code,)


@pytest.mark.parametrize("evil", ["system", "eval"])
def test_malicious_pickle_is_refused_without_running(tmp_path, evil):
    marker = tmp_path / "pwned"
    payload = (_Evil(f"touch {marker}") if evil == "system"
               else _EvilEval(f"open({str(marker)!r}, 'w').close()"))
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"backbone.fpn_lateral2.weight": np.zeros(3), "x": payload}}, f)
    with pytest.raises(weights.UnsafeCheckpointError) as err:
        weights.read_checkpoint(str(path))
    assert str(path) in str(err.value)
    assert ("system" in str(err.value)) if evil == "system" else ("builtins.eval" in str(err.value))
    assert not marker.exists()


def test_malicious_torch_zip_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"model": _Evil(f"touch {marker}")}, protocol=2))
        zf.writestr("archive/version", "3\n")
    with pytest.raises(weights.UnsafeCheckpointError, match="system"):
        weights.read_checkpoint(str(path))
    assert not marker.exists()


@needs_torch
def test_tensor_reading_past_its_storage_is_an_error(tmp_path):
    path, bad = tmp_path / "ok.pth", tmp_path / "bad.pth"
    torch.save({"w": torch.arange(8, dtype=torch.float32)}, path)
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("/data/0"):
                data = data[:16]                     # 4 of the 8 floats
            dst.writestr(item.filename, data)
    with pytest.raises(weights.WeightImportError, match="past its storage"):
        weights.read_checkpoint(str(bad))


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "x.pkl"
    path.write_text("hello")
    with pytest.raises(weights.WeightImportError, match="neither a pickle"):
        weights.read_checkpoint(str(path))


# ---------------------------------------------------------------------------------------------
# Whole models: a detectron2-layout checkpoint of a tiny config, written from the config's numbers
# ---------------------------------------------------------------------------------------------

def frozen_bn_config(head="bmask"):
    c = tiny_config(head)
    c.model.backbone.norm = "FrozenBN"
    return c



@pytest.mark.parametrize("head", ["bmask", "maskrcnn"])
def test_new_train_state_without_init_has_create_train_state_structure(head):
    c = frozen_bn_config(head)
    ours = new_train_state(c, init=False)
    theirs = jax.eval_shape(lambda: create_train_state(c, BMaskRCNN(c.model), jax.random.PRNGKey(0))[0])
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(theirs)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
    assert int(ours.first_nonfinite_step) == -1 and int(ours.step) == 0


@pytest.mark.parametrize("head", ["bmask", "maskrcnn"])
def test_whole_detectron2_checkpoint_fills_every_parameter(head):
    c = frozen_bn_config(head)
    ckpt = random_d2_checkpoint(c)
    state = new_train_state(c, init=False)
    params, frozen, report = weights.convert({**ckpt, **D2_PIXELS}, jax.device_get(state.params),
                                             jax.device_get(state.frozen))
    assert report.kind == "detectron2" and not report.initialised_fresh
    assert sorted(report.loaded) == sorted(ckpt)
    assert sorted(report.ignored) == ["pixel_mean", "pixel_std"]
    n_ours = sum(x.size for x in jax.tree_util.tree_leaves((params, frozen)))
    n_theirs = sum(v.size for k, v in ckpt.items() if "running_" not in k)
    assert n_ours == n_theirs                    # FrozenBN: 4 arrays in, 2 (scale, shift) out
    # values land where their names say
    mh = "roi_heads.mask_head"
    if head == "bmask":
        np.testing.assert_array_equal(params["mask_head"]["boundary_fcn2"]["Conv_0"]["kernel"],
                                      ckpt[f"{mh}.boundary_fcn2.weight"].transpose(2, 3, 1, 0))
        np.testing.assert_array_equal(params["mask_head"]["boundary_branch"]["boundary_deconv"]["kernel"],
                                      ckpt[f"{mh}.boundary_deconv.weight"].transpose(2, 3, 0, 1))
    else:
        np.testing.assert_array_equal(params["mask_head"]["MaskPredictor_0"]["mask_predictor"]["Conv_0"]["bias"],
                                      ckpt[f"{mh}.predictor.bias"])
    np.testing.assert_array_equal(params["mask_head"]["mask_fcn3"]["Conv_0"]["kernel"],
                                  ckpt[f"{mh}.mask_fcn3.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["fpn"]["fpn_output4"]["Conv_0"]["bias"], ckpt["backbone.fpn_output4.bias"])
    p = "backbone.bottom_up.res3.1.conv2.norm"
    scale = ckpt[f"{p}.weight"] / np.sqrt(ckpt[f"{p}.running_var"] + 1e-5)
    np.testing.assert_allclose(frozen["backbone"]["res3_1"]["conv2_norm"]["scale"], scale, rtol=1e-6)
    np.testing.assert_allclose(frozen["backbone"]["res3_1"]["conv2_norm"]["shift"],
                               ckpt[f"{p}.bias"] - ckpt[f"{p}.running_mean"] * scale, rtol=1e-5, atol=1e-6)


def test_errors_name_missing_unexpected_and_misshaped_keys():
    c = frozen_bn_config()
    ckpt = random_d2_checkpoint(c)
    state = new_train_state(c, init=False)
    del ckpt["roi_heads.mask_head.boundary_fcn1.bias"]
    ckpt["roi_heads.mask_head.extra_conv.weight"] = np.zeros((3, 3, 1, 1), np.float32)
    ckpt["backbone.fpn_lateral3.weight"] = np.zeros((5, 64, 1, 1), np.float32)
    with pytest.raises(weights.WeightImportError) as err:
        weights.convert(ckpt, jax.device_get(state.params), jax.device_get(state.frozen), source="ckpt.pth")
    msg = str(err.value)
    assert "missing in the checkpoint (1)" in msg and "roi_heads.mask_head.boundary_fcn1.bias" in msg
    assert "unexpected in the checkpoint (1)" in msg and "roi_heads.mask_head.extra_conv.weight" in msg
    assert "mis-shaped (1)" in msg and "backbone.fpn_lateral3.weight: checkpoint (5, 64, 1, 1)" in msg


def test_class_count_cascade_head_and_norm_mismatches_are_clear():
    c = frozen_bn_config()
    state = new_train_state(c, init=False)
    params, frozen = jax.device_get(state.params), jax.device_get(state.frozen)
    other = frozen_bn_config()
    other.model.num_classes = 80
    with pytest.raises(weights.WeightImportError, match=r"predicts 80 classes \(81 logits.*model.num_classes=5"):
        weights.convert(random_d2_checkpoint(other), params, frozen)
    cascade = dict(random_d2_checkpoint(c), **{"roi_heads.box_head.1.fc1.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(weights.WeightImportError, match="Cascade R-CNN checkpoint.*not supported"):
        weights.convert(cascade, params, frozen)
    with pytest.raises(weights.WeightImportError, match="configs/mask_rcnn.py"):
        weights.convert(random_d2_checkpoint(frozen_bn_config("maskrcnn")), params, frozen)
    with pytest.raises(weights.WeightImportError, match="look like a detectron2 checkpoint, not msra"):
        weights.convert(random_d2_checkpoint(c), params, frozen, "msra")
    gn = tiny_config()                                      # GroupNorm backbone
    gn_state = new_train_state(gn, init=False)
    with pytest.raises(weights.WeightImportError, match="model.backbone.norm='FrozenBN'"):
        weights.convert(random_d2_checkpoint(c), jax.device_get(gn_state.params), jax.device_get(gn_state.frozen))


def test_cascade_checkpoint_fills_cascade_stages():
    c = frozen_bn_config()
    c.model.roi_heads.cascade.enabled = True
    ckpt = random_d2_checkpoint(c)
    state = new_train_state(c, init=False)
    params, _, report = weights.convert(ckpt, jax.device_get(state.params), jax.device_get(state.frozen))
    assert not report.initialised_fresh and sorted(report.loaded) == sorted(ckpt)
    chw = (c.model.fpn.channels, c.model.roi_heads.pooler_resolution, c.model.roi_heads.pooler_resolution)
    np.testing.assert_array_equal(params["box_heads_2"]["fc1"]["kernel"],
                                  weights.dense_kernel(ckpt["roi_heads.box_head.2.fc1.weight"], chw))
    np.testing.assert_array_equal(params["box_predictors_1"]["bbox_pred"]["kernel"],
                                  ckpt["roi_heads.box_predictor.1.bbox_pred.weight"].T)
    plain = frozen_bn_config()
    with pytest.raises(weights.WeightImportError, match="has Cascade R-CNN stages but the checkpoint"):
        weights.convert(random_d2_checkpoint(plain), jax.device_get(state.params), jax.device_get(state.frozen))


def test_backbone_import_keeps_the_rest_and_lists_it():
    c = frozen_bn_config()
    state = new_train_state(c, init=False)
    params0, frozen0 = jax.device_get(state.params), jax.device_get(state.frozen)
    ckpt = random_d2_checkpoint(c)
    blobs = dict(msra_blobs(ckpt), pred_w=np.zeros((10, 4), np.float32))
    params, frozen, report = weights.convert(blobs, params0, frozen0, "msra")
    assert report.kind == "msra" and report.ignored == ["pred_w"]
    assert "fpn/fpn_lateral2" in report.initialised_fresh and "box_predictor/cls_score" in report.initialised_fresh
    assert not any(name.startswith("backbone/") for name in report.initialised_fresh)
    np.testing.assert_array_equal(params["box_head"]["fc1"]["kernel"], params0["box_head"]["fc1"]["kernel"])
    np.testing.assert_array_equal(frozen["backbone"]["stem_norm"]["scale"],
                                  ckpt["backbone.bottom_up.stem.conv1.norm.weight"])
    assert "initialised fresh" in str(report)


@pytest.mark.slow
@needs_torch
def test_detectron2_checkpoint_detections_survive_orbax_round_trip(tmp_path):
    c = frozen_bn_config()
    ckpt = random_d2_checkpoint(c)
    path = tmp_path / "model_final.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in dict(ckpt, **D2_PIXELS).items()},
                "iteration": 90000, "__author__": "test"}, path)
    state, report = weights.load_into_state(new_train_state(c, init=False), str(path))
    assert not report.initialised_fresh and len(report.loaded) == len(ckpt)
    assert report.config_changes["model.input_format"] == "BGR"
    assert weights.apply_config_changes(c, report.config_changes)    # the shapes config was RGB
    detect = jax.jit(lambda v, b: BMaskRCNN(c.model).apply(v, b, train=False))
    h, w = c.data.canvas_buckets[0]
    image = np.random.default_rng(1).integers(0, 255, (1, h, w, 3), dtype=np.uint8)
    batch = {"image": image, "image_hw": np.array([[h, w]], np.int32)}
    before = jax.device_get(detect({"params": state.params, "frozen": state.frozen}, batch))
    assert before["valid"].any()

    mgr = checkpoints.manager(str(tmp_path / "run"), keep=1, async_save=False)
    checkpoints.save(mgr, 0, state, force=True)
    mgr.wait_until_finished()
    restored = checkpoints.restore_latest(mgr, new_train_state(c, init=False))
    after = jax.device_get(detect({"params": restored.params, "frozen": restored.frozen}, batch))
    assert set(before) == set(after)
    for key in before:
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)


@needs_torch
def test_import_command_writes_a_checkpoint_evaluate_can_restore(tmp_path):
    c = frozen_bn_config()
    ckpt = random_d2_checkpoint(c, seed=3)
    source = tmp_path / "bmask.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in ckpt.items()}}, source)
    out = tmp_path / "imported"
    report, differ = weights.import_weights(c, str(source), str(out))
    assert len(report.loaded) == len(ckpt) and not report.initialised_fresh
    assert differ["model.input_format"] == ("RGB", "BGR") and "model.backbone.norm" not in differ
    assert c.model.input_format == "BGR"
    assert os.path.exists(out / "weights_import.json")
    mgr = checkpoints.manager(str(out), keep=1, async_save=False)
    assert mgr.latest_step() == 0
    restored = checkpoints.restore_latest(mgr, new_train_state(c, init=False))
    np.testing.assert_array_equal(restored.params["mask_head"]["mask_fcn1"]["Conv_0"]["kernel"],
                                  ckpt["roi_heads.mask_head.mask_fcn1.weight"].transpose(2, 3, 1, 0))
    with pytest.raises(FileExistsError):
        weights.import_weights(c, str(source), str(out))


@pytest.mark.slow
@needs_torch
def test_import_command_line(tmp_path):
    """`python -m bmask_jax.weights` end to end on a tiny config (a subprocess)."""
    from configs import bmask_rcnn
    c = bmask_rcnn.get_config("shapes")
    c.model.backbone.norm = "FrozenBN"
    source = tmp_path / "bmask.pkl"
    with open(source, "wb") as f:
        pickle.dump({"model": random_d2_checkpoint(c, seed=4), "__author__": "test"}, f)
    cmd = [sys.executable, "-m", "bmask_jax.weights", "--config", "configs/bmask_rcnn.py:shapes",
           "--config.model.backbone.norm=FrozenBN", "--source", str(source), "--output", str(tmp_path / "out")]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "arrays loaded" in done.stdout and "--config.model.input_format=BGR" in done.stdout
    assert os.path.isdir(tmp_path / "out" / "checkpoints" / "0")


def hrnet_imagenet_shapes(h) -> dict[str, tuple]:
    """{key: torch shape} of an HRNet-Image-Classification ImageNet checkpoint (cls_hrnet.py)
    for config.model.backbone.hrnet numbers: stem conv1/bn1/conv2/bn2, layer1 (bottlenecks),
    transition<t>, stage<s>.<m>.branches / fuse_layers, and part of the classification head."""
    shapes = {}

    def conv(name, cout, cin, k):
        shapes[f"{name}.weight"] = (cout, cin, k, k)

    def bn(name, c):
        for r in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{r}"] = (c,)
        shapes[f"{name}.num_batches_tracked"] = ()

    stem, w1 = h.stem_channels, h.stage1_channels
    conv("conv1", stem, 3, 3), bn("bn1", stem), conv("conv2", stem, stem, 3), bn("bn2", stem)
    cin = stem
    for k in range(h.stage1_blocks):                      # Bottleneck, expansion 4
        p = f"layer1.{k}"
        conv(f"{p}.conv1", w1, cin, 1), bn(f"{p}.bn1", w1)
        conv(f"{p}.conv2", w1, w1, 3), bn(f"{p}.bn2", w1)
        conv(f"{p}.conv3", 4 * w1, w1, 1), bn(f"{p}.bn3", 4 * w1)
        if cin != 4 * w1:
            conv(f"{p}.downsample.0", 4 * w1, cin, 1), bn(f"{p}.downsample.1", 4 * w1)
        cin = 4 * w1
    pre = [cin]
    for stage in (2, 3, 4):
        cur = list(h.widths[:stage])
        t = stage - 1
        for b, c in enumerate(cur):                        # _make_transition_layer
            if b < len(pre):
                if pre[b] != c:
                    conv(f"transition{t}.{b}.0", c, pre[b], 3), bn(f"transition{t}.{b}.1", c)
            else:
                for j in range(b + 1 - len(pre)):
                    out = c if j == b - len(pre) else pre[-1]
                    conv(f"transition{t}.{b}.{j}.0", out, pre[-1], 3), bn(f"transition{t}.{b}.{j}.1", out)
        for m in range(h.num_modules[stage - 2]):
            p = f"stage{stage}.{m}"
            for b, c in enumerate(cur):                    # BasicBlock branches
                for k in range(h.num_blocks[stage - 2]):
                    q = f"{p}.branches.{b}.{k}"
                    conv(f"{q}.conv1", c, c, 3), bn(f"{q}.bn1", c), conv(f"{q}.conv2", c, c, 3), bn(f"{q}.bn2", c)
            for i, ci in enumerate(cur):                   # _make_fuse_layers, multi-scale output
                for j, cj in enumerate(cur):
                    if j > i:
                        conv(f"{p}.fuse_layers.{i}.{j}.0", ci, cj, 1), bn(f"{p}.fuse_layers.{i}.{j}.1", ci)
                    elif j < i:
                        for k in range(i - j):
                            out = ci if k == i - j - 1 else cj
                            conv(f"{p}.fuse_layers.{i}.{j}.{k}.0", out, cj, 3)
                            bn(f"{p}.fuse_layers.{i}.{j}.{k}.1", out)
        pre = cur
    conv("incre_modules.0.0.conv1", 32, h.widths[0], 1)     # the classification head: ignored
    conv("final_layer.0", 2048, 1024, 1)
    shapes["classifier.weight"], shapes["classifier.bias"] = (1000, 2048), (1000,)
    return shapes


def test_hrnet_imagenet_checkpoint_fills_the_hrnet_backbone():
    from bmask_jax import config as config_lib
    c = config_lib.from_file("configs/bmask_rcnn.py:hrnet_w32_fpn_1x")
    shapes = jax.eval_shape(lambda: init_variables(c, BMaskRCNN(c.model), jax.random.PRNGKey(0)))
    zeros = jax.tree_util.tree_map(lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), shapes)
    rng = np.random.default_rng(0)
    ckpt = {k: (rng.uniform(0.5, 1.5, s) if k.endswith("running_var") else rng.normal(size=s)).astype(np.float32)
            for k, s in hrnet_imagenet_shapes(c.model.backbone.hrnet).items()}
    params, frozen, report = weights.convert(ckpt, zeros["params"], zeros["frozen"])
    assert report.kind == "hrnet"
    assert not [n for n in report.initialised_fresh if n.startswith("backbone/")]
    assert sorted(k for k in ckpt if not k.endswith("num_batches_tracked") and k not in report.loaded) == \
        ["classifier.bias", "classifier.weight", "final_layer.0.weight", "incre_modules.0.0.conv1.weight"]
    # values land where their names say: a fusion conv (1x1 upsampling path) and a stride-2 step
    b = params["backbone"]
    np.testing.assert_array_equal(b["stage3_2"]["fusion"]["fuse0_2_conv"]["Conv_0"]["kernel"],
                                  ckpt["stage3.2.fuse_layers.0.2.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(b["stage4_1"]["fusion"]["fuse3_0_1_conv"]["Conv_0"]["kernel"],
                                  ckpt["stage4.1.fuse_layers.3.0.1.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(b["transition3_3_0_conv"]["Conv_0"]["kernel"],
                                  ckpt["transition3.3.0.0.weight"].transpose(2, 3, 1, 0))
    changes, _ = weights.implied_config_changes("hrnet", ckpt)
    assert changes["model.input_format"] == "RGB" and "model.backbone.stride_in_1x1" not in changes
