"""Randomized smoothing of the query verdict (issue 26; SmoothLLM, Robey et al. 2023, on tokens).

An optimised suffix moves the verdict with a few exact tokens; changed at random, they may lose
their effect while the request keeps its meaning. The smoothed verdict is the mean p(malicious)
of ``copies`` copies of the prompt in which each query-slot token is replaced, with probability
``rate``, by a token drawn uniformly from ``printable_tokens`` (the tokens an attacker's suffix
may use: printable ASCII, not special, not ``[CLS]``). The draw is seeded by the prompt's ids, so
one prompt always gets the same verdict (greedy generation stays reproducible) and an attacker
with the weights can compute it exactly. The cost is ``copies`` extra prefills of the prompt.

``examples/smoothing_study.py`` measures whether it is worth that on a model: the smoothed
verdict of requests, of the same requests with suffixes an attack found against the plain
verdict, and of benign rows.
"""

import hashlib
from typing import Sequence, Tuple

import mlx.core as mx
import numpy as np

from .decoding import SMOOTH_RATE  # noqa: F401  (re-exported: the default rate)
from .model import Model, SafesigError
from .prefill import PREFILL_STEP, prefill_batch_with_verdict, prefill_with_verdict
from .prompt import special_ids, wrap_tokenizer


def printable_tokens(model: Model, tokenizer) -> np.ndarray:
    """Ids that decode to printable ASCII, not whitespace only, not special, not ``[CLS]``."""
    tokenizer = wrap_tokenizer(tokenizer)
    raw = getattr(tokenizer, "_tokenizer", tokenizer)
    vocab = model.model.embed_tokens.weight.shape[0]
    texts = raw.batch_decode([[t] for t in range(vocab)], clean_up_tokenization_spaces=False)
    banned = special_ids(tokenizer) | {model.cls_token_id}
    ok = [t for t, s in enumerate(texts)
          if t not in banned and s.strip() and s.isascii() and s.isprintable()]
    if not ok:
        raise SafesigError("the tokenizer has no printable ASCII token.")
    return np.array(ok, dtype=np.int64)


def perturbed_copies(ids: Sequence[int], slots: Sequence[int], pool: np.ndarray, copies: int,
                     rate: float, seed: int = 0) -> np.ndarray:
    """[copies, len(ids)]: ``ids`` with each query slot replaced, with probability ``rate``, by a
    token of ``pool``; the draw is a function of ``seed`` and the ids alone."""
    ids = np.asarray(ids, dtype=np.int64)
    digest = hashlib.sha256(ids.tobytes()).digest()
    rng = np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])
    slots = np.asarray(slots, dtype=np.int64)
    hit = rng.random((copies, len(slots))) < rate
    drawn = pool[rng.integers(0, len(pool), size=(copies, len(slots)))]
    out = np.repeat(ids[None], copies, axis=0)
    out[:, slots] = np.where(hit, drawn, out[:, slots])
    return out


def noised_ids(ids: mx.array, query: mx.array, pool: mx.array, rate: float) -> mx.array:
    """Training's smoothing noise (``train --query-noise``): each query token of ``ids`` [B, L]
    (``query`` [B, L] 1 there) replaced, with probability ``rate``, by a random ``pool`` token, as
    ``perturbed_copies`` does at inference; drawn with ``mx.random`` (inside a compiled step)."""
    hit = (mx.random.uniform(shape=ids.shape) < rate) & (query > 0)
    drawn = pool[mx.random.randint(0, pool.shape[0], ids.shape)].astype(ids.dtype)
    return mx.where(hit, drawn, ids)


def smoothed_verdict(model: Model, ids: Sequence[int], slots: Sequence[int], pool: np.ndarray,
                     copies: int, rate: float, seed: int = 0) -> Tuple[float, np.ndarray]:
    """(the mean p(malicious) of the copies' query verdicts, each copy's p [copies]): the copies
    run as one batched prefill (one by one when the prompt is longer than a prefill chunk)."""
    if copies < 1:
        raise SafesigError(f"smoothing needs at least one copy, got {copies}.")
    rows = perturbed_copies(ids, slots, pool, copies, rate, seed).tolist()
    if len(ids) <= PREFILL_STEP:
        ps = [p for _, _, p in prefill_batch_with_verdict(model, rows, [slots] * copies)]
    else:
        ps = [prefill_with_verdict(model, r, model.make_cache(), slots)[1] for r in rows]
    ps = np.array(mx.stack(ps).astype(mx.float32), dtype=np.float64)
    return float(ps.mean()), ps


class Smoother:
    """A model's smoothed verdict with the token pool computed once (decoding the vocabulary):
    what the engine and the evaluation call with a config's ``smooth_copies`` and ``smooth_rate``."""

    def __init__(self, model: Model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self._pool = None

    @property
    def pool(self) -> np.ndarray:
        if self._pool is None:
            self._pool = printable_tokens(self.model, self.tokenizer)
        return self._pool

    def __call__(self, ids: Sequence[int], slots: Sequence[int], copies: int,
                 rate: float) -> float:
        return smoothed_verdict(self.model, ids, slots, self.pool, copies, rate)[0]
