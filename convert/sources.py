"""A model to convert, whatever its format: everything known before any weight is read."""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from . import gguf
from .architectures import Architecture, architecture_for
from .dequant import Deferred, dequantized_kinds
from .errors import ConvertError
from .quantize import Quantized
from .readers import load_shard, read_config, tensor_infos, weight_files
from .safety import SAFETY_FILE
from .tokenizer_files import tokenizer_files

SHARD_BYTES = 128 << 20  # GGUF output is written in shards of about this many fp32 bytes, so peak
# memory stays near one shard: each chunk is dequantized, written, and dropped (`load` pops it).


@dataclass
class Source:
    """A checkpoint as the pipeline sees it.

    `shapes`/`dtypes` are keyed by HF / mlx-lm tensor name (logical shapes for quantized
    tensors); `shards` are opaque handles that `load` turns into {name: array or Quantized}, one
    at a time; `tokenizer` maps file names to a path to copy or text to write; `safety` holds
    safety parts already in MLX layout (an mlx-safesig folder given as input).
    """

    path: Path
    config: dict
    arch: Architecture
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, mx.Dtype]
    shards: list
    load: Callable[[object], dict]
    shard_bytes: Callable[[object], int]
    tokenizer: dict[str, "Path | str"]
    safety: dict[str, mx.array] = field(default_factory=dict)


def open_source(path: Path, keep_quantized: bool = False, report=None) -> Source:
    """The Source at `path`: a `.gguf` file, a folder holding one, or an HF / mlx-lm folder.
    `report` (a function of one line) hears what is done beyond reading: dequantizing."""
    path = Path(path)
    if not path.exists():
        raise ConvertError(f"{path}: no such file or folder.")
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            path = ggufs[0]
    if path.is_file():
        if path.suffix != ".gguf":
            raise ConvertError(f"{path}: expected a model folder or a .gguf file.")
        return gguf_source(path, keep_quantized, report or (lambda message: None))
    return folder_source(path)


def folder_source(folder: Path) -> Source:
    """An HF folder (safetensors / .bin, single or sharded) or an mlx-lm folder."""
    config = read_config(folder)
    arch = architecture_for(config.get("model_type"), str(folder / "config.json"))
    if "quantization" in config:
        raise ConvertError(f"{folder / 'config.json'}: quantized mlx-lm input is not supported.")
    files = weight_files(folder)
    infos = tensor_infos(files)
    safety = {}
    if (folder / SAFETY_FILE).is_file():
        safety = mx.load(str(folder / SAFETY_FILE))
    return Source(
        path=folder,
        config=config,
        arch=arch,
        shapes={k: v.shape for k, v in infos.items()},
        dtypes={k: v.dtype for k, v in infos.items()},
        shards=files,
        load=load_shard,
        shard_bytes=lambda f: f.stat().st_size,
        tokenizer=tokenizer_files(folder),
        safety=safety,
    )


def gguf_source(path: Path, keep_quantized: bool, report) -> Source:
    """A llama.cpp GGUF file: fp32 tensors (or `Quantized` ones with `keep_quantized`); a file
    only the gguf package reads gives fp32 tensors dequantized as each shard is loaded."""
    metadata, raw = gguf.read_gguf(path)
    arch = gguf.gguf_architecture(metadata, path)
    config = gguf.gguf_config(metadata, raw.keys(), arch, path)
    tensors = gguf.gguf_tensors(raw, config, arch, path, keep_quantized)
    kinds = dequantized_kinds(tensors)
    if kinds:
        report(
            f"{path.name}: MLX cannot read this file; dequantizing its {'/'.join(kinds)} tensors"
            " to float32 with gguf, shard by shard"
            + (" (then MLX's own quantization)" if keep_quantized else "")
        )
    chunks, size = [[]], 0
    for name, t in tensors.items():
        n = 4 * t.shape[0] * (t.shape[1] if len(t.shape) > 1 else 1)
        if size + n > SHARD_BYTES and chunks[-1]:
            chunks.append([])
            size = 0
        chunks[-1].append(name)
        size += n
    return Source(
        path=path,
        config=config,
        arch=arch,
        shapes={k: tuple(t.shape) for k, t in tensors.items()},
        dtypes={k: mx.float32 for k in tensors},
        shards=chunks,
        load=lambda names: {k: _made(tensors.pop(k)) for k in names},
        shard_bytes=lambda names: sum(_nbytes(tensors[k]) for k in names if k in tensors),
        tokenizer=gguf.gguf_tokenizer_files(metadata, path),
    )


def _made(t):
    return t.make() if isinstance(t, Deferred) else t


def _nbytes(t) -> int:
    if isinstance(t, Quantized):
        return t.weight.nbytes + t.scales.nbytes + t.biases.nbytes
    return t.nbytes
