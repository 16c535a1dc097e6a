"""Training under smoothing noise (``train --query-noise``): only query tokens are replaced, at
about the rate, by printable tokens; a model trained with it keeps its verdicts on noised
queries better than the same training without it; the option is one clean error when bad."""

import mlx.core as mx
import numpy as np
from click.testing import CliRunner
from conftest import make_model
from test_adversarial import batch_of
from test_train import QUICK, f1, synthetic

from mlx_safesig.cli import main
from mlx_safesig.data import tokenize_example
from mlx_safesig.smoothing import noised_ids, printable_tokens
from mlx_safesig.train import TrainConfig, query_loss, train


def test_only_query_tokens_are_replaced_at_about_the_rate(tokenizer):
    model = make_model()
    batch = batch_of(model, tokenizer, synthetic(16, seed=1))
    pool = printable_tokens(model, tokenizer)
    ids, query = np.array(batch["ids"]), np.array(batch["query_tokens"]) > 0
    mx.random.seed(3)
    got = np.array(noised_ids(batch["ids"], batch["query_tokens"], mx.array(pool), 0.4))
    changed = got != ids
    assert not changed[~query].any()
    assert 0.25 < changed[query].mean() < 0.45  # a drawn token may equal the old one
    assert set(got[changed].tolist()) <= set(pool.tolist())
    same = np.array(noised_ids(batch["ids"], batch["query_tokens"], mx.array(pool), 0.0))
    assert (same == ids).all()


def noised_loss(model, batch, pool, rate, draws=6):
    out = []
    for seed in range(draws):
        mx.random.seed(100 + seed)
        noisy = dict(batch, ids=noised_ids(batch["ids"], batch["query_tokens"], pool, rate))
        out.append(query_loss(model, noisy).item())
    return float(np.mean(out))


def test_noise_training_keeps_verdicts_on_noised_queries_better(tokenizer, tmp_path):
    examples = [tokenize_example(tokenizer, r) for r in synthetic(64, seed=0)]
    test = synthetic(16, seed=9)
    noisy, logs = {}, []
    for rate in (0.0, 0.3):
        model = make_model()
        config = TrainConfig(iters=150, query_noise=rate, **QUICK)
        train(model, tokenizer, examples, None, config, tmp_path / str(rate), log=logs.append)
        model.eval()
        pool = mx.array(printable_tokens(model, tokenizer))
        noisy[rate] = noised_loss(model, batch_of(model, tokenizer, test), pool, 0.3)
        assert f1(model, tokenizer, test) >= 0.9  # clean text is still judged
    started = [x for x in logs if x.startswith("training ")]
    assert "replaced" not in started[0]
    assert started[1].endswith(", query tokens replaced at rate 0.3")
    assert noisy[0.3] < noisy[0.0], noisy


def test_a_bad_rate_is_one_line(tmp_path):
    r = CliRunner().invoke(main, ["train", "--model", "x", "--data", str(tmp_path),
                                  "--query-noise", "1"])
    assert r.exit_code == 1 and "--query-noise" in r.output and "Traceback" not in r.output
