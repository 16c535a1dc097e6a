"""The strategic attention of the method (SPEC §3): mask building, RoPE at explicit positions, SDPA.

Masks are boolean arrays, True = may attend, shaped ``[L, K]`` (queries x keys) and broadcast over
batch and heads. The ``[CLS]`` rules in one place:

* scoring (plain text): ``[CLS]`` attends to every text token and itself; nobody attends to it.
* SFT / prompt prefill: ``[CLS]`` attends to the query span and itself; only response tokens attend
  to it.
* probe (generation time): a transient ``[CLS]`` row attends to a window of cache slots and itself.

A row is never fully masked: ``[CLS]`` always sees itself, every other token sees itself causally.
"""

from typing import Sequence, Union

import mlx.core as mx
import numpy as np
from mlx_lm.models.base import scaled_dot_product_attention

Positions = Union[int, mx.array]


def rope_at(rope, x: mx.array, positions: Positions) -> mx.array:
    """Apply ``rope`` to ``x`` [B, H, L, D] at ``positions``.

    An int is the position of the first token, the rest follow contiguously (mx.fast.rope's fast
    path). An array [L] or [B, L] gives every token its own position: the time axis is folded into
    the batch so that mx.fast.rope's per-batch offset becomes a per-token position. A ``(cos, sin)``
    pair from ``rope_table`` applies that precomputed rotation instead.
    """
    if isinstance(positions, int):
        return rope(x, offset=positions)
    if isinstance(positions, tuple):
        cos, sin = positions
        half = x.shape[-1] // 2
        rotated = mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return (x * cos + rotated * sin).astype(x.dtype)
    B, H, L, D = x.shape
    offsets = mx.broadcast_to(positions, (B, L)).reshape(B * L)
    y = rope(x.transpose(0, 2, 1, 3).reshape(B * L, H, 1, D), offset=offsets)
    return y.reshape(B, L, H, D).transpose(0, 2, 1, 3)


def rope_table(rope, positions: Positions, head_dim: int) -> Positions:
    """``positions`` [L] / [B, L] -> ``(cos, sin)`` float32 [L, D] / [B, 1, L, D] with
    ``rope(x) == x * cos + rotate_half(x) * sin`` at those positions, for ``rope_at``.

    On CPU mx.fast.rope with per-token offsets costs ~50 us per call, twice per layer per decode
    step (~3 ms a step for a 30-layer model); the table is computed once per step by ``rope``
    itself (any variant that rotates pairs (i, i + D/2) of the full head: its output on the basis
    [1 .. 1, 0 .. 0] is [cos, sin], scaling included) and applied by cheap fused elementwise ops.
    Other positions, and ropes that are traditional or rotate part of the head, pass through.
    """
    if (isinstance(positions, int) or getattr(rope, "traditional", True)
            or getattr(rope, "dims", None) != head_dim):
        return positions
    half = head_dim // 2
    basis = mx.concatenate([mx.ones(half), mx.zeros(half)])
    flat = positions.reshape(-1)
    table = rope(mx.broadcast_to(basis, (flat.size, 1, 1, head_dim)), offset=flat)
    table = table.reshape(*positions.shape, head_dim)
    cos = mx.concatenate([table[..., :half]] * 2, axis=-1)
    sin = mx.concatenate([table[..., half:]] * 2, axis=-1)
    if positions.ndim == 2:
        cos, sin = cos[:, None], sin[:, None]
    return cos, sin


def attend(queries, keys, values, *, scale: float, mask, cache=None) -> mx.array:
    """SDPA through ``mx.fast.scaled_dot_product_attention`` (mlx-lm's wrapper, which also handles
    quantized KV caches). ``mask`` is None, ``"causal"`` or a bool array broadcastable to
    [B, H, L, K]."""
    return scaled_dot_product_attention(queries, keys, values, cache=cache, scale=scale, mask=mask)


def causal_mask(n: int, offset: int = 0) -> mx.array:
    """[n, offset + n]: token i (at cache slot offset + i) sees slots 0..offset + i."""
    rows = mx.arange(offset, offset + n)[:, None]
    cols = mx.arange(offset + n)[None]
    return rows >= cols


def scoring_mask(n_text: int) -> mx.array:
    """Mask for ``[CLS] t_1 .. t_n`` (pretraining-style scoring), shape [n+1, n+1].

    Row 0 (``[CLS]``) sees every token and itself; column 0 is seen by nobody but ``[CLS]``.
    """
    return sft_mask(n_text + 1, range(1, n_text + 1), response_start=n_text + 1)


def sft_mask(length: int, query_slots: Sequence[int], response_start: int) -> mx.array:
    """Mask for ``[CLS] <bos> <template> <query> <template> <response>`` (SFT / prompt prefill).

    Shape [length, length]. ``query_slots`` = slot indices of the query tokens (the content of
    every message, SPEC §3b: not always one contiguous span), ``response_start`` = slot of the
    first response token. ``[CLS]`` (slot 0) sees the query slots and itself; column 0 is seen by
    ``[CLS]`` and response tokens only.
    """
    idx = mx.arange(length)
    mask = causal_mask(length)
    row = np.zeros(length, dtype=bool)
    row[np.asarray(list(query_slots), dtype=np.int64)] = True
    row[0] = True
    cls_row = mx.array(row)
    cls_col = (idx >= response_start) | (idx == 0)
    mask = mx.where((idx == 0)[None, :], cls_col[:, None], mask)
    return mx.where((idx == 0)[:, None], cls_row[None, :], mask)


def cls_row(row: np.ndarray, slot: int, sees: Sequence[int]) -> np.ndarray:
    """The ``[CLS]`` rule on one bool mask row, in place: a ``[CLS]`` (the query verdict or a
    probe) at ``slot`` sees the slots ``sees`` (its query slots, or its window, with the query's
    when the window includes it) and itself, nothing else. Returns ``row``."""
    row[:] = False
    row[np.asarray(list(sees), dtype=np.int64)] = True
    row[slot] = True
    return row


def window_row(n_slots: int, window: Sequence[int]) -> mx.array:
    """Bool row [n_slots + 1]: a probe at slot ``n_slots`` sees the cache slots in ``window`` and
    itself."""
    return mx.array(cls_row(np.zeros(n_slots + 1, dtype=bool), n_slots, window))


def prompt_verdict_mask(n_cached: int, n_tokens: int, query: Sequence[int],
                        pad: int = 0) -> np.ndarray:
    """Bool [pad + n_tokens + 1, n_cached + pad + n_tokens + 1] for a prompt chunk with the query
    verdict riding after it: ``pad`` left-padding rows (a batch's shorter prompts; they see only
    padding), the chunk's tokens causal over the ``n_cached`` slots before them and each other
    (never padding, never the ``[CLS]``), then the ``[CLS]``, seeing the prompt slots ``query``
    (counted without padding; padding only precedes a chunk with nothing cached) and itself."""
    rows = pad + n_tokens
    mask = np.tril(np.ones((rows + 1, n_cached + rows + 1), dtype=bool), k=n_cached)
    mask[pad:rows, n_cached : n_cached + pad] = False
    mask[rows] = False
    mask[rows, pad + np.asarray(query, dtype=np.int64)] = True
    mask[rows, -1] = True
    return mask


def decode_probe_mask(n_slots: int, window: Sequence[int]) -> mx.array:
    """Mask [2, n_slots + 2] for the fused step ``[token, [CLS]]`` appended after ``n_slots`` cached
    slots: the token sees every earlier slot and itself (not the probe); the probe sees ``window``
    and itself."""
    token_row = mx.arange(n_slots + 2) <= n_slots
    probe_row = window_row(n_slots + 1, window)
    return mx.stack([token_row, probe_row])

