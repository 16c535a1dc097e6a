"""Embedding-space adversarial training (``train --adv-epsilon``): the perturbation touches only the
query tokens, stays inside its ball and raises the query loss; a model trained against it holds
its verdicts under that attack better than the same training without it."""

from functools import partial

import mlx.core as mx
import numpy as np
from conftest import make_model
from test_train import QUICK, f1, synthetic

from mlx_safesig.adversarial import mean_embedding_norm, perturbation
from mlx_safesig.data import tokenize_example
from mlx_safesig.train import Batcher, TrainConfig, joint_loss, query_loss, train


def batch_of(model, tokenizer, records, config=None):
    config = config or TrainConfig(num_layers=-1)
    examples = [tokenize_example(tokenizer, r) for r in records]
    batch, _ = Batcher(model, tokenizer, config, mx.distributed.init())(examples, range(len(examples)))
    return batch


def test_perturbation_stays_on_the_query_tokens_inside_the_ball_and_raises_the_query_loss(tokenizer):
    model = make_model()
    batch = batch_of(model, tokenizer, synthetic(6, seed=3))
    radius = 0.5 * mean_embedding_norm(model)
    clean = query_loss(model, batch).item()
    mx.random.seed(1)
    delta = perturbation(model, batch, radius, 3, partial(query_loss, model))
    norms = np.linalg.norm(np.array(delta), axis=-1)
    query = np.array(batch["query_tokens"]) > 0
    assert query.sum(axis=1).min() > 0
    assert (norms[~query] == 0).all()  # the [CLS], response, continuation, probes and padding
    assert norms[query].max() <= radius * (1 + 1e-5)
    assert norms[query].min() > 0.5 * radius  # three steps of 2.5/3 radius reach the sphere
    attacked = query_loss(model, dict(batch, delta=delta)).item()
    mx.random.seed(1)
    noise = mx.random.normal(delta.shape) * batch["query_tokens"][..., None]
    noise = noise * radius / mx.maximum(mx.linalg.norm(noise, axis=-1, keepdims=True), 1e-12)
    random_loss = query_loss(model, dict(batch, delta=noise)).item()
    assert attacked > random_loss and attacked > clean


def test_a_zero_perturbation_gives_the_clean_loss(tokenizer):
    model = make_model()
    batch = batch_of(model, tokenizer, synthetic(4, seed=4))
    zero = mx.zeros((*batch["ids"].shape, model.args.hidden_size))
    clean, _ = joint_loss(model, batch, lam=0.1)
    perturbed, _ = joint_loss(model, dict(batch, delta=zero), lam=0.1)
    assert perturbed.item() == clean.item()


def attacked_loss(model, batch, radius, seed=7):
    mx.random.seed(seed)
    delta = perturbation(model, batch, radius, 5, partial(query_loss, model))
    return query_loss(model, dict(batch, delta=delta)).item()


def test_adversarial_training_holds_verdicts_under_the_attack_better(tokenizer, tmp_path):
    examples = [tokenize_example(tokenizer, r) for r in synthetic(64, seed=0)]
    test = synthetic(16, seed=9)
    clean, attacked, logs = {}, {}, []
    for eps in (0.0, 0.02):  # the tiny model learns the task at 0.02 (at 0.05 it did not)
        model = make_model()
        config = TrainConfig(iters=150, adv_epsilon=eps, **QUICK)
        train(model, tokenizer, examples, None, config, tmp_path / str(eps), log=logs.append)
        model.eval()
        batch = batch_of(model, tokenizer, test)
        radius = 0.05 * mean_embedding_norm(model)  # an attack larger than the training's
        clean[eps] = query_loss(model, batch).item()
        attacked[eps] = attacked_loss(model, batch, radius)
        assert f1(model, tokenizer, test) >= 0.9
    started = [x for x in logs if x.startswith("training ")]
    assert "attacked" not in started[0]
    assert started[1].endswith(", query embeddings attacked within 0.02 x their mean norm (1 step(s))")
    assert attacked[0.02] < 0.5 * attacked[0.0], (clean, attacked)  # measured: 0.26 vs 1.44
