"""The adaptive attacker against a smoothed query verdict (``SafetyConfig.smooth_copies``).

The smoothing's draw is a function of the prompt (``smoothing.perturbed_copies``), so an
attacker with the weights computes each candidate's smoothed verdict exactly: the copies of every
candidate suffixed prompt, one forward from the first query slot (the layout's ``cut``: copies
change query tokens before the suffix too). The loss is log of the mean p(malicious) of the
copies (held at ``log(floor)`` at least, as ``adaptive.head_loss`` does). GCG's gradient is that
loss's over the copies of the current suffix (expectation over the smoothing, as EOT attacks do),
taken where a copy kept the suffix token (a replaced token has no one-hot to follow).
"""

from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

from ..model import Model
from ..prefill import forward_on_prefix
from ..smoothing import perturbed_copies

ROWS_PER_FORWARD = 64  # copies of candidates per forward (bounds the activations)


def forward_after_cut(model: Model, lay, tokens: np.ndarray,
                      embeddings: Optional[mx.array] = None) -> mx.array:
    """Final-norm states [B, T - cut, D] of ``tokens`` [B, T] (rows of an ``adaptive.Layout``)
    from ``lay.cut`` on, after the layout's prefix keys and values (``prefix_state``)."""
    s = lay.cut
    return forward_on_prefix(model, lay.prefix, mx.array(tokens[:, s:]), lay.mask[s:],
                             lay.positions[s:], embeddings)


def _copies(lay, tokens: np.ndarray, slots: Sequence[int], pool: np.ndarray, copies: int,
            rate: float) -> np.ndarray:
    """[B * copies, T]: each row of ``tokens`` [B, T] with its prompt (slots 0 .. n_prompt - 1)
    replaced by the defence's copies, the copies of a row together."""
    n = lay.n_prompt
    out = np.repeat(tokens, copies, axis=0)
    out[:, :n] = np.concatenate([perturbed_copies(t[:n], slots, pool, copies, rate)
                                 for t in tokens])
    return out


def _loss(p: mx.array, floor: Optional[float]) -> mx.array:
    return mx.log(mx.maximum(p, floor or 1e-30))


def smoothed_losses(model: Model, lay, suffixes: np.ndarray, slots: Sequence[int],
                    pool: np.ndarray, copies: int, rate: float,
                    floor: Optional[float] = None) -> tuple:
    """Each suffix [B, L] put in ``lay``: (loss [B], the smoothed verdict [B], None), numpy."""
    B, L = suffixes.shape
    tokens = np.repeat(lay.tokens[None], B, axis=0)
    tokens[:, lay.start : lay.start + L] = suffixes
    rows = _copies(lay, tokens, slots, pool, copies, rate)
    head = lay.heads[0] - lay.cut
    ps = []
    for i in range(0, len(rows), ROWS_PER_FORWARD):
        h = forward_after_cut(model, lay, rows[i : i + ROWS_PER_FORWARD])
        ps.append(model.safety_prob(h[:, head]).astype(mx.float32))
        mx.eval(ps[-1])
    p = mx.concatenate(ps).reshape(B, copies).mean(axis=1)
    loss = _loss(p, floor)
    mx.eval(loss, p)
    return np.array(loss, dtype=np.float64), np.array(p, dtype=np.float64), None


def smoothed_gradient(model: Model, lay, length: int, slots: Sequence[int],
                      pool: np.ndarray, copies: int, rate: float,
                      floor: Optional[float] = None) -> mx.array:
    """d loss / d one-hot suffix [L, V] of the current suffix's smoothed verdict."""
    rows = _copies(lay, lay.tokens[None], slots, pool, copies, rate)
    s, off = lay.start, lay.start - lay.cut
    kept = mx.array(rows[:, s : s + length] == lay.tokens[None, s : s + length])[..., None]
    base = model.embed(mx.array(rows[:, lay.cut :]))
    head = lay.heads[0] - lay.cut

    def loss_fn(e):
        suffix = mx.where(kept, e[None], base[:, off : off + length])
        h = mx.concatenate([base[:, :off], suffix, base[:, off + length :]], axis=1)
        h = forward_after_cut(model, lay, rows, embeddings=h)
        return _loss(model.safety_prob(h[:, head]).mean(), floor)

    g = mx.grad(loss_fn)(model.embed(mx.array(lay.tokens[s : s + length])))
    return model.model.embed_tokens.as_linear(g.astype(base.dtype))

