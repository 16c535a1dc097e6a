"""The language model's own surprisal of a query: a token-level anomaly signal (issue 26).

An optimised adversarial suffix is text no one writes: its tokens are improbable under the
model. The surprisal of a query-slot token is -log p(token | every token before it, template
included), in nats. The surprisal gate (``SafetyConfig.surprisal_gate``) refuses a query whose
highest mean surprisal over ``surprisal_window`` consecutive query tokens (``max_window_mean``)
is above the gate. The prefill computes it from its own hidden states
(``prefill.prefill_with_verdict(nats=...)``, ``slot_surprisal``), so the gate costs the LM-head
rows of the query tokens, not a second forward. ``generate.query_surprisal`` gives the same
numbers for a prompt; ``eval --suite adaptive --surprisal-gate`` attacks a gated model
(``eval/adaptive.py``) and ``examples/query_surprisal.py`` measures the feature on dev rows.
"""

from typing import Dict, Optional, Sequence

import mlx.core as mx
import numpy as np


def token_surprisal(logits: mx.array, targets: mx.array) -> mx.array:
    """-log softmax(``logits``)[..., target]: logits [..., V], targets [...] (same leading dims)."""
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return mx.logsumexp(logits, axis=-1) - picked


def slot_surprisal(model, h: mx.array, ids: Sequence[int], lo: int, slots: Sequence[int],
                   before: Optional[mx.array] = None) -> Dict[int, float]:
    """The surprisal of each of ``slots`` whose token is among ``ids`` (the tokens at slots
    ``lo ..``, whose final-norm hidden states are ``h`` [len(ids), D]): slot s is predicted by
    the hidden state of slot s - 1. ``before``: the hidden state [D] of slot ``lo - 1`` (the
    previous chunk's last), without which slot ``lo`` is left out. Returns {slot: nats}."""
    hi = lo + len(ids)
    want = [s for s in slots if lo < s < hi or (s == lo and before is not None and s > 0)]
    if not want:
        return {}
    rows = h if before is None else mx.concatenate([before[None], h])
    shift = 0 if before is None else 1
    idx = mx.array([s - lo - 1 + shift for s in want])
    targets = mx.array([ids[s - lo] for s in want])
    nats = token_surprisal(model.logits(rows[idx]), targets)
    return dict(zip(want, np.array(nats, dtype=np.float64).tolist()))


def query_peak(nats: Dict[int, float], slots: Sequence[int], w: int) -> float:
    """The gate's feature: ``max_window_mean`` of the known surprisal of ``slots``, in order."""
    return max_window_mean([nats[s] for s in slots if s in nats], w)


def max_window_mean(values, w: int) -> float:
    """The highest mean over ``w`` consecutive values (the mean of all when there are fewer;
    0 when there are none)."""
    values = np.asarray(values, dtype=np.float64)
    if not len(values):
        return 0.0
    if len(values) < w:
        return float(values.mean())
    return float(np.convolve(values, np.ones(w) / w, mode="valid").max())


def window_peaks(values: np.ndarray, w: int) -> np.ndarray:
    """``max_window_mean`` of each row of ``values`` [B, T]."""
    B, T = values.shape
    if T < w:
        return values.mean(axis=1)
    c = np.concatenate([np.zeros((B, 1)), np.cumsum(values, axis=1)], axis=1)
    return ((c[:, w:] - c[:, :-w]) / w).max(axis=1)
