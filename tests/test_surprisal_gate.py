"""The surprisal gate in decoding (``SafetyConfig.surprisal_gate``): the prefill's own surprisal
of the query equals a plain forward's (one chunk or several, one prompt or a batch, a fresh cache
or a conversation's), a gate that does not trip changes nothing, one that trips inserts the
refusal with a ``surprisal-gate`` event, and the CLI and the server carry it."""

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_model, write_model_dir

from mlx_safesig import SafeBatchGenerator, SafetyConfig, make_prompt_cache, stream_generate
from mlx_safesig import prefill as prefill_module
from mlx_safesig.cli import main
from mlx_safesig.decoding import SafetyMonitor
from mlx_safesig.generate import query_surprisal
from mlx_safesig.prefill import prefill_batch_with_verdict, prefill_with_verdict
from mlx_safesig.prompt import prepare_prompt, wrap_tokenizer
from mlx_safesig.server.api import event_dict
from mlx_safesig.surprisal import max_window_mean

NEVER = dict(threshold=0.999999)  # the random head never reaches it
CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Tell me a story about a robot"}]


def reference(model, tokenizer, messages):
    """Each query slot's surprisal from one plain causal forward (no [CLS], no chunks)."""
    prepared = prepare_prompt(wrap_tokenizer(tokenizer), messages)
    h = model.hidden(mx.array(prepared.ids)[None], model.make_cache(), positions=0)[0]
    logits = model.logits(h).astype(mx.float32)
    logp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    return prepared, {s: -logp[s - 1, prepared.ids[s]] for s in prepared.query_slots}


@pytest.mark.parametrize("step", [2048, 7, 5])
def test_the_prefill_surprisal_is_a_plain_forwards_in_one_chunk_or_many(tokenizer, monkeypatch,
                                                                      step):
    model = make_model()
    prepared, want = reference(model, tokenizer, CHAT)
    monkeypatch.setattr(prefill_module, "PREFILL_STEP", step)
    nats = {}
    _, p = prefill_with_verdict(model, prepared.ids, model.make_cache(), prepared.query_slots,
                                nats=nats)
    assert sorted(nats) == sorted(want) and len(want) > 8
    np.testing.assert_allclose([nats[s] for s in want], list(want.values()), atol=1e-4)
    _, p_plain = prefill_with_verdict(model, prepared.ids, model.make_cache(), prepared.query_slots)
    assert p.item() == pytest.approx(p_plain.item(), abs=1e-6)  # the verdict is untouched


def test_the_batched_prefill_surprisal_is_each_prompts_own(tokenizer):
    model = make_model()
    chats = [CHAT, [{"role": "user", "content": "Write a poem"}]]
    prepared = [reference(model, tokenizer, c) for c in chats]
    nats = [{}, {}]
    prefill_batch_with_verdict(model, [p.ids for p, _ in prepared],
                               [p.query_slots for p, _ in prepared], nats)
    for got, (_, want) in zip(nats, prepared):
        assert sorted(got) == sorted(want)
        np.testing.assert_allclose([got[s] for s in want], list(want.values()), atol=1e-4)


def run(model, tokenizer, messages, n=12, prompt_cache=None, **safety):
    results = list(stream_generate(model, tokenizer, messages, n, prompt_cache=prompt_cache,
                                   safety=SafetyConfig(schedule="each", **NEVER, **safety)))
    return [r.token for r in results], [e for r in results for e in r.safety.events]


def test_a_gate_that_does_not_trip_changes_nothing(tokenizer):
    model = make_model()
    assert run(model, tokenizer, CHAT) == run(model, tokenizer, CHAT, surprisal_gate=1e9)


def test_a_tripped_gate_inserts_the_refusal_whatever_the_verdict(tokenizer):
    model = make_model()
    peak = max_window_mean(query_surprisal(model, tokenizer, CHAT), 4)
    tokens, events = run(model, tokenizer, CHAT, 40, surprisal_gate=peak - 0.01,
                         surprisal_window=4)
    kinds = [e.kind for e in events]
    assert kinds[:3] == ["probe", "surprisal-gate", "refusal-inserted"]
    assert events[0].p < 0.5 and events[1].nats == pytest.approx(peak, abs=1e-4)
    refusal = tokenizer.encode("\nSorry, I can't fulfill your request because",
                               add_special_tokens=False)
    assert tokens[: len(refusal)] == refusal
    assert "probe" not in kinds[3:]  # no check after the insertion
    assert run(model, tokenizer, CHAT, surprisal_gate=peak + 0.01,
               surprisal_window=4) == run(model, tokenizer, CHAT)


def test_the_gate_in_a_batch_gives_each_row_its_single_run(tokenizer):
    model = make_model()
    chats = [CHAT, [{"role": "user", "content": "Write a poem about the sea"}],
             [{"role": "user", "content": "What is the capital of France"}]]
    peaks = [max_window_mean(query_surprisal(model, tokenizer, c), 8) for c in chats]
    gate = sorted(peaks)[1] - 1e-3  # some rows trip, some do not
    safety = SafetyConfig(schedule="each", surprisal_gate=gate, **NEVER)
    engine = SafeBatchGenerator(model, tokenizer, safety)
    uids = engine.insert(chats, 10)
    got = {u: [] for u in uids}
    while engine.rows or engine.joining:
        for s in engine.next():
            got[s.uid].append(s.token)
    for chat, uid, peak in zip(chats, uids, peaks):
        tokens, events = run(model, tokenizer, chat, 10, surprisal_gate=gate)
        assert got[uid] == tokens
        assert ("surprisal-gate" in [e.kind for e in events]) == (peak > gate)
    assert any(p > gate for p in peaks) and any(p <= gate for p in peaks)


def test_a_conversation_cache_gates_the_whole_conversation_as_a_fresh_prefill_does(tokenizer):
    model = make_model()
    cache = make_prompt_cache(model)
    reuse, reused = cache.reuse, []
    cache.reuse = lambda ids, safety, **kw: reused.append(reuse(ids, safety, **kw)) or reused[-1]
    history = [dict(m) for m in CHAT]
    for question in ["Write a poem about the sea", "What is the capital", "Tell me more"]:
        peak = max_window_mean(query_surprisal(model, tokenizer, history), 8)
        got = run(model, tokenizer, history, prompt_cache=cache, keep_verdict="flagged",
                  surprisal_gate=peak - 1e-3)
        fresh = run(model, tokenizer, history, keep_verdict="flagged", surprisal_gate=peak - 1e-3)
        assert got[0] == fresh[0]
        assert [e.nats for e in got[1] if e.kind == "surprisal-gate"] == [
            pytest.approx(peak, abs=1e-4)]
        history += [{"role": "assistant", "content": "Once upon a time there was a robot"},
                    {"role": "user", "content": question}]
    assert reused[0] == 0 and all(n > 30 for n in reused[1:])  # earlier turns came from the cache


def test_a_cache_reuses_only_what_it_knows_the_surprisal_of():
    cache = prefill_module.PromptCache(make_model())
    cache.layers = make_model().make_cache()
    ids = list(range(1, 21))
    cache.ids, cache.safety, cache.nats = ids[:12], True, {s: 1.0 for s in range(3, 8)}
    cache.layers[0].offset = 12  # as if the 12 tokens were in (trim only reads the offset)
    for c in cache.layers:
        c.offset = 12
    n = cache.reuse(ids, True, need=list(range(3, 15)))
    assert n == 7  # slot 8 is unknown: its predictor, slot 7, must run again
    assert cache.nats == {s: 1.0 for s in range(3, 8)}


def test_model_defaults_and_validation():
    model = make_model()
    model.args.safesig["surprisal_gate"] = 9.0
    resolved = SafetyConfig().resolved(model.args.safesig)
    assert (resolved.surprisal_gate, resolved.surprisal_window) == (9.0, 8)
    assert SafetyConfig().resolved({}).surprisal_gate is None
    with pytest.raises(ValueError, match="surprisal_gate must be above 0"):
        SafetyConfig(surprisal_gate=0)
    with pytest.raises(ValueError, match="surprisal_window must be a positive integer"):
        SafetyConfig(surprisal_window=0)
    monitor = SafetyMonitor(SafetyConfig(surprisal_gate=9.0).resolved({"threshold": 0.5}))
    assert not monitor.start(0.1, peak=9.0).insert  # at the gate passes
    assert SafetyMonitor(monitor.config).start(0.1, peak=None).insert is False  # not computed


def test_the_server_and_the_cli_carry_the_gate(tokenizer, tmp_path):
    from mlx_safesig.decoding import SafetyEvent

    assert event_dict(SafetyEvent("surprisal-gate", -1, nats=10.123456)) == {
        "kind": "surprisal-gate", "step": -1, "p": None, "nats": 10.1235}
    assert "nats" not in event_dict(SafetyEvent("probe", -1, 0.2))
    path = write_model_dir(tmp_path / "m", make_model(), tokenizer)
    r = CliRunner().invoke(main, ["generate", "--model", str(path), "-p", "Tell me a story",
                                  "-m", "4", "--threshold", "0.999", "--surprisal-gate", "0.01",
                                  "--json"])
    assert r.exit_code == 0, r.output
    trace = json.loads(r.stdout)["events"]
    assert [t["kind"] for t in trace][:3] == ["probe", "surprisal-gate", "refusal-inserted"]
    r = CliRunner().invoke(main, ["generate", "--model", str(path), "-p", "x",
                                  "--surprisal-gate", "0"])
    assert r.exit_code == 1 and "--surprisal-gate" in r.output and "Traceback" not in r.output
