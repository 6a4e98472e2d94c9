"""Safe readers: pickles and PyTorch files (zip and legacy) read without executing anything
and without torch. Only numpy's array reconstruction and torch's tensor rebuild (reimplemented
over numpy) are allowed as globals."""
from __future__ import annotations

import dataclasses
import io
import math
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

from bmask_jax.weights.errors import DamagedWeightsError, UnsafeCheckpointError, WeightImportError


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
        if math.prod(size) > data.shape[0]:
            # More elements than its storage holds: only a broadcast view (a zero stride) can be,
            # and a saved weight never is one; copying it out could take any amount of memory.
            raise WeightImportError(f"{source}: tensor of size {size} ({math.prod(size)} elements) over storage "
                                    f"{self.storage.key!r} of {data.shape[0]} elements (stride {stride})")
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
    stream, or a plain pickle. Tensors come back as numpy arrays. A file that cannot be parsed
    (cut short, damaged) raises DamagedWeightsError naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no weight file at {path}")
    try:
        return _read_raw(path)
    except (UnsafeCheckpointError, WeightImportError):
        raise
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, zlib.error, ValueError, KeyError, IndexError,
            TypeError, AttributeError, struct.error, UnicodeDecodeError, OverflowError) as e:
        raise DamagedWeightsError(f"{path}: cannot be read, cut short or damaged "
                                  f"({type(e).__name__}: {str(e)[:200]})") from None


def _read_raw(path: str) -> Any:
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
