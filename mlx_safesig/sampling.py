"""Per-row samplers: a row of a batch draws from its own random key, so its tokens are those of
its single run whatever else is in the batch."""

from typing import Callable

import mlx.core as mx
from mlx_lm.sample_utils import greedy_sampler


def seeded_sampler(seed: int, temp: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                   min_p: float = 0.0) -> Callable:
    """mlx-lm's ``make_sampler`` filters (top-p, min-p, top-k, then temperature) drawing from its
    own random key instead of the global one: logprobs [1, V] -> token [1]. A row's draws then
    depend on its seed only, whatever else runs in the batch."""
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    if temp == 0:
        return greedy_sampler
    key = [mx.random.key(seed)]

    def sampler(logprobs: mx.array) -> mx.array:
        if 0 < top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        if min_p != 0.0:
            logprobs = apply_min_p(logprobs, min_p, 1)
        if top_k > 0:
            logprobs = apply_top_k(logprobs, top_k)
        key[0], sub = mx.random.split(key[0])
        return mx.random.categorical(logprobs * (1 / temp), key=sub)

    return sampler

