"""Safety-aware generation: equivalences on tiny random models, and the decoding rules end to end
with a scripted head."""

import sys

import mlx.core as mx
import mlx_lm
import pytest
from conftest import TINY, make_model
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_safesig import SafesigError, SafetyConfig, generate, prepare_prompt, score, stream_generate
from mlx_safesig.decoding import REFUSAL_PREFIX
from mlx_safesig.generate import score_many

MSGS = [{"role": "user", "content": "How do I bake bread at home?"}]
NEVER = dict(threshold=0.999999)  # the random head never reaches it: probes run, nothing is inserted


def tokens(model, tokenizer, prompt=MSGS, n=32, **kwargs):
    out = []
    for r in stream_generate(model, tokenizer, prompt, max_tokens=n, **kwargs):
        if r.token is not None:
            out.append((r.token, r.logprobs, r.safety))
    return out


def test_probe_then_drop_is_bit_identical_to_no_probe(tokenizer):
    model = make_model()
    probed = tokens(model, tokenizer, safety=SafetyConfig(schedule="each", **NEVER),
                    fused_probe=False)
    unprobed = tokens(model, tokenizer, safety=SafetyConfig(schedule="first", **NEVER))
    assert len(probed) == len(unprobed) == 32
    assert [t for t, _, _ in probed] == [t for t, _, _ in unprobed]
    assert all(mx.array_equal(a, b) for (_, a, _), (_, b, _) in zip(probed, unprobed))
    assert sum(len(s.events) for _, _, s in probed) > 30  # the probes did run


def test_fused_probe_equals_separate_probe(tokenizer):
    model = make_model()
    config = SafetyConfig(schedule="each", **NEVER)
    fused = tokens(model, tokenizer, safety=config, fused_probe=True)
    separate = tokens(model, tokenizer, safety=config, fused_probe=False)
    assert [t for t, _, _ in fused] == [t for t, _, _ in separate]
    p_fused = [e.p for _, _, s in fused for e in s.events]
    p_separate = [e.p for _, _, s in separate for e in s.events]
    assert len(p_fused) == len(p_separate) > 30
    assert max(abs(a - b) for a, b in zip(p_fused, p_separate)) < 1e-5


@pytest.mark.parametrize("temp", [0.0, 0.8])
def test_safety_disabled_is_mlx_lm_generate(tokenizer, temp):
    model = make_model()
    ref = llama.Model(llama.ModelArgs.from_dict({**TINY, "vocab_size": 320}))
    ref.load_weights([(k, v) for k, v in tree_flatten(model.parameters())
                      if not k.startswith("cls_")])
    ids = prepare_prompt(tokenizer, MSGS).ids
    mx.random.seed(7)
    expected = [r.token for r in mlx_lm.stream_generate(
        ref, tokenizer, mx.array(ids), max_tokens=24, sampler=make_sampler(temp=temp))]
    mx.random.seed(7)
    ours = [r.token for r in stream_generate(
        model, tokenizer, MSGS, max_tokens=24, temp=temp, safety=SafetyConfig(enabled=False))]
    assert ours == expected


def test_mlx_lm_batch_generate_runs_our_model_like_mlx_lms(tokenizer):
    """mlx-lm's batch caches give one offset per row (left padding): our layers turn them into
    per-token positions, so batched greedy generation equals the same mlx-lm model's."""
    model = make_model()
    ref = llama.Model(llama.ModelArgs.from_dict({**TINY, "vocab_size": 320}))
    ref.load_weights([(k, v) for k, v in tree_flatten(model.parameters())
                      if not k.startswith("cls_")])
    prompts = [prepare_prompt(tokenizer, [{"role": "user", "content": c}]).ids
               for c in ("hi", "a much longer question about the sea and the sky")]
    wrapped = TokenizerWrapper(tokenizer)
    ours = mlx_lm.batch_generate(model, wrapped, prompts, max_tokens=12, return_token_ids=True)
    theirs = mlx_lm.batch_generate(ref, wrapped, prompts, max_tokens=12, return_token_ids=True)
    assert [list(t) for t in ours.token_ids] == [list(t) for t in theirs.token_ids]
    assert all(len(t) > 0 for t in ours.token_ids)


def test_score_of_messages_is_the_query_verdict_generation_starts_from(tokenizer):
    model = make_model()
    first = next(iter(stream_generate(model, tokenizer, MSGS, max_tokens=2,
                                      safety=SafetyConfig(**NEVER))))
    assert first.safety.query_p == pytest.approx(score(model, tokenizer, MSGS), abs=1e-6)



@pytest.mark.parametrize("safesig", [{}, {"probe_position": "current"}])
def test_score_of_messages_with_probe_position_current_is_generations_verdict(tokenizer, safesig):
    model = make_model(safesig=safesig)
    msgs = [{"role": "user", "content": "a much longer question about the sea and the sky"}]
    first = next(iter(stream_generate(model, tokenizer, msgs, max_tokens=2,
                                      safety=SafetyConfig(**NEVER))))
    assert first.safety.query_p == pytest.approx(score(model, tokenizer, msgs), abs=1e-6)


@pytest.mark.parametrize("safesig", [{}, {"probe_position": "current"}])
def test_score_many_equals_score_of_each_item_in_any_batch_shape(tokenizer, monkeypatch, safesig):
    """Batched verdicts (left-padded, sorted by length, token-capped groups) == one by one."""
    gen = sys.modules["mlx_safesig.generate"]  # the package exports a function of that name
    model = make_model(safesig=safesig)
    items = ["hi", "a much longer question about the sea and the sky " * 3, MSGS,
             [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why?"},
              {"role": "assistant", "content": "because"}, {"role": "user", "content": "ok " * 9}],
             "the sea", MSGS]
    want = [score(model, tokenizer, item) for item in items]
    monkeypatch.setattr(gen, "SCORE_BATCH_TOKENS", 120)  # forces groups of different sizes
    seen = []
    got = score_many(model, tokenizer, items, batch_size=3, progress=seen.append)
    assert got == pytest.approx(want, abs=1e-5)
    assert sum(seen) == len(items) and len(seen) >= 2 and max(seen) <= 3
    monkeypatch.setattr(gen, "PREFILL_STEP", 16)  # longer prompts run alone, chunked
    assert score_many(model, tokenizer, items) == pytest.approx(want, abs=1e-5)
    with pytest.raises(SafesigError, match="empty"):
        score_many(model, tokenizer, ["ok", ""])

def test_score_many_keeps_each_p_in_its_cache_and_reuses_it(tokenizer):
    """A cache holds p by verdict input (token ids + query slots): held items are not run (their
    kept p is returned as is), new ones are stored as their forward finishes, and the same text
    as a string or in messages are different inputs."""
    from mlx_safesig.generate import _verdict_input, verdict_key
    from mlx_safesig.prompt import wrap_tokenizer

    model = make_model()
    items = ["the sea", MSGS, "hi"]
    want = score_many(model, tokenizer, items)
    cache = {}
    assert score_many(model, tokenizer, items, cache=cache) == pytest.approx(want, abs=1e-6)
    keys = [verdict_key(*_verdict_input(model, wrap_tokenizer(tokenizer), x)) for x in items]
    assert sorted(cache) == sorted(keys) and [cache[k] for k in keys] == pytest.approx(want)
    cache[keys[1]] = 0.123  # a kept p is trusted, not recomputed
    seen = []
    got = score_many(model, tokenizer, items + ["new text"], cache=cache, progress=seen.append)
    assert got[:3] == [cache[keys[0]], 0.123, cache[keys[2]]] and len(cache) == 4
    assert seen == [3, 1]  # the kept ones at once, then the one forward
    assert verdict_key([1, 2], [0, 1]) != verdict_key([1, 2], [1])


# -- the decoding rules end to end, with a scripted head ---------------------------------------

class ScriptedHead:
    """Replaces ``model.safety_prob``: returns the scripted probabilities in call order (the
    first call is the query verdict), then the last value forever."""

    def __init__(self, model, script):
        self.script, self.calls = list(script), 0
        model.safety_prob = self

    def __call__(self, h):
        p = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        return mx.array(p)


def run(tokenizer, script, n=80, prefill=None, **cfg):
    model = make_model()
    ScriptedHead(model, script)
    results = list(stream_generate(
        model, tokenizer, MSGS, max_tokens=n, prefill_response=prefill,
        safety=SafetyConfig(schedule="each", tau=3, **cfg)))
    return model, results


def refusal_tokens(tokenizer):
    return tokenizer.encode(REFUSAL_PREFIX, add_special_tokens=False)


def test_malicious_query_verdict_inserts_the_refusal_first(tokenizer):
    _, results = run(tokenizer, [0.9, 0.1])
    refusal = refusal_tokens(tokenizer)
    assert [r.token for r in results[: len(refusal)]] == refusal
    assert all(r.refusal for r in results[: len(refusal)])
    assert not results[len(refusal)].refusal  # then the model continues on its own
    assert results[0].safety.flagged
    assert "refusal-inserted" in [e.kind for e in results[0].safety.events]


def test_refusal_is_inserted_after_the_prefilled_text(tokenizer):
    model, results = run(tokenizer, [0.9], prefill="Sure, here is")
    refusal = refusal_tokens(tokenizer)
    assert [r.token for r in results[: len(refusal)]] == refusal
    text = "".join(r.text for r in results)
    assert text.startswith(REFUSAL_PREFIX)


def test_tau_malicious_probes_insert_once(tokenizer):
    # query benign; probes after tokens 0..4 say 0.1, 0.1, 0.9, 0.9, 0.9 -> insert after token 4
    _, results = run(tokenizer, [0.1, 0.1, 0.1, 0.9, 0.9, 0.9, 0.9])
    flags = [r.refusal for r in results]
    first = flags.index(True)
    assert first == 5
    refusal = refusal_tokens(tokenizer)
    assert [r.token for r in results[first : first + len(refusal)]] == refusal
    assert sum(flags) == len(refusal)  # at most one insertion, although p stays high


def test_min_window_delays_the_first_check_of_the_generated_text(tokenizer):
    # the same script as above, but no check before 4 response tokens: the probes after tokens
    # 3, 4 say 0.1, those after 5, 6, 7 say 0.9 -> insert after token 7
    model, results = run(tokenizer, [0.1, 0.1, 0.1, 0.9, 0.9, 0.9, 0.9], min_window=4)
    steps = [e.step for r in results for e in r.safety.events if e.kind == "probe"]
    assert steps[:3] == [-1, 3, 4]
    assert [r.refusal for r in results].index(True) == 8
    # a prefill counts: with n prefilled tokens the prefill is judged before the first
    # generated token, and the first generated token is checked at once
    prefill = "Sure, here is"
    n = len(tokenizer.encode(prefill, add_special_tokens=False))
    _, results = run(tokenizer, [0.1], n=3, prefill=prefill, min_window=n)
    steps = [e.step for r in results for e in r.safety.events if e.kind == "probe"]
    assert steps[:3] == [-1, n - 1, n]
    _, results = run(tokenizer, [0.1], n=3, prefill=prefill, min_window=n + 1)
    steps = [e.step for r in results for e in r.safety.events if e.kind == "probe"]
    assert steps[:2] == [-1, n]  # too short to judge on its own


def test_rollback_retracts_tokens_from_the_flip_step(tokenizer):
    _, results = run(tokenizer, [0.1, 0.1, 0.1, 0.9, 0.9, 0.9], rollback=True)
    retracts = [e for r in results for e in r.safety.events if e.kind == "retracted"]
    assert len(retracts) == 1
    retract_at = next(i for i, r in enumerate(results) if r.token is None)
    assert retract_at == 5  # tokens 0..4 shown, then tokens 2..4 withdrawn (flip at 2)
    kept = "".join(r.text for r in results[:2])
    shown = "".join(r.text for r in results[:5])
    assert retracts[0].text == shown[len(kept):]
    assert results[retract_at + 1].refusal


def test_generate_drops_retracted_text(tokenizer):
    model = make_model()
    ScriptedHead(model, [0.1, 0.1, 0.1, 0.9, 0.9, 0.9])
    text = generate(model, tokenizer, MSGS, max_tokens=80,
                    safety=SafetyConfig(schedule="each", rollback=True))
    model2 = make_model()
    ScriptedHead(model2, [0.1])
    plain = generate(model2, tokenizer, MSGS, max_tokens=2, safety=SafetyConfig(schedule="each"))
    assert text.startswith(plain + REFUSAL_PREFIX)


def test_first_schedule_never_probes_after_the_query(tokenizer):
    model = make_model()
    head = ScriptedHead(model, [0.1])
    list(stream_generate(model, tokenizer, MSGS, max_tokens=20,
                         safety=SafetyConfig(schedule="first")))
    assert head.calls == 1


def test_cls_token_is_never_sampled(tokenizer):
    # a padded vocab where the [CLS] id falls inside the LM head's range, with a huge logit
    model = make_model(vocab_size=330, safesig={"cls_token_id": 325})
    model.model.embed_tokens.weight = model.model.embed_tokens.weight.at[325].add(100.0)
    out = tokens(model, tokenizer, n=10, safety=SafetyConfig(**NEVER))
    assert 325 not in [t for t, _, _ in out]


# -- bad input --------------------------------------------------------------------------------

def test_empty_prompt_is_one_clear_error(tokenizer, model):
    with pytest.raises(SafesigError, match="the prompt is empty"):
        generate(model, tokenizer, "")
    with pytest.raises(SafesigError, match="the prompt is empty"):
        generate(model, tokenizer, [{"role": "user", "content": ""}])


def test_prompt_longer_than_the_context_is_one_clear_error(tokenizer, model):
    with pytest.raises(SafesigError, match=r"the prompt has \d+ tokens but the model's context "
                                           r"is 512 tokens"):
        generate(model, tokenizer, "bread " * 600)


def test_probe_position_current_is_honoured_and_fused_equals_separate(tokenizer):
    at_zero = make_model()
    current = make_model(safesig={"probe_position": "current"})
    config = SafetyConfig(schedule="each", **NEVER)
    p_zero = [e.p for _, _, s in tokens(at_zero, tokenizer, n=8, safety=config)
              for e in s.events][1:]
    fused = [e.p for _, _, s in tokens(current, tokenizer, n=8, safety=config) for e in s.events]
    separate = [e.p for _, _, s in tokens(current, tokenizer, n=8, safety=config,
                                          fused_probe=False) for e in s.events]
    assert max(abs(a - b) for a, b in zip(fused, separate)) < 1e-5
    assert max(abs(a - b) for a, b in zip(fused[1:], p_zero)) > 1e-4  # positions do matter


def test_score_and_peaks_give_the_verdict_and_the_gates_peak_from_the_same_forwards(
        tokenizer, monkeypatch):
    """(p, peak) of each item == (``score``, ``max_window_mean`` of ``query_surprisal``), batched
    or chunked alone; a cache keeps both, and an item whose cache holds only p runs again."""
    from mlx_safesig.generate import _verdict_input, query_surprisal, score_and_peaks, verdict_key
    from mlx_safesig.prompt import wrap_tokenizer
    from mlx_safesig.surprisal import max_window_mean

    gen = sys.modules["mlx_safesig.generate"]
    model = make_model(seed=5)
    items = ["hi there", "a much longer question about the sea and the sky " * 3, MSGS, "the sea"]
    want = [(score(model, tokenizer, x), max_window_mean(query_surprisal(model, tokenizer, x), 3))
            for x in items]
    got = score_and_peaks(model, tokenizer, items, 3, batch_size=2)
    assert [p for p, _ in got] == pytest.approx([p for p, _ in want], abs=1e-5)
    assert [k for _, k in got] == pytest.approx([k for _, k in want], abs=1e-4)
    monkeypatch.setattr(gen, "PREFILL_STEP", 16)  # longer prompts run alone, chunked
    again = score_and_peaks(model, tokenizer, items, 3)
    assert [k for _, k in again] == pytest.approx([k for _, k in want], abs=1e-4)
    cache = {}
    score_many(model, tokenizer, items[:1], cache=cache)  # p only: the peak is still to compute
    seen = []
    first = score_and_peaks(model, tokenizer, items, 3, cache=cache, progress=seen.append)
    assert sum(seen) == len(items) and len(cache) == 2 * len(items)
    key = verdict_key(*_verdict_input(model, wrap_tokenizer(tokenizer), items[0]))
    assert cache[key + "|peak3"] == first[0][1]
    seen.clear()
    assert score_and_peaks(model, tokenizer, items, 3, cache=cache, progress=seen.append) == first
    assert seen == [len(items)]  # all kept: no forward
    assert score_many(model, tokenizer, items, cache=cache) == [p for p, _ in first]


def test_prompts_sharing_a_long_prefix_run_on_one_cache_with_the_same_verdicts(
        tokenizer, monkeypatch):
    """Items that share ``SHARED_PREFIX`` leading tokens (the same wrapper) run one by one on a
    conversation cache, each prefilling only what it does not share with the one before: the
    same p and gate peak as alone, fewer tokens run; the rest are batched as before."""
    from mlx_safesig.generate import _shared_prefix_items, _verdict_input, score_and_peaks
    from mlx_safesig.prompt import wrap_tokenizer
    from mlx_safesig.surprisal import max_window_mean

    gen = sys.modules["mlx_safesig.generate"]
    model = make_model(seed=7)
    wrapper = "You are a pirate captain on a long voyage across the stormy sea. " * 2
    items = [wrapper + "Tell me about knots.", "hi", wrapper + "What is a compass?",
             [{"role": "user", "content": wrapper + "Sing a song."}], "the sky is blue today"]
    want = [(score(model, tokenizer, x),
             max_window_mean(gen.query_surprisal(model, tokenizer, x), 4)) for x in items]
    ran = []
    hidden = model.hidden

    def counting(tokens, *args, **kw):
        ran.append(tokens.shape[0] * tokens.shape[1])
        return hidden(tokens, *args, **kw)

    model.hidden = counting
    monkeypatch.setattr(gen, "SHARED_PREFIX", 10**6)  # nothing shared: all batched
    plain = score_and_peaks(model, tokenizer, items, 4)
    tokens_plain, ran[:] = sum(ran), []
    monkeypatch.setattr(gen, "SHARED_PREFIX", 8)
    inputs = [_verdict_input(model, wrap_tokenizer(tokenizer), x) for x in items]
    assert sorted(_shared_prefix_items(inputs, range(len(items)))) == [0, 2]  # strings; not chat
    got = score_and_peaks(model, tokenizer, items, 4)
    for g, w in zip((plain, got), (want, want)):
        assert [p for p, _ in g] == pytest.approx([p for p, _ in w], abs=1e-5)
        assert [k for _, k in g] == pytest.approx([k for _, k in w], abs=1e-4)
    assert sum(ran) < tokens_plain
    assert score_many(model, tokenizer, items) == pytest.approx([p for p, _ in want], abs=1e-5)
