"""Read PyTorch zip checkpoints (`pytorch_model.bin`) without torch and without running the pickle.

A torch checkpoint is a zip: `<name>/data.pkl` describes the state dict, `<name>/data/<key>` hold
the raw storages. The pickle is read by an unpickler that knows only what a state dict needs --
`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2` / `_rebuild_parameter`, the storage
classes and persistent storage ids -- and maps each of those to a harmless stand-in of its own.
Any other global is refused before anything is called, so nothing from the file is executed.
"""

import collections
import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import ConvertError

# storage class -> (numpy dtype of the raw bits, mlx dtype); bf16 travels as uint16 bits
STORAGE_DTYPES = {
    "FloatStorage": (np.float32, mx.float32),
    "HalfStorage": (np.float16, mx.float16),
    "BFloat16Storage": (np.uint16, mx.bfloat16),
    "DoubleStorage": (np.float64, mx.float32),
    "LongStorage": (np.int64, mx.int64),
    "IntStorage": (np.int32, mx.int32),
    "ShortStorage": (np.int16, mx.int16),
    "CharStorage": (np.int8, mx.int8),
    "ByteStorage": (np.uint8, mx.uint8),
    "BoolStorage": (np.bool_, mx.bool_),
}


@dataclass(frozen=True)
class StorageType:
    """Stand-in for a `torch.*Storage` class: only its name is kept."""

    name: str


@dataclass(frozen=True)
class Storage:
    """One storage of the zip: its data entry key, element type and element count."""

    key: str
    kind: StorageType
    numel: int


@dataclass(frozen=True)
class TensorRef:
    """A tensor described by the pickle, not yet read: a strided view into a storage."""

    storage: Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> mx.Dtype:
        """The MLX dtype the tensor is read as."""
        return STORAGE_DTYPES[self.storage.kind.name][1]


def _rebuild_tensor_v2(storage, offset, shape, stride, requires_grad=False, hooks=None, *meta):
    if not isinstance(storage, Storage):
        raise pickle.UnpicklingError("a tensor is not built on a storage of the file")
    return TensorRef(storage, int(offset), tuple(map(int, shape)), tuple(map(int, stride)))


def _rebuild_parameter(data, requires_grad=False, hooks=None):
    if not isinstance(data, TensorRef):
        raise pickle.UnpicklingError("a parameter does not wrap a tensor")
    return data


ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): StorageType(name) for name in STORAGE_DTYPES},
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only rebuilds a state dict of `TensorRef`s; see the module docstring."""

    def __init__(self, data: bytes, path: Path):
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module, name):
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise ConvertError(
                f"{self.path}: refused pickle global {module}.{name} (only tensors are read)."
            ) from None

    def persistent_load(self, pid):
        if (
            not isinstance(pid, tuple)
            or len(pid) != 5
            or pid[0] != "storage"
            or not isinstance(pid[1], StorageType)
        ):
            raise ConvertError(f"{self.path}: unexpected persistent id in the pickle.")
        _, kind, key, _location, numel = pid
        return Storage(str(key), kind, int(numel))


def _pickle_entry(zf: zipfile.ZipFile, path: Path) -> str:
    pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
        raise ConvertError(f"{path}: not a PyTorch zip checkpoint (no single data.pkl).")
    return pickles[0]


def read_state_dict(path: Path) -> dict[str, TensorRef]:
    """Name -> `TensorRef` for the torch zip checkpoint at `path` (no tensor data is read).

    Raises ConvertError for a legacy (non-zip) file, a refused global, or anything in the pickle
    that is not a mapping of names to tensors.
    """
    if not zipfile.is_zipfile(path):
        raise ConvertError(f"{path}: not a PyTorch zip checkpoint (legacy or damaged file).")
    with zipfile.ZipFile(path) as zf:
        entry = _pickle_entry(zf, path)
        prefix = entry.removesuffix("data.pkl")
        names = set(zf.namelist())
        order = (
            zf.read(f"{prefix}byteorder").decode() if f"{prefix}byteorder" in names else "little"
        )
        if order.strip() != "little":
            raise ConvertError(f"{path}: big-endian checkpoints are not supported.")
        try:
            state = RestrictedUnpickler(zf.read(entry), path).load()
        except ConvertError:
            raise
        except Exception as e:  # any other pickle trick: a reduce we did not expect, bad opcodes
            raise ConvertError(f"{path}: unexpected pickle content ({e}).") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, TensorRef) for k, v in state.items()
    ):
        raise ConvertError(f"{path}: the pickle is not a state dict of named tensors.")
    return dict(state)


class StorageReader:
    """Reads tensors out of a torch zip checkpoint one at a time, each with a single read of
    just its bytes (no memory map, so resident memory stays at the arrays already built)."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "rb")
        self.zip = zipfile.ZipFile(self.file)
        self.prefix = _pickle_entry(self.zip, path).removesuffix("data.pkl")

    def close(self):
        """Release the file."""
        self.zip.close()
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _read(self, storage: Storage, start: int, size: int) -> bytes:
        name = f"{self.prefix}data/{storage.key}"
        try:
            info = self.zip.getinfo(name)
        except KeyError:
            raise ConvertError(f"{self.path}: storage {name} is missing.") from None
        if start + size > info.file_size:
            raise ConvertError(f"{self.path}: storage {storage.key} is truncated.")
        if info.compress_type != zipfile.ZIP_STORED:
            return self.zip.read(name)[start : start + size]
        # local file header: 30 bytes + name + extra field, then the stored bytes
        self.file.seek(info.header_offset)
        header = self.file.read(30)
        skip = int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
        self.file.seek(info.header_offset + 30 + skip + start)
        data = self.file.read(size)
        if len(data) < size:
            raise ConvertError(f"{self.path}: storage {storage.key} is truncated.")
        return data

    def read(self, ref: TensorRef) -> mx.array:
        """The tensor `ref` as an MLX array (bf16 rebuilt from its raw bits; fp64 as fp32)."""
        np_dtype, mx_dtype = STORAGE_DTYPES[ref.storage.kind.name]
        bad = len(ref.stride) != len(ref.shape) or any(x < 0 for x in ref.stride + ref.shape)
        if bad or ref.offset < 0:
            raise ConvertError(f"{self.path}: a tensor has a bad stride, size or offset.")
        span = 1 + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride, strict=True))
        span = 0 if 0 in ref.shape else span
        if ref.offset + span > ref.storage.numel:
            raise ConvertError(f"{self.path}: a tensor reaches outside its storage.")
        itemsize = np.dtype(np_dtype).itemsize
        raw = self._read(ref.storage, ref.offset * itemsize, span * itemsize)
        view = np.lib.stride_tricks.as_strided(
            np.frombuffer(raw, dtype=np_dtype, count=span),
            shape=ref.shape,
            strides=tuple(s * itemsize for s in ref.stride),
            writeable=False,
        )
        out = mx.array(np.ascontiguousarray(view))
        if mx_dtype == mx.bfloat16:
            return out.view(mx.bfloat16)
        return out.astype(mx_dtype) if out.dtype != mx_dtype else out
