"""GGUF files MLX's reader refuses, read with llama.cpp's own `gguf` package instead.

`mx.load` reads only F32/F16/Q4_0/Q4_1/Q8_0 tensors; the files most people have are k-quant
mixes (Q4_K_M holds Q4_K, Q5_0, Q6_K, Q8_0, F32). `gguf.GGUFReader` reads any of them: the
metadata here comes out as the same plain Python values `read_gguf` gives for a file MLX reads,
and each tensor is dequantized to float32 by `gguf.quants.dequantize` only when its shard is
written (a `Deferred`), so peak memory stays near one output shard.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import ConvertError

FLOAT_TYPES = ("F32", "F16")  # stored as floats: nothing to dequantize


@dataclass(frozen=True)
class Deferred:
    """A float32 tensor not made yet: its shape, the function that makes it, and the GGUF type
    it is stored in (`kind`, e.g. "Q4_K")."""

    shape: tuple[int, ...]
    make: Callable[[], mx.array]
    kind: str

    @property
    def nbytes(self) -> int:
        """The bytes it will take once made."""
        return 4 * math.prod(self.shape)

    def take_rows(self, index: mx.array) -> "Deferred":
        """The same tensor with its rows reordered or selected by `index` once made."""
        make = self.make
        return Deferred((index.shape[0], *self.shape[1:]), lambda: make()[index], self.kind)


def read_with_gguf(path: Path, mlx_error: Exception) -> tuple[dict, dict[str, Deferred]]:
    """(metadata with plain Python values, name -> Deferred) of a GGUF file `mx.load` failed on
    with `mlx_error`; a file gguf cannot read either is one ConvertError naming the reason."""
    try:
        import gguf  # only files MLX cannot read need it
    except ImportError:
        raise ConvertError(
            f"{path}: MLX cannot read this GGUF ({mlx_error}) and the gguf package that can "
            "is not installed: pip install gguf"
        ) from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError (and numpy's) with its own wording
        raise ConvertError(f"{path}: not a readable GGUF file ({_reason(mlx_error, e)}).") from None
    if reader.byte_order != "I":
        raise ConvertError(f"{path}: a GGUF file of the other byte order is not supported.")
    metadata = {
        key: _value(field, gguf.GGUFValueType)
        for key, field in reader.fields.items()
        if not key.startswith("GGUF.")  # the reader's own entries (version, counts)
    }
    tensors = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        rows = t.data.reshape(-1, t.data.shape[-1])
        try:  # one row now: a type gguf cannot dequantize fails here, before anything is written
            gguf.quants.dequantize(rows[:1], t.tensor_type)
        except NotImplementedError:
            raise ConvertError(
                f"{path}: tensor {t.name} is stored as {kind}, which gguf {gguf_version()} "
                "cannot dequantize."
            ) from None
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        make = partial(_dequantize, gguf.quants.dequantize, t.data, t.tensor_type, shape)
        tensors[t.name] = Deferred(shape, make, kind)
    return metadata, tensors


def dequantized_kinds(tensors: dict) -> list[str]:
    """The GGUF types among `tensors` that are dequantized when made (F32/F16 are not)."""
    kinds = {t.kind for t in tensors.values() if isinstance(t, Deferred)}
    return sorted(kinds - set(FLOAT_TYPES))


def gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "?"


def _dequantize(dequantize, data: np.ndarray, qtype, shape: tuple[int, ...]) -> mx.array:
    values = dequantize(data, qtype)  # float32; a view of the mapped file for F32 tensors
    return mx.array(np.ascontiguousarray(values, dtype=np.float32).reshape(shape))


def _value(field, types):
    """A metadata field as `mx.load` gives it after `read_gguf`'s `_plain`: str, int, bool,
    float (float32 ones printed short: 1e-05), or a list of them."""
    kind = types(field.types[0])
    if kind == types.ARRAY:
        if types(field.types[-1]) == types.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [v for i in field.data for v in field.parts[i].tolist()]
    if kind == types.STRING:
        return bytes(field.parts[-1]).decode("utf-8")
    value = field.parts[-1].tolist()[0]
    if kind == types.FLOAT32:
        return float(str(np.float32(value)))
    return value


def _reason(mlx_error: Exception, gguf_error: Exception) -> str:
    """Why neither reader took the file, in one phrase: MLX's wording unless MLX only refused a
    tensor type (then gguf's, whose short-data failure is worded for people)."""
    if "gguf_tensor_to_f16" not in str(mlx_error):
        return str(mlx_error)
    if "cannot reshape array" in str(gguf_error):
        return "a tensor's data runs past the end of the file: truncated or damaged"
    return f"gguf: {gguf_error}"
