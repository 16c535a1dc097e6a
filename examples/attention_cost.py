"""Why a chat's turn 10 starts later than its turn 1 on a CPU, with plain mlx-lm only.

Prints, in one run: the time of a forward of N new tokens after an empty cache and after a cache of
C tokens (mlx-lm's own model and cache, the embedded default base model), and the time of one
layer's attention for those shapes through mx.fast.scaled_dot_product_attention and through a
hand-written grouped-query matmul attention (same output to 1e-5), so one can see whether another
attention path would help. Medians of repeated runs; pause other work first (2-core machines).

    python examples/attention_cost.py [--new 60] [--context 950] [--repeats 9]
"""

# ruff: noqa: I001  (import order: mlx_safesig before mlx)
import argparse
import time

import mlx_safesig  # noqa: F401, I001  (OpenBLAS before mlx on Linux)
import mlx.core as mx
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache

from mlx_safesig.default_model import default_base_model


def median_ms(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def grouped_attention(q, k, v, mask, scale):
    """Attention of H query heads over Hk key/value heads as two batched matmuls per group."""
    B, H, L, D = q.shape
    Hk, K = k.shape[1], k.shape[2]
    r = H // Hk
    s = ((q * scale).reshape(B, Hk, r * L, D) @ k.swapaxes(-1, -2)).reshape(B, Hk, r, L, K)
    s = mx.where(mask, s, mx.finfo(s.dtype).min)
    p = mx.softmax(s, axis=-1, precise=True).reshape(B, Hk, r * L, K)
    return (p @ v).reshape(B, H, L, D)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new", type=int, default=60, help="new tokens of the turn (default 60)")
    ap.add_argument("--context", type=int, default=950, help="cached tokens before them (default 950)")
    ap.add_argument("--repeats", type=int, default=9, help="timed runs per number (default 9)")
    a = ap.parse_args()
    model, _ = load(str(default_base_model()))
    args = model.args

    def after(context: int) -> float:
        """Median ms of a forward of ``a.new`` tokens after ``context`` cached ones (trimmed back
        after each run, so the context is prefilled once)."""
        cache = make_prompt_cache(model)
        if context:
            model(mx.array([[5] * context]), cache=cache)
            mx.eval([c.state for c in cache])

        def step():
            mx.eval(model(mx.array([[7] * a.new]), cache=cache)[:, -1])
            for c in cache:
                c.trim(a.new)
        return median_ms(step, a.repeats)

    empty, full = after(0), after(a.context)
    print(f"mlx-lm forward of {a.new} new tokens: after 0 cached {empty:.0f} ms, after "
          f"{a.context} cached {full:.0f} ms ({full / empty:.2f}x)")
    H, Hk = args.num_attention_heads, args.num_key_value_heads
    D = args.hidden_size // H
    K = a.context + a.new
    q = mx.random.normal((1, H, a.new, D))
    k, v = mx.random.normal((1, Hk, K, D)), mx.random.normal((1, Hk, K, D))
    mask = mx.arange(a.context, K)[:, None] >= mx.arange(K)[None]
    fast = lambda: mx.eval(mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5, mask=mask))  # noqa: E731
    mine = lambda: mx.eval(grouped_attention(q, k, v, mask, D**-0.5))  # noqa: E731
    diff = mx.abs(mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5, mask=mask)
                  - grouped_attention(q, k, v, mask, D**-0.5)).max().item()
    t_fast, t_mine = median_ms(fast, a.repeats), median_ms(mine, a.repeats)
    layers = args.num_hidden_layers
    print(f"one layer's attention, {a.new} queries x {K} keys: mx.fast.sdpa {t_fast:.2f} ms, grouped "
          f"matmul {t_mine:.2f} ms (max |diff| {diff:.1e}); x {layers} layers = "
          f"{t_fast * layers:.0f} ms of the {full:.0f} ms")


if __name__ == "__main__":
    main()
