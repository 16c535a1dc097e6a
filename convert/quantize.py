"""Quantized tensors in MLX's affine layout, and the rule for which tensors get quantized.

The safety parts (`cls_embed`, the head) and norms are never quantized: they live in a separate
file or are 1-D, and only 2-D `.weight` matrices of the language model qualify.
"""

from collections import Counter
from dataclasses import dataclass

import mlx.core as mx

GROUP_SIZE = 64  # mlx-lm's default for affine quantization


@dataclass(frozen=True)
class Quantized:
    """One weight matrix in MLX affine form: `weight` packed uint32 [rows, cols * bits / 32],
    `scales` and `biases` [rows, cols / group_size]."""

    weight: mx.array
    scales: mx.array
    biases: mx.array
    group_size: int
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        """The logical (unpacked) shape [rows, cols]."""
        return (self.weight.shape[0], self.scales.shape[-1] * self.group_size)

    def take_rows(self, index: mx.array) -> "Quantized":
        """The same matrix with its rows reordered or selected by `index`."""
        return Quantized(
            self.weight[index], self.scales[index], self.biases[index], self.group_size, self.bits
        )

    def dequantize(self, dtype=mx.float32) -> mx.array:
        """The float matrix [rows, cols]; scales and biases are widened first so fp16 scales
        lose nothing."""
        return mx.dequantize(
            self.weight,
            self.scales.astype(mx.float32),
            self.biases.astype(mx.float32),
            group_size=self.group_size,
            bits=self.bits,
        ).astype(dtype)


def qualifies(name: str, shape: tuple[int, ...], group_size: int = GROUP_SIZE) -> bool:
    """Whether the language-model tensor `name` is quantized (as mlx-lm would: the weights of
    Linear and Embedding layers whose input size divides into groups)."""
    return name.endswith(".weight") and len(shape) == 2 and shape[-1] % group_size == 0


def quantize(x: mx.array, bits: int, group_size: int = GROUP_SIZE) -> Quantized:
    """`x` [rows, cols] quantized with mlx's affine scheme (scales in `x`'s dtype)."""
    weight, scales, biases = mx.quantize(x, group_size=group_size, bits=bits)
    return Quantized(weight, scales, biases, group_size, bits)


def quantization_block(tensors: dict[str, "Quantized"]) -> dict:
    """The `quantization` config block mlx-lm reads: the most common bits and group size, plus
    one entry per layer that differs from them (GGUF files mix 4- and 8-bit tensors)."""
    counts = Counter((q.bits, q.group_size) for q in tensors.values())
    bits, group_size = counts.most_common(1)[0][0]
    block = {"group_size": group_size, "bits": bits, "mode": "affine"}
    for name, q in tensors.items():
        if (q.bits, q.group_size) != (bits, group_size):
            layer = name.removesuffix(".weight")
            block[layer] = {"group_size": q.group_size, "bits": q.bits, "mode": "affine"}
    return block


def as_saved(name: str, t: "Quantized | mx.array") -> dict[str, mx.array]:
    """The safetensors entries for one tensor: `name` itself, or its weight/scales/biases."""
    if not isinstance(t, Quantized):
        return {name: t}
    layer = name.removesuffix(".weight")
    return {f"{layer}.weight": t.weight, f"{layer}.scales": t.scales, f"{layer}.biases": t.biases}
