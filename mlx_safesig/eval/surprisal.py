"""The language model's own surprisal of a query: a token-level anomaly signal (issue 26).

An optimised adversarial suffix is text no one writes: its tokens are improbable under the
model. ``query_surprisal`` gives the surprisal (nats, -log p of each token given every token before
it, template included) of a prompt's query-slot tokens; ``max_window_mean`` the highest mean over
``w`` consecutive ones, the feature a surprisal gate would compare with its threshold.
``eval --suite adaptive --surprisal-gate`` attacks under that constraint (``adaptive.py``), and
``examples/query_surprisal.py`` measures the feature on dev rows.
"""

from typing import Sequence

import mlx.core as mx
import numpy as np

from ..prompt import prepare_prompt, wrap_tokenizer


def token_surprisal(logits: mx.array, targets: mx.array) -> mx.array:
    """-log softmax(``logits``)[..., target]: logits [..., V], targets [...] (same leading dims)."""
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return mx.logsumexp(logits, axis=-1) - picked


def query_surprisal(model, tokenizer, messages: Sequence[dict]) -> np.ndarray:
    """Surprisal of each query-slot token of the prompt built from ``messages``, in slot order."""
    prepared = prepare_prompt(wrap_tokenizer(tokenizer), messages)
    ids = prepared.ids
    h = model.hidden(mx.array(ids)[None], model.make_cache(), positions=0)[0]
    s = np.array(token_surprisal(model.logits(h[:-1]), mx.array(ids[1:])))
    return s[[i - 1 for i in prepared.query_slots if i >= 1]]


def max_window_mean(values, w: int) -> float:
    """The highest mean over ``w`` consecutive values (the mean of all when there are fewer)."""
    values = np.asarray(values, dtype=np.float64)
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
