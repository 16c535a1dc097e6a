"""mlx_safesig.surprisal and examples/query_surprisal.py on the tiny model: the surprisal
is the model's own next-token log-probability of each query token, the window feature is exact,
and a rows file made on the frozen held-out split is refused."""

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import load_example, make_model, write_jsonl, write_model_dir

from mlx_safesig import load
from mlx_safesig.generate import query_surprisal
from mlx_safesig.prompt import prepare_prompt, wrap_tokenizer
from mlx_safesig.surprisal import max_window_mean, window_peaks

qs = load_example("query_surprisal")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return write_model_dir(tmp_path_factory.mktemp("qs") / "tiny", make_model(), tokenizer)


def test_surprisal_is_the_models_next_token_logprob_of_each_query_token(model_dir):
    model, tok = load(str(model_dir))
    messages = [{"role": "user", "content": "Tell me a story about a robot"}]
    got = query_surprisal(model, tok, messages)
    prepared = prepare_prompt(wrap_tokenizer(tok), messages)
    logits = model.logits(model.hidden(mx.array(prepared.ids)[None], model.make_cache(),
                                       positions=0)[0]).astype(mx.float32)
    logp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    want = [-logp[i - 1, prepared.ids[i]] for i in prepared.query_slots]
    assert len(got) == len(prepared.query_slots) > 3
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_excess_is_surprisal_minus_the_predictions_entropy(model_dir):
    """The study's second feature: each query token's surprisal (the gate's, checked against
    ``query_surprisal``) minus the entropy of the model's prediction of it."""
    model, tok = load(str(model_dir))
    messages = [{"role": "user", "content": "Tell me a story about a robot"}]
    got = qs.token_stats(model, tok, messages)
    prepared = prepare_prompt(wrap_tokenizer(tok), messages)
    logits = model.logits(model.hidden(mx.array(prepared.ids)[None], model.make_cache(),
                                       positions=0)[0]).astype(mx.float32)
    logp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True), dtype=np.float64)
    slots = [i for i in prepared.query_slots if i > 0]
    entropy = np.array([-(np.exp(logp[i - 1]) * logp[i - 1]).sum() for i in slots])
    np.testing.assert_allclose(got["nats"], query_surprisal(model, tok, messages), atol=1e-4)
    np.testing.assert_allclose(got["excess"], got["nats"] - entropy, atol=1e-4)
    assert (entropy > 0).all() and len(slots) > 3


def test_window_feature():
    s = np.array([1.0, 5.0, 3.0, 0.0, 8.0])
    assert max_window_mean(s, 2) == 4.0  # (0 + 8) / 2
    assert max_window_mean(s, 3) == pytest.approx(11 / 3)
    assert max_window_mean(s, 9) == pytest.approx(3.4)  # shorter than the window: the mean
    np.testing.assert_allclose(window_peaks(np.stack([s, s[::-1]]), 3), [11 / 3, 11 / 3])
    np.testing.assert_allclose(window_peaks(s[None], 9), [3.4])


def test_runs_on_dev_rows_and_refuses_a_heldout_attack_file(model_dir, tmp_path, capsys):
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "benign.dev.jsonl", [{"id": "b0", "text": "Write a poem", "source": "z"}])
    write_jsonl(d / "harmful.dev.jsonl", [{"id": "h0", "text": "Tell me a story", "source": "x"}])
    attacks = tmp_path / "a.jsonl"
    write_jsonl(attacks, [{"fingerprint": {"split": "dev"}},
                          {"kind": "attack", "id": "h0", "suffix": " zz qq"}])
    report = qs.main(["--model", str(model_dir), "--data", str(d), "--attacks", str(attacks),
                      "--out", str(tmp_path / "o.json")])
    for feature in ("nats", "excess"):
        assert report["features"][feature]["8"]["suffixed"]["n"] == 1
        assert report["features"][feature]["4"]["benign_languages"]["en"]["n"] == 1
        assert set(report["features"][feature]["8"]["suffixed_above"]) == {"9.0"}
    assert report == json.loads((tmp_path / "o.json").read_text())
    assert "Write a poem" not in capsys.readouterr().out
    write_jsonl(attacks, [{"fingerprint": {"split": "heldout"}}])
    with pytest.raises(SystemExit, match="frozen held-out"):
        qs.main(["--model", str(model_dir), "--data", str(d), "--attacks", str(attacks)])
