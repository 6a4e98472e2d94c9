"""Weight import: detectron2 Mask R-CNN / BMask R-CNN checkpoints and ImageNet backbones (MSRA
Caffe2 blobs, torchvision) into our parameter tree, the 'frozen' collection and an Orbax
checkpoint.

    python -m bmask_jax.weights --config configs/bmask_rcnn.py:r50_fpn_1x \\
        --source model_final.pth --output runs/imported [--kind auto|detectron2|msra|torchvision]

then `python -m bmask_jax.main --config ... --workdir runs/imported --mode evaluate` (or train,
which starts from the imported step-0 checkpoint), with the config changes the import prints.

Nothing here executes code from a checkpoint: pickles go through an unpickler that knows only
numpy's array reconstruction (and, for PyTorch files, torch's tensor rebuild, which we
reimplement over numpy), and refuses every other global. PyTorch is not needed.

Layouts (SPEC section 10) and what becomes of them here:
    conv            (out, in, kh, kw)  -> kernel (kh, kw, in, out)
    transposed conv (in, out, kh, kw)  -> kernel (kh, kw, in, out)
    linear          (out, in)          -> kernel (in, out); box_head.fc1's input is flattened
                                          (C, H, W) by detectron2 and (H, W, C) by us
    FrozenBN        weight, bias, running_mean, running_var
                                       -> frozen scale = weight / sqrt(var + 1e-5),
                                          shift = bias - mean * scale
    MSRA BN blobs   _s, _b             -> already scale and shift
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import pickle
import re
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np

BN_EPS = 1e-5
KINDS = ("detectron2", "msra", "torchvision")
WHOLE_MODEL_KINDS = ("detectron2",)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A pickle asked for a global outside the allowed set; nothing of it was executed."""


class WeightImportError(ValueError):
    """The checkpoint does not fit the model (missing, unexpected, mis-shaped keys...)."""


# =============================================================================================
# Safe readers
# =============================================================================================

def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The globals a pickled numpy array (or scalar) needs, under their numpy 1.x, numpy 2.x
    and Python 2 module names."""
    core = getattr(np, "_core", None) or np.core
    out: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                       ("_codecs", "encode"): _latin1_encode,
                                       ("collections", "OrderedDict"): _AttrDict}
    for mod in ("numpy.core", "numpy._core"):
        out[(f"{mod}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
        out[(f"{mod}.multiarray", "scalar")] = core.multiarray.scalar
        out[(f"{mod}.numeric", "_frombuffer")] = core.numeric._frombuffer
    return out


class _AttrDict(dict):
    """Stands in for collections.OrderedDict: a state_dict() pickles with attributes
    (`_metadata`), which a plain dict cannot take."""


def _latin1_encode(text, encoding="latin1"):
    """`_codecs.encode`, which protocol-2 pickles written by Python 3 use for bytes; only
    latin1 (the one pickle writes) is honoured."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise UnsafeCheckpointError(f"_codecs.encode with {encoding!r} is not a bytes literal")
    return text.encode("latin1")


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose globals come only from `allowed`; anything else raises
    UnsafeCheckpointError naming the file and the global, before it could run."""

    def __init__(self, file, source: str, allowed: dict[tuple[str, str], Any]):
        super().__init__(file, encoding="latin1")
        self._source = source
        self._allowed = allowed

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self._source}: refusing to load global '{module}.{name}': weight files may only "
                "hold arrays, dicts, lists, numbers and strings (nothing was executed)") from None

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(f"{self._source}: unexpected persistent id {pid!r} in a plain pickle")


# ---- PyTorch files, read without torch ----

_TORCH_STORAGE_DTYPES = {
    "DoubleStorage": "f8", "FloatStorage": "f4", "HalfStorage": "f2", "LongStorage": "i8",
    "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1", "ByteStorage": "u1",
    "BoolStorage": "b1", "UntypedStorage": "u1", "BFloat16Storage": "bfloat16",
}
_TORCH_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


@dataclasses.dataclass(frozen=True)
class _StorageType:
    name: str

    def dtype(self, byteorder: str) -> np.dtype:
        code = _TORCH_STORAGE_DTYPES[self.name]
        if code == "bfloat16":
            import ml_dtypes
            return np.dtype(ml_dtypes.bfloat16)
        dtype = np.dtype(code)
        return dtype if dtype.itemsize == 1 else dtype.newbyteorder("<" if byteorder == "little" else ">")


@dataclasses.dataclass
class _Storage:
    """A torch storage: `data` (1-D numpy, filled when its bytes are read) from element
    `offset` on (legacy files share storages between views)."""
    key: str
    dtype: np.dtype
    data: np.ndarray | None = None
    offset: int = 0


@dataclasses.dataclass
class _LazyTensor:
    storage: _Storage
    offset: int
    size: tuple
    stride: tuple

    def materialize(self, source: str) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise WeightImportError(f"{source}: storage {self.storage.key!r} has no data")
        offset = self.storage.offset + int(self.offset)
        size = tuple(int(s) for s in self.size)
        stride = tuple(int(s) for s in self.stride)
        if len(size) != len(stride) or min(size + stride + (offset,), default=0) < 0:
            raise WeightImportError(f"{source}: bad tensor geometry size={size} stride={stride}")
        if math.prod(size) == 0:
            return np.zeros(size, data.dtype.newbyteorder("="))
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= data.shape[0]:
            raise WeightImportError(f"{source}: tensor of size {size} at offset {offset} reads past its "
                                    f"storage {self.storage.key!r} of {data.shape[0]} elements")
        if not size:                                  # 0-d
            return np.array(data[offset]).astype(data.dtype.newbyteorder("="))
        view = np.lib.stride_tricks.as_strided(data[offset:], size, [s * data.itemsize for s in stride])
        return np.ascontiguousarray(view).astype(data.dtype.newbyteorder("="), copy=False)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    """torch._utils._rebuild_tensor(_v2): (storage, offset, size, stride, requires_grad,
    backward_hooks[, metadata]) -> a tensor to be read from its storage."""
    if not isinstance(storage, _Storage):
        raise UnsafeCheckpointError(f"tensor rebuild with a non-storage argument {type(storage).__name__}")
    return _LazyTensor(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, *_ignored):
    """torch._utils._rebuild_parameter(_with_state): an nn.Parameter is its data here."""
    return data


class _TorchUnpickler(_RestrictedUnpickler):
    """data.pkl of a torch.save file: tensors become _LazyTensor over _Storage placeholders."""

    def __init__(self, file, source: str, byteorder: str, storages: dict[str, _Storage],
                 read_storage: Callable[[str, np.dtype], np.ndarray] | None):
        allowed = dict(_numpy_globals())
        allowed.update({("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
                        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
                        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
                        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter})
        allowed.update({("torch", name): _StorageType(name) for name in _TORCH_STORAGE_DTYPES})
        super().__init__(file, source, allowed)
        self._byteorder = byteorder
        self._storages = storages
        self._read_storage = read_storage

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and len(pid) >= 5
                and isinstance(pid[1], _StorageType)):
            raise UnsafeCheckpointError(f"{self._source}: unsupported persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        view = pid[5] if len(pid) > 5 else None
        if key not in self._storages:
            dtype = storage_type.dtype(self._byteorder)
            data = self._read_storage(key, dtype) if self._read_storage else None
            self._storages[key] = _Storage(key, dtype, data)
        storage = self._storages[key]
        if view is not None:                     # legacy: (view_key, offset, size), a slice of key
            return dataclasses.replace(storage, offset=int(view[1]))
        return storage


def _materialize(obj, source: str, storages: dict[str, _Storage]):
    """Replace every _LazyTensor in nested dicts/lists/tuples by its numpy array."""
    if isinstance(obj, _LazyTensor):
        # A view of a legacy storage reads its data through the storage object shared by key.
        if obj.storage.data is None and obj.storage.key in storages:
            obj.storage.data = storages[obj.storage.key].data
        return obj.materialize(source)
    if isinstance(obj, dict):
        return {k: _materialize(v, source, storages) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v, source, storages) for v in obj)
    return obj


def _read_torch_zip(path: str) -> Any:
    """A torch.save zip file (PyTorch >= 1.6): <prefix>/data.pkl, <prefix>/data/<key>,
    <prefix>/byteorder. Storages are raw element bytes in that byte order (little if absent)."""
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise WeightImportError(f"{path}: a zip file but not a torch.save checkpoint (no <dir>/data.pkl)")
        prefix = pkls[0][:-len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = zf.read(prefix + "byteorder").decode().strip()

        def read_storage(key: str, dtype: np.dtype) -> np.ndarray:
            name = f"{prefix}data/{key}"
            if name not in names:
                raise WeightImportError(f"{path}: storage {name} is missing")
            raw = zf.read(name)
            if len(raw) % dtype.itemsize:
                raise WeightImportError(f"{path}: storage {name} is not a whole number of {dtype} elements")
            return np.frombuffer(raw, dtype)

        storages: dict[str, _Storage] = {}
        obj = _TorchUnpickler(io.BytesIO(zf.read(pkls[0])), path, byteorder, storages, read_storage).load()
    return _materialize(obj, path, storages)


def _read_torch_legacy(f, path: str) -> Any:
    """The pre-1.6 torch.save stream: pickles of the magic number, protocol version and
    sys_info, the object (storages as persistent ids), the sorted storage keys, then per
    storage an int64 element count and the raw little-endian bytes."""
    def plain():
        return _RestrictedUnpickler(f, path, _numpy_globals()).load()

    if plain() != _TORCH_LEGACY_MAGIC:
        raise WeightImportError(f"{path}: not a torch checkpoint (bad magic number)")
    plain()                                       # protocol version
    sys_info = plain()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise WeightImportError(f"{path}: big-endian legacy torch checkpoints are not supported")
    storages: dict[str, _Storage] = {}
    obj = _TorchUnpickler(f, path, "little", storages, None).load()
    for key in plain():
        storage = storages[str(key)]
        numel = int.from_bytes(f.read(8), "little")
        raw = f.read(numel * storage.dtype.itemsize)
        if len(raw) != numel * storage.dtype.itemsize:
            raise WeightImportError(f"{path}: truncated data for storage {key}")
        storage.data = np.frombuffer(raw, storage.dtype)
    return _materialize(obj, path, storages)


def read_raw(path: str) -> Any:
    """Whatever object a .pkl / .pth / .pt holds, by content: a torch zip file, a legacy torch
    stream, or a plain pickle. Tensors come back as numpy arrays."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no weight file at {path}")
    if zipfile.is_zipfile(path):
        return _read_torch_zip(path)
    with open(path, "rb") as f:
        if f.read(1) != b"\x80":
            raise WeightImportError(f"{path}: neither a pickle (protocol >= 2) nor a torch.save zip file")
        f.seek(0)
        first = _RestrictedUnpickler(f, path, _numpy_globals()).load()
        if isinstance(first, int) and first == _TORCH_LEGACY_MAGIC:
            f.seek(0)
            return _read_torch_legacy(f, path)
    return first


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
    """The flat {name: array} state dict of a checkpoint: unwrapped from 'model' / 'state_dict'
    (detectron2, generic training scripts) or 'blobs' (Detectron), without Caffe2's
    '_momentum' blobs and a DataParallel 'module.' prefix. Non-array entries are dropped."""
    obj = read_raw(path)
    if not isinstance(obj, dict):
        raise WeightImportError(f"{path}: holds a {type(obj).__name__}, not a dict of weights")
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if isinstance(obj.get("blobs"), dict):
        obj = obj["blobs"]
    arrays = {str(k): np.asarray(v) for k, v in obj.items()
              if isinstance(v, (np.ndarray, np.generic)) and not str(k).endswith("_momentum")}
    if not arrays:
        raise WeightImportError(f"{path}: no arrays found (top-level keys: {sorted(map(str, obj))[:10]})")
    if all(k.startswith("module.") for k in arrays):
        arrays = {k[len("module."):]: v for k, v in arrays.items()}
    return arrays


# =============================================================================================
# Our layers, and the name tables
# =============================================================================================

@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer of our model: its module path (e.g. ('backbone', 'res2_0', 'conv1')), its
    kind (conv | deconv | dense | frozen_bn | group_norm) and its leaves
    {leaf name: (collection, full path in that collection, shape)}."""
    path: tuple[str, ...]
    kind: str
    leaves: dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]]

    @property
    def name(self) -> str:
        return "/".join(self.path)

    def shape(self, leaf: str) -> tuple[int, ...]:
        return self.leaves[leaf][2]


def _flatten(tree, prefix=()) -> dict[tuple[str, ...], Any]:
    if hasattr(tree, "items"):                       # dicts and FrozenDicts
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, prefix + (str(k),)))
        return out
    return {prefix: tree}


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return out


def model_layers(params, frozen) -> list[Layer]:
    """Group the leaves of our 'params' and 'frozen' trees into layers.

    Conv: <path>/Conv_0/{kernel (kh, kw, in, out), bias?}; GroupNorm: <path>/GroupNorm_0/
    {scale, bias}; Deconv2x: <path>/{kernel (2, 2, in, out), bias}; Dense: <path>/{kernel
    (in, out), bias}; FrozenBN: frozen <path>/{scale, shift}.
    """
    groups: dict[tuple[tuple[str, ...], str], dict] = {}
    for collection, tree in (("params", params), ("frozen", frozen)):
        for path, leaf in _flatten(tree).items():
            wrapper = path[-2] if len(path) >= 2 and path[-2] in ("Conv_0", "GroupNorm_0") else None
            module = path[:-2] if wrapper else path[:-1]
            groups.setdefault((module, collection), {"wrapper": wrapper, "leaves": {}})
            groups[(module, collection)]["leaves"][path[-1]] = (collection, path, tuple(leaf.shape))
    layers = []
    for (module, collection), g in groups.items():
        leaves = g["leaves"]
        if collection == "frozen" and set(leaves) == {"scale", "shift"}:
            kind = "frozen_bn"
        elif g["wrapper"] == "Conv_0":
            kind = "conv"
        elif g["wrapper"] == "GroupNorm_0":
            kind = "group_norm"
        elif "kernel" in leaves and len(leaves["kernel"][2]) == 4:
            kind = "deconv"
        elif "kernel" in leaves and len(leaves["kernel"][2]) == 2:
            kind = "dense"
        else:
            raise WeightImportError(f"model layer {'/'.join(module)} ({sorted(leaves)}) is of a kind the "
                                    "importer does not know")
        layers.append(Layer(module, kind, leaves))
    return layers


Rule = tuple[str, Any]   # (regex over our layer name, source module: template or callable on the match)

# detectron2 module paths of our layers, first match wins (SPEC section 10). Cascade R-CNN's
# stage s (CascadeROIHeads) is roi_heads.box_head.{s} / roi_heads.box_predictor.{s}: it maps
# onto box_heads_{s} / box_predictors_{s} when the model has cascade stages.
DETECTRON2_RULES: list[Rule] = [
    (r"backbone/stem_conv1", "backbone.bottom_up.stem.conv1"),
    (r"backbone/stem_norm", "backbone.bottom_up.stem.conv1.norm"),
    (r"backbone/res(\d)_(\d+)/(conv\d|shortcut)", r"backbone.bottom_up.res\1.\2.\3"),
    (r"backbone/res(\d)_(\d+)/(conv\d|shortcut)_norm", r"backbone.bottom_up.res\1.\2.\3.norm"),
    (r"fpn/(fpn_lateral\d|fpn_output\d)", r"backbone.\1"),
    (r"rpn_head/(conv|objectness_logits|anchor_deltas)", r"proposal_generator.rpn_head.\1"),
    (r"box_head/(fc\d+)", r"roi_heads.box_head.\1"),
    (r"box_predictor/(cls_score|bbox_pred)", r"roi_heads.box_predictor.\1"),
    (r"box_heads_(\d+)/(fc\d+)", r"roi_heads.box_head.\1.\2"),
    (r"box_predictors_(\d+)/(cls_score|bbox_pred)", r"roi_heads.box_predictor.\1.\2"),
    # Mask R-CNN's head (MaskRCNNConvUpsampleHead): mask_fcn1..4, deconv, predictor.
    (r"mask_head/MaskPredictor_0/mask_deconv", "roi_heads.mask_head.deconv"),
    (r"mask_head/MaskPredictor_0/mask_predictor", "roi_heads.mask_head.predictor"),
    # The boundary-preserving head: its mask and boundary predictors keep their names.
    (r"mask_head/(?:mask|boundary)_branch/(\w+)", r"roi_heads.mask_head.\1"),
    ((r"mask_head/(mask_fcn\d+|downsample|mask_to_boundary|boundary_fcn\d+|boundary_to_mask"
      r"|mask_final_fusion)"), r"roi_heads.mask_head.\1"),
]

_BRANCH = "abc"
TORCHVISION_RULES: list[Rule] = [
    (r"backbone/stem_conv1", "conv1"),
    (r"backbone/stem_norm", "bn1"),
    (r"backbone/res(\d)_(\d+)/conv(\d)", lambda m: f"layer{int(m[1]) - 1}.{m[2]}.conv{m[3]}"),
    (r"backbone/res(\d)_(\d+)/conv(\d)_norm", lambda m: f"layer{int(m[1]) - 1}.{m[2]}.bn{m[3]}"),
    (r"backbone/res(\d)_(\d+)/shortcut", lambda m: f"layer{int(m[1]) - 1}.{m[2]}.downsample.0"),
    (r"backbone/res(\d)_(\d+)/shortcut_norm", lambda m: f"layer{int(m[1]) - 1}.{m[2]}.downsample.1"),
]

MSRA_RULES: list[Rule] = [
    (r"backbone/stem_conv1", "conv1"),
    (r"backbone/stem_norm", "res_conv1_bn"),
    (r"backbone/res(\d)_(\d+)/conv(\d)", lambda m: f"res{m[1]}_{m[2]}_branch2{_BRANCH[int(m[3]) - 1]}"),
    (r"backbone/res(\d)_(\d+)/conv(\d)_norm", lambda m: f"res{m[1]}_{m[2]}_branch2{_BRANCH[int(m[3]) - 1]}_bn"),
    (r"backbone/res(\d)_(\d+)/shortcut", r"res\1_\2_branch1"),
    (r"backbone/res(\d)_(\d+)/shortcut_norm", r"res\1_\2_branch1_bn"),
]

RULES = {"detectron2": DETECTRON2_RULES, "torchvision": TORCHVISION_RULES, "msra": MSRA_RULES}

# Source keys a kind may hold that have no place in our model: reported, not an error.
IGNORED = {
    "detectron2": [r"pixel_mean", r"pixel_std", r".*num_batches_tracked",
                   r"proposal_generator\.anchor_generator\..*"],
    "torchvision": [r"fc\.(weight|bias)", r".*num_batches_tracked"],
    "msra": [r"pred_[wb]", r"fc1000_[wb]", r".*_momentum"],
}

# Layers whose input is the flattened RoI feature map: (C, H, W) in detectron2, (H, W, C) here.
FLATTENED_ROI_INPUT = r"box_head/fc1|box_heads_\d+/fc1"
CASCADE_KEY = r"roi_heads\.(box_head|box_predictor)\.\d+\..*"
CLS_SCORE = r"box_predictors?(_\d+)?/cls_score"


def source_module(layer: Layer, rules: list[Rule]) -> str | None:
    for pattern, target in rules:
        m = re.fullmatch(pattern, layer.name)
        if m:
            return target(m) if callable(target) else m.expand(target)
    return None


def source_keys(kind: str, layer: Layer, module: str) -> dict[str, str]:
    """The checkpoint keys of one layer, by role (weight, bias, running_mean, ...)."""
    if kind == "msra":
        if layer.kind == "frozen_bn":
            return {"scale": f"{module}_s", "shift": f"{module}_b"}
        roles = {"weight": f"{module}_w"}
        if "bias" in layer.leaves:
            roles["bias"] = f"{module}_b"
        return roles
    if layer.kind == "frozen_bn":
        return {r: f"{module}.{r}" for r in ("weight", "bias", "running_mean", "running_var")}
    roles = {"weight": f"{module}.weight"}
    if "bias" in layer.leaves or layer.kind == "group_norm":
        roles["bias"] = f"{module}.bias"
    return roles


# =============================================================================================
# Layout conversions (numpy, one layer at a time)
# =============================================================================================

def conv_kernel(weight: np.ndarray) -> np.ndarray:
    """torch conv weight (out, in, kh, kw) -> flax kernel (kh, kw, in, out)."""
    return np.transpose(weight, (2, 3, 1, 0))


def deconv_kernel(weight: np.ndarray) -> np.ndarray:
    """torch ConvTranspose2d weight (in, out, kh, kw) -> Deconv2x kernel (kh, kw, in, out)."""
    return np.transpose(weight, (2, 3, 0, 1))


def dense_kernel(weight: np.ndarray, chw: tuple[int, int, int] | None = None) -> np.ndarray:
    """torch Linear weight (out, in) -> flax kernel (in, out). With chw = (C, H, W), the input is
    a feature map that torch flattens in (C, H, W) order and we in (H, W, C) order: rows are
    permuted so that kernel[(h, w, c)] = weight[:, (c, h, w)]."""
    if chw is None:
        return weight.T
    c, h, w = chw
    return weight.reshape(weight.shape[0], c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, weight.shape[0])


def frozen_bn(weight, bias, running_mean, running_var, eps: float = BN_EPS) -> tuple[np.ndarray, np.ndarray]:
    """BatchNorm statistics and affine, each (C,) -> the fixed (scale, shift) of FrozenBN."""
    scale = weight / np.sqrt(running_var + eps)
    return scale, bias - running_mean * scale


def expected_source_shapes(layer: Layer, roles: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """The shape each checkpoint array must have for this layer (torch layouts)."""
    if layer.kind in ("frozen_bn", "group_norm"):
        c = layer.shape("scale")[0]
        return {r: (c,) for r in roles}
    k = layer.shape("kernel")
    weight = {"conv": lambda: (k[3], k[2], k[0], k[1]), "deconv": lambda: (k[2], k[3], k[0], k[1]),
              "dense": lambda: (k[1], k[0])}[layer.kind]()
    return {r: weight if r == "weight" else (k[-1],) for r in roles}


def convert_layer(layer: Layer, arrays: dict[str, np.ndarray], roi_chw=None) -> dict[str, np.ndarray]:
    """Checkpoint arrays of one layer by role -> our leaves {leaf name: array}."""
    if layer.kind == "frozen_bn":
        if "scale" in arrays:                       # MSRA: already scale and shift
            return {"scale": arrays["scale"], "shift": arrays["shift"]}
        scale, shift = frozen_bn(arrays["weight"], arrays["bias"], arrays["running_mean"], arrays["running_var"])
        return {"scale": scale, "shift": shift}
    if layer.kind == "group_norm":
        return {"scale": arrays["weight"], "bias": arrays["bias"]}
    w = arrays["weight"]
    kernel = {"conv": conv_kernel, "deconv": deconv_kernel,
              "dense": lambda x: dense_kernel(x, roi_chw if re.fullmatch(FLATTENED_ROI_INPUT, layer.name) else None)}
    out = {"kernel": kernel[layer.kind](w)}
    if "bias" in arrays:
        out["bias"] = arrays["bias"]
    return out


# =============================================================================================
# Whole checkpoints
# =============================================================================================

@dataclasses.dataclass
class ImportReport:
    """What an import did: keys used, our layers left at their initial values, keys with no
    place in the model, and the config (dotted key: value) the weights come with."""
    source: str
    kind: str
    loaded: list[str] = dataclasses.field(default_factory=list)             # checkpoint keys used
    initialised_fresh: list[str] = dataclasses.field(default_factory=list)  # our layers left at init
    ignored: list[str] = dataclasses.field(default_factory=list)            # keys with no place here
    config_changes: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"imported {self.source} ({self.kind}): {len(self.loaded)} arrays loaded"]
        if self.initialised_fresh:
            lines.append(f"initialised fresh ({len(self.initialised_fresh)} layers): "
                         + ", ".join(self.initialised_fresh))
        if self.ignored:
            lines.append(f"ignored ({len(self.ignored)}): " + ", ".join(self.ignored))
        if self.config_changes:
            lines.append("config the weights imply: " + ", ".join(
                f"{k}={v!r}" for k, v in self.config_changes.items()))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def detect_kind(checkpoint: dict[str, np.ndarray], source: str = "checkpoint") -> str:
    """'detectron2' (module paths like backbone.bottom_up..., roi_heads...), 'msra' (Caffe2
    blobs conv1_w, res2_0_branch2a_w, ...) or 'torchvision' (conv1.weight, layer1.0...)."""
    keys = set(checkpoint)
    if any(k.startswith(("backbone.", "roi_heads.", "proposal_generator.")) for k in keys):
        return "detectron2"
    if "conv1_w" in keys or "res_conv1_bn_s" in keys:
        return "msra"
    if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
        return "torchvision"
    if any(k.startswith(("stem.", "res2.")) for k in keys):
        raise WeightImportError(f"{source}: looks like a detectron2 backbone-only file (stem.*, res2.*); "
                                "only whole detectron2 models, MSRA .pkl and torchvision .pth backbones "
                                "are supported")
    raise WeightImportError(f"{source}: cannot tell the checkpoint's kind from its keys "
                            f"(e.g. {sorted(keys)[:8]}); pass --kind")


def _check_cascade(checkpoint: dict, layers: list[Layer], kind: str, source: str) -> None:
    """A Cascade R-CNN checkpoint (one box head per stage) fits only a model with stages."""
    if kind != "detectron2":
        return
    theirs = sorted(k for k in checkpoint if re.fullmatch(CASCADE_KEY, k))
    ours = any(layer.name.startswith("box_heads_") for layer in layers)
    if theirs and not ours:
        raise WeightImportError(
            f"{source}: a Cascade R-CNN checkpoint ({theirs[0]}, ...: one box head per stage) is not "
            "supported by this model: it has no cascade stages to load it into")
    if ours and not theirs:
        raise WeightImportError(f"{source}: the model has Cascade R-CNN stages but the checkpoint has a "
                                "single box head (roi_heads.box_head.fc1...); turn the cascade off")


def implied_config_changes(kind: str, checkpoint: dict[str, np.ndarray]) -> tuple[dict[str, Any], list[str]]:
    """The config the weights come with (SPEC sections 1-2), as {dotted key: value}, and notes
    on how it was decided. MSRA: BGR, mean (103.530, 116.280, 123.675), std 1, stride in the
    1x1 conv. torchvision: RGB, ImageNet mean/std x 255, stride in the 3x3. detectron2: from its
    stored pixel_mean/pixel_std when present, else detectron2's defaults (MSRA-initialised)."""
    msra = {"model.input_format": "BGR", "model.pixel_mean": (103.530, 116.280, 123.675),
            "model.pixel_std": (1.0, 1.0, 1.0), "model.backbone.stride_in_1x1": True}
    torchvision = {"model.input_format": "RGB", "model.pixel_mean": (123.675, 116.280, 103.530),
                   "model.pixel_std": (58.395, 57.120, 57.375), "model.backbone.stride_in_1x1": False}
    notes = []
    if kind == "msra":
        changes = dict(msra)
    elif kind == "torchvision":
        changes = dict(torchvision)
    else:
        if "pixel_mean" in checkpoint:
            mean = tuple(round(float(x), 3) for x in np.ravel(checkpoint["pixel_mean"]))
            std = tuple(round(float(x), 3) for x in np.ravel(checkpoint.get("pixel_std", np.ones(3))))
            bgr = mean[0] < mean[2]           # blue has the lowest ImageNet mean
            changes = {"model.input_format": "BGR" if bgr else "RGB", "model.pixel_mean": mean,
                       "model.pixel_std": std, "model.backbone.stride_in_1x1": bgr}
            notes.append("pixel_mean/pixel_std from the checkpoint; channel order and stride_in_1x1 "
                         f"inferred from the mean's order ({'BGR: MSRA' if bgr else 'RGB: torchvision'} "
                         "initialisation)")
        else:
            changes = dict(msra)
            notes.append("the checkpoint stores no pixel_mean: assumed detectron2's defaults "
                         "(BGR, MSRA mean, std 1, stride_in_1x1=True)")
    if kind != "detectron2" or any(k.endswith("norm.running_mean") for k in checkpoint):
        changes["model.backbone.norm"] = "FrozenBN"
    elif any(re.fullmatch(r"backbone\.bottom_up\..*norm\.weight", k) for k in checkpoint):
        changes["model.backbone.norm"] = "GN"
    return changes, notes


def _roi_chw(layers: list[Layer], roi_channels: int | None) -> tuple[int, int, int] | None:
    """(C, H, W) of the box head's flattened input: C = the FPN's width, H = W from fc1's size."""
    by_name = {layer.name: layer for layer in layers}
    if roi_channels is None and "fpn/fpn_output2" in by_name:
        roi_channels = by_name["fpn/fpn_output2"].shape("kernel")[-1]
    fc1 = next((x for x in layers if re.fullmatch(FLATTENED_ROI_INPUT, x.name)), None)
    if fc1 is None:
        return None
    if roi_channels is None:
        raise WeightImportError(f"cannot tell the channels of {fc1.name}'s input (no FPN in the tree): "
                                "pass roi_channels")
    side = math.isqrt(fc1.shape("kernel")[0] // roi_channels)
    if side * side * roi_channels != fc1.shape("kernel")[0]:
        raise WeightImportError(f"{fc1.name} takes {fc1.shape('kernel')[0]} inputs, not C x R x R "
                                f"with C = {roi_channels}")
    return roi_channels, side, side


def _class_count_check(checkpoint: dict, layers: list[Layer], source: str) -> None:
    """Class-count mismatch first, with a hint, rather than as a list of mis-shaped keys."""
    key = next((k for k in sorted(checkpoint)
                if re.fullmatch(r"roi_heads\.box_predictor\.(\d+\.)?cls_score\.weight", k)), None)
    layer = next((x for x in layers if re.fullmatch(CLS_SCORE, x.name)), None)
    if key is not None and layer is not None:
        theirs = checkpoint[key].shape[0] - 1
        ours = layer.shape("kernel")[1] - 1
        if theirs != ours:
            raise WeightImportError(
                f"{source}: the checkpoint predicts {theirs} classes ({theirs + 1} logits with background) "
                f"but the model has model.num_classes={ours}; use --config.model.num_classes={theirs} "
                "(or a config for that dataset)")


def _hints(checkpoint: dict, layers: list[Layer], kind: str) -> list[str]:
    names = {layer.name for layer in layers}
    hints = []
    try:
        detected = detect_kind(checkpoint)
    except WeightImportError:
        detected = kind
    if detected != kind:
        hints.append(f"the keys look like a {detected} checkpoint, not {kind}: try --kind auto")
    if kind == "detectron2":
        ours_bmask = "mask_head/boundary_branch/boundary_predictor" in names
        theirs_bmask = "roi_heads.mask_head.boundary_predictor.weight" in checkpoint
        theirs_mrcnn = "roi_heads.mask_head.predictor.weight" in checkpoint
        if ours_bmask and theirs_mrcnn:
            hints.append("the checkpoint has Mask R-CNN's mask head: use configs/mask_rcnn.py")
        if not ours_bmask and theirs_bmask:
            hints.append("the checkpoint has the boundary-preserving mask head: use configs/bmask_rcnn.py")
    stage = {"detectron2": r"backbone\.bottom_up\.res4\.(\d+)\.", "torchvision": r"layer3\.(\d+)\.",
             "msra": r"res4_(\d+)_"}[kind]
    theirs = {int(m[1]) for k in checkpoint if (m := re.match(stage, k))}
    ours = {int(m[1]) for n in names if (m := re.match(r"backbone/res4_(\d+)/", n))}
    if theirs and ours and len(theirs) != len(ours):
        depth = {6: "ResNet-50", 23: "ResNet-101", 36: "ResNet-152"}
        hints.append(f"the checkpoint's res4 has {len(theirs)} blocks ({depth.get(len(theirs), '?')}), the model's "
                     f"{len(ours)} ({depth.get(len(ours), '?')}): set model.backbone.depth (e.g. the "
                     ":r101_fpn_1x variant)")
    return hints


def _norm_mismatch(layer: Layer, checkpoint: dict, module: str, kind: str) -> str | None:
    """A BatchNorm checkpoint against a GroupNorm model (or the reverse), said as such."""
    bn_key = f"{module}_s" if kind == "msra" else f"{module}.running_mean"
    if layer.kind == "group_norm" and bn_key in checkpoint:
        return (f"{module} holds BatchNorm weights but the model's {layer.name} is GroupNorm: set "
                "model.backbone.norm='FrozenBN'")
    if (layer.kind == "frozen_bn" and kind != "msra" and f"{module}.weight" in checkpoint
            and bn_key not in checkpoint):
        return (f"{module} has no running statistics (GroupNorm?) but the model's {layer.name} is FrozenBN: "
                "set model.backbone.norm='GN'")
    return None


def convert(checkpoint: dict[str, np.ndarray], params, frozen, kind: str = "auto", source: str = "checkpoint",
            roi_channels: int | None = None) -> tuple[dict, dict, ImportReport]:
    """Fill our 'params' and 'frozen' trees (nested dicts of arrays, or any subtree rooted like
    BMaskRCNN's: backbone/..., fpn/...) from a flat checkpoint dict.

    detectron2: every layer with a detectron2 name must be there, with the right shape, and
    every checkpoint key must be used (or be a known non-parameter, e.g. pixel_mean); layers
    detectron2 has no counterpart for (e.g. the Sobel or MaskIoU heads) keep their values and
    are reported as initialised fresh. msra / torchvision: the same for the backbone; all other
    layers keep their values (initialised fresh). Everything wrong is named in one
    WeightImportError. roi_channels: the box head's input width, when the trees hold no FPN.
    Returns new (params, frozen) trees as numpy arrays, and the report.
    """
    if kind == "auto":
        kind = detect_kind(checkpoint, source)
    if kind not in KINDS:
        raise WeightImportError(f"unknown kind {kind!r}; choose one of {KINDS} or 'auto'")
    layers = model_layers(params, frozen)
    _check_cascade(checkpoint, layers, kind, source)
    _class_count_check(checkpoint, layers, source)
    roi_chw = _roi_chw(layers, roi_channels) if kind in WHOLE_MODEL_KINDS else None
    changes, notes = implied_config_changes(kind, checkpoint)
    report = ImportReport(source, kind, config_changes=changes, notes=notes)

    new = {"params": _flatten(params), "frozen": _flatten(frozen)}
    missing, misshaped, problems, used = [], [], [], set()
    for layer in sorted(layers, key=lambda x: x.name):
        module = source_module(layer, RULES[kind])
        if module is None:
            report.initialised_fresh.append(layer.name)
            continue
        if (problem := _norm_mismatch(layer, checkpoint, module, kind)) is not None:
            problems.append(problem)
            continue
        roles = source_keys(kind, layer, module)
        used.update(k for k in roles.values() if k in checkpoint)
        absent, bad = _check_layer_keys(layer, roles, checkpoint)
        missing += absent
        misshaped += bad
        if absent or bad:
            continue
        arrays = {r: np.asarray(checkpoint[k], np.float32) for r, k in roles.items()}
        for leaf, value in convert_layer(layer, arrays, roi_chw).items():
            collection, path, shape = layer.leaves[leaf]
            assert value.shape == shape, (layer.name, leaf, value.shape, shape)
            new[collection][path] = np.ascontiguousarray(value, np.float32)
        report.loaded.extend(roles.values())

    leftover = sorted(set(checkpoint) - used)
    ignorable = [k for k in leftover if any(re.fullmatch(p, k) for p in IGNORED[kind])]
    unexpected = [k for k in leftover if k not in ignorable]
    report.ignored = ignorable
    if missing or misshaped or unexpected or problems:
        raise WeightImportError(_error_message(source, kind, missing, unexpected, misshaped, problems,
                                               _hints(checkpoint, layers, kind)))
    if kind == "detectron2" and report.initialised_fresh:
        report.notes.append("the layers initialised fresh have no detectron2 counterpart")
    return _unflatten(new["params"]), _unflatten(new["frozen"]), report


def _check_layer_keys(layer: Layer, roles: dict[str, str], checkpoint: dict) -> tuple[list[str], list[str]]:
    """(missing keys, mis-shaped keys) of one layer, each described for the error message."""
    expected = expected_source_shapes(layer, roles)
    missing = [f"{k} (for {layer.name})" for k in roles.values() if k not in checkpoint]
    misshaped = [f"{k}: checkpoint {tuple(checkpoint[k].shape)}, model expects {expected[r]} (for {layer.name})"
                 for r, k in roles.items() if k in checkpoint and tuple(checkpoint[k].shape) != expected[r]]
    return missing, misshaped


def _error_message(source, kind, missing, unexpected, misshaped, problems, hints) -> str:
    lines = [f"cannot import {source} ({kind}) into this model:"]
    for title, items in (("missing in the checkpoint", missing), ("unexpected in the checkpoint", unexpected),
                         ("mis-shaped", misshaped), ("norm mismatch", problems)):
        if items:
            lines.append(f"  {title} ({len(items)}):")
            lines += [f"    {item}" for item in items]
    lines += [f"  hint: {h}" for h in hints]
    return "\n".join(lines)


# =============================================================================================
# Train states and the command
# =============================================================================================

def load_into_state(state, path: str, kind: str = "auto"):
    """Import the weights at `path` into a train.TrainState's params and frozen collection.
    Returns (new state, ImportReport). The report's config_changes are what the weights imply
    (pixel format, normalisation, stride_in_1x1, norm); they are not applied to anything here:
    the model that runs this state must use them."""
    import jax
    import jax.numpy as jnp

    checkpoint = read_checkpoint(path)
    params, frozen, report = convert(checkpoint, jax.device_get(state.params), jax.device_get(state.frozen),
                                     kind, source=path)
    return state.replace(params=jax.tree_util.tree_map(jnp.asarray, params),
                         frozen=jax.tree_util.tree_map(jnp.asarray, frozen)), report


def apply_config_changes(config, changes: dict[str, Any], dry_run: bool = False) -> dict[str, tuple]:
    """Set dotted config keys (unless dry_run); returns {key: (old, new)} for those that differ."""
    differ = {}
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = config
        for p in parents:
            node = node[p]
        old = node[leaf]
        same = tuple(old) == tuple(value) if isinstance(value, tuple) else old == value
        if not same:
            differ[dotted] = (old, value)
            if not dry_run:
                node[leaf] = value
    return differ


def config_flags_for(changes: dict[str, Any]) -> str:
    """The --config.* flags that set these values on the command line."""
    def fmt(v):
        if isinstance(v, tuple):
            return "'(" + ", ".join(repr(float(x)) if isinstance(x, float) else str(x) for x in v) + ")'"
        return str(v)
    return " ".join(f"--config.{k}={fmt(v)}" for k, v in changes.items())


def new_train_state(config, rng=None, init: bool = True):
    """A step-0 train.TrainState for config: initialised (init=True; compiled on a small
    canvas, as the parameter shapes do not depend on it) or with zero parameters (init=False,
    no compilation; for imports that replace every parameter)."""
    import jax
    import jax.numpy as jnp

    from bmask_jax import train
    from bmask_jax.models.bmask_rcnn import BMaskRCNN

    rng = jax.random.PRNGKey(config.seed) if rng is None else rng
    small = config.copy_and_resolve_references()
    small.data.canvas_buckets = ((128, 128),)
    model = BMaskRCNN(config.model)
    if init:
        return train.create_train_state(small, model, rng)[0]
    abstract = jax.eval_shape(lambda: train.init_variables(small, model, rng))
    variables = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
    params = variables["params"]
    tx = train.make_optimizer(config, params)
    return train.TrainState(step=jnp.array(0, jnp.int32), params=params, frozen=variables.get("frozen", {}),
                            opt_state=tx.init(params), first_nonfinite_step=jnp.array(-1, jnp.int32),
                            num_skipped=jnp.array(0, jnp.int32))


def import_weights(config, source: str, output: str, kind: str = "auto",
                   apply_changes: bool = True) -> tuple[ImportReport, dict[str, tuple]]:
    """Read `source`, apply the config changes its weights imply (apply_changes), import it
    into a step-0 TrainState of `config` and save that as an Orbax checkpoint under
    output/checkpoints, so that `--workdir output` trains from it or evaluates it (with the
    same config). Writes output/weights_import.json. Returns the report and
    {config key: (old, new)} where the config differed from what the weights imply."""
    import jax
    import jax.numpy as jnp

    from bmask_jax import checkpoints

    checkpoint = read_checkpoint(source)
    kind = detect_kind(checkpoint, source) if kind == "auto" else kind
    changes, _ = implied_config_changes(kind, checkpoint)
    differ = apply_config_changes(config, changes, dry_run=not apply_changes)
    mgr = checkpoints.manager(output, keep=1, async_save=False)
    if mgr.latest_step() is not None:
        raise FileExistsError(f"{mgr.directory} already holds a checkpoint (step {mgr.latest_step()}); "
                              "choose an empty --output")
    # Whole-model imports replace every parameter: skip the (compiled) initialisation unless
    # some layer has no counterpart in the checkpoint.
    state = new_train_state(config, init=kind not in WHOLE_MODEL_KINDS)
    params, frozen, report = convert(checkpoint, _host(state.params), _host(state.frozen), kind, source)
    if report.initialised_fresh and kind in WHOLE_MODEL_KINDS:
        state = new_train_state(config, init=True)
        params, frozen, report = convert(checkpoint, _host(state.params), _host(state.frozen), kind, source)
    state = state.replace(params=jax.tree_util.tree_map(jnp.asarray, params),
                          frozen=jax.tree_util.tree_map(jnp.asarray, frozen))
    checkpoints.save(mgr, 0, state, force=True)
    mgr.wait_until_finished()
    mgr.close()
    with open(os.path.join(output, "weights_import.json"), "w") as f:
        json.dump(dict(report.to_dict(), config_differences=differ, config_changes_applied=apply_changes,
                       flags=config_flags_for({k: new for k, (_, new) in differ.items()})), f, indent=2, default=str)
    return report, differ


def _host(tree):
    import jax
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def _define_flags():
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "Config file, optionally with a variant: file.py:variant.",
                                    lock_config=True)
    flags.DEFINE_string("source", None, "Weight file: detectron2 .pth/.pkl, MSRA R-50.pkl, torchvision .pth.")
    flags.DEFINE_string("output", None, "Directory to write the Orbax checkpoint to (a --workdir).")
    flags.DEFINE_enum("kind", "auto", ("auto",) + KINDS, "What the weight file is.")
    flags.DEFINE_bool("apply_config_changes", True,
                      "Apply the pixel format/normalisation/stride/norm the weights imply.")
    flags.mark_flags_as_required(["config", "source", "output"])


def main(argv):
    del argv
    from absl import flags
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    f = flags.FLAGS
    report, differ = import_weights(f.config, f.source, f.output, f.kind, f.apply_config_changes)
    print(report)
    print(f"wrote a step-0 checkpoint to {os.path.join(f.output, 'checkpoints')}")
    if not differ:
        print("the config already matches what the weights imply")
        return
    print(("changed the config for these weights: " if f.apply_config_changes else
           "WARNING: the config differs from what the weights imply: ")
          + "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in differ.items()))
    if f.apply_config_changes:
        print(f"train or evaluate --workdir {f.output} with the same config and:\n  "
              + config_flags_for({k: new for k, (_, new) in differ.items()}))


if __name__ == "__main__":
    from absl import app
    _define_flags()
    app.run(main)
