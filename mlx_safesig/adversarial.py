"""Embedding-space adversarial training of the query verdict (``train --adv-epsilon``; the issue
on white-box attacks, item 2: "whatever else you measure to help").

A white-box attacker moves the ``[CLS]`` verdict by choosing query tokens (GCG: a typed suffix).
Searching discrete tokens during training costs minutes per row (``align --harden-rounds``); a
continuous attack on the query's *embeddings* costs one extra forward and backward per step
(Xhonneux et al. 2024, "Efficient adversarial training in LLMs with continuous attacks"; the
random start and single step of Wong et al. 2020, "Fast is better than free").

Each training step, before the gradient of the joint loss:

1. ``delta`` [B, L, D] starts at a random point inside the ball: for every query token (the slots
   the query ``[CLS]`` reads, ``batch["query_tokens"]``), a random direction with an L2 norm up to
   ``radius`` = ``epsilon`` x the mean L2 norm of the model's token embeddings; zero elsewhere
   (the ``[CLS]`` row, the response, continuation and probes are never perturbed).
2. ``steps`` times: ``delta`` moves along the per-token unit gradient of the query BCE *against
   the row's own label* (a harmful query pushed towards benign, a benign one towards harmful),
   ``alpha`` = 1.25 x radius for one step, 2.5 x radius / steps for more, and is projected back
   onto the ball.
3. The joint loss is taken on the embeddings plus that ``delta`` (held constant): the model learns
   to keep each verdict within ``radius`` of every query token.

Validation, ``score()`` and generation never perturb.
"""

import mlx.core as mx

EMBED_CHUNK = 8192  # token rows embedded at a time when measuring their norms


def mean_embedding_norm(model) -> float:
    """Mean L2 norm of the model's token-embedding rows (the unit ``epsilon`` is measured in)."""
    embed = model.model.embed_tokens
    vocab = embed.weight.shape[0]
    total = 0.0
    for start in range(0, vocab, EMBED_CHUNK):
        rows = embed(mx.arange(start, min(start + EMBED_CHUNK, vocab))).astype(mx.float32)
        total += mx.linalg.norm(rows, axis=-1).sum().item()
    return total / vocab


def project(delta: mx.array, radius: float) -> mx.array:
    """Each token's perturbation [.., D] scaled back onto the L2 ball of ``radius``."""
    norm = mx.linalg.norm(delta, axis=-1, keepdims=True)
    return delta * mx.minimum(1.0, radius / mx.maximum(norm, 1e-12))


def _unit(x: mx.array) -> mx.array:
    return x / mx.maximum(mx.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def perturbation(model, batch: dict, radius: float, steps: int, query_loss) -> mx.array:
    """The adversarial ``delta`` [B, L, D] of steps 1-2 above (no gradient flows through it);
    ``query_loss(batch)``: the query BCE of a batch whose ``delta`` perturbs its query tokens."""
    B, L = batch["ids"].shape
    D = model.args.hidden_size
    mask = batch["query_tokens"][..., None]
    start = _unit(mx.random.normal((B, L, D))) * radius * mx.random.uniform(shape=(B, L, 1))
    delta = start * mask
    alpha = 1.25 * radius if steps == 1 else 2.5 * radius / steps
    grad = mx.grad(lambda d: query_loss(dict(batch, delta=d)))
    for _ in range(steps):
        delta = project(delta + alpha * _unit(grad(delta)), radius) * mask
    return mx.stop_gradient(delta)
