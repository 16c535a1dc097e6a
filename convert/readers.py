"""Hugging Face and mlx-lm model folders as a conversion source, streamed one shard at a time.

Weights may be `model.safetensors`, sharded safetensors with `model.safetensors.index.json`,
`pytorch_model.bin` or sharded `.bin` with `pytorch_model.bin.index.json` (mlx-lm folders are
safetensors folders too). Shapes and dtypes come from the safetensors headers and the pickles
alone, so the whole conversion is checked before any weight is read.
"""

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .errors import ConvertError
from .unpickle import StorageReader, read_state_dict

SAFETENSORS_DTYPES = {
    "F32": mx.float32,
    "F16": mx.float16,
    "BF16": mx.bfloat16,
    "F64": mx.float32,
    "I64": mx.int64,
    "I32": mx.int32,
    "I16": mx.int16,
    "I8": mx.int8,
    "U8": mx.uint8,
    "U32": mx.uint32,
    "BOOL": mx.bool_,
}
# (single file, index) in order of preference
LAYOUTS = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)


@dataclass(frozen=True)
class TensorInfo:
    """What a checkpoint says about one tensor before it is read."""

    shape: tuple[int, ...]
    dtype: mx.Dtype
    file: Path


def read_config(folder: Path) -> dict:
    """The folder's config.json as a dict."""
    path = folder / "config.json"
    if not path.is_file():
        raise ConvertError(f"{path}: no config.json in the model folder.")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: not valid JSON ({e.__class__.__name__}).") from None
    if not isinstance(config, dict):
        raise ConvertError(f"{path}: not a JSON object.")
    return config


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint files of `folder`, in shard order.

    Safetensors win over `.bin` when both are present. An index must name only files that exist.
    """
    for single, index in LAYOUTS:
        if (folder / index).is_file():
            return _indexed_files(folder / index)
        if (folder / single).is_file():
            return [folder / single]
    mlx_shards = sorted(folder.glob("model-*.safetensors"))
    if mlx_shards:
        return mlx_shards
    raise ConvertError(
        f"{folder}: no weights found (model.safetensors, pytorch_model.bin or an index)."
    )


def _indexed_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ConvertError(f"{index}: not a shard index (no weight_map).") from None
    files = list(dict.fromkeys(weight_map.values()))
    for name in files:
        if not (index.parent / name).is_file():
            raise ConvertError(f"{index}: names shard {name}, which does not exist.")
    return [index.parent / name for name in files]


def safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Name -> TensorInfo from a safetensors header; a file shorter than its header promises is
    reported as truncated."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConvertError(f"{path}: truncated safetensors file (no header).")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ConvertError(f"{path}: truncated safetensors file (header cut short).")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConvertError(f"{path}: damaged safetensors header.") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise ConvertError(
            f"{path}: truncated safetensors file ({size} bytes, header needs {8 + n + end})."
        )
    infos = {}
    for name, v in header.items():
        if v["dtype"] not in SAFETENSORS_DTYPES:
            raise ConvertError(f"{path}: tensor {name} has unsupported dtype {v['dtype']}.")
        infos[name] = TensorInfo(tuple(v["shape"]), SAFETENSORS_DTYPES[v["dtype"]], path)
    return infos


def bin_header(path: Path) -> dict[str, TensorInfo]:
    """Name -> TensorInfo from a torch zip checkpoint's pickle (read with the safe unpickler)."""
    return {k: TensorInfo(r.shape, r.dtype, path) for k, r in read_state_dict(path).items()}


def tensor_infos(files: list[Path]) -> dict[str, TensorInfo]:
    """Name -> TensorInfo over all shards; a name in two shards is an error."""
    infos: dict[str, TensorInfo] = {}
    for path in files:
        header = safetensors_header(path) if path.suffix == ".safetensors" else bin_header(path)
        for name, info in header.items():
            if name in infos:
                raise ConvertError(f"{path}: tensor {name} is also in {infos[name].file.name}.")
            infos[name] = info
    return infos


def load_shard(path: Path) -> dict[str, mx.array]:
    """All tensors of one checkpoint file as MLX arrays, in their stored dtype (fp64 -> fp32)."""
    if path.suffix == ".safetensors":
        try:
            tensors = mx.load(str(path))
        except Exception as e:  # mlx's own wording; the header was already checked
            raise ConvertError(f"{path}: cannot read safetensors ({e}).") from None
        return {k: v.astype(mx.float32) if v.dtype == mx.float64 else v for k, v in tensors.items()}
    refs = read_state_dict(path)
    with StorageReader(path) as reader:
        return {name: reader.read(ref) for name, ref in refs.items()}
