"""The one strategic-decoding engine: a batch of rows against single runs, the probe budget
(none after the insertion, schedules over generated tokens), conversation caches, KV options."""

import mlx.core as mx
import pytest
from conftest import make_model
from mlx_lm.sample_utils import make_logits_processors
from test_generate import MSGS, NEVER, ScriptedHead
from test_safe_batch import PROMPTS, judging_model

from mlx_safesig import (
    RetractStep,
    SafeBatchGenerator,
    SafesigError,
    SafetyConfig,
    TokenStep,
    make_prompt_cache,
    prepare_prompt,
    seeded_sampler,
    stream_generate,
)

# on ``judging_model`` with rollback: some rows refuse at once, some mid-answer (with a
# retraction), some never; some stop early on EOS
MIXED = dict(threshold=0.39, window_threshold=0.6, rollback=True)


def user(text):
    return [{"role": "user", "content": text}]


def single(model, tokenizer, prompt, n, safety, sampler=None, processors=None):
    """A single run as ("token", id, refusal, probes) / ("retract",) items."""
    out = []
    for r in stream_generate(model, tokenizer, prompt, n, safety=safety, sampler=sampler,
                             logits_processors=processors):
        probes = [round(e.p, 4) for e in r.safety.events if e.kind == "probe"]
        out.append(("retract",) if r.token is None else ("token", r.token, r.refusal, probes))
    return out


def as_items(steps):
    return [("retract",) if isinstance(s, RetractStep) else
            ("token", s.token, s.refusal, [round(e.p, 4) for e in s.safety.events if e.kind == "probe"])
            for s in steps]


def drain(engine, rows, late=(), join_after=3):
    """Run ``engine`` to the end; ``late`` rows are inserted after ``join_after`` steps.
    Returns uid -> steps, the uids in insertion order."""
    def insert(rows):
        return [engine.insert([p], n, samplers=[s], logits_processors=[procs])[0]
                for p, n, s, procs in rows]

    uids = insert(rows)
    steps, k = {}, 0
    while engine.rows or engine.joining or k <= join_after:
        k += 1
        if k == join_after:
            uids += insert(late)
        for s in engine.next():
            steps.setdefault(s.uid, []).append(s)
    return steps, uids


@pytest.mark.parametrize("temp", [0.0, 0.8])
def test_a_batch_gives_each_row_its_single_run(tokenizer, temp):
    model = judging_model()
    safety = SafetyConfig(schedule="annealing", **MIXED)

    def sampler(i):
        return seeded_sampler(i, temp=temp) if temp else None

    def processors(i):  # one row penalises repeats: processors see the row's own history
        return make_logits_processors(repetition_penalty=1.5) if i == 3 else None

    jobs = [(user(p), 48 - 2 * i, i) for i, p in enumerate(PROMPTS[:8])]
    steps, uids = drain(SafeBatchGenerator(model, tokenizer, safety),
                        [(p, n, sampler(i), processors(i)) for p, n, i in jobs[:5]],
                        late=[(p, n, sampler(i), processors(i)) for p, n, i in jobs[5:]])
    for (prompt, n, i), uid in zip(jobs, uids):
        # a fresh sampler: the same seed, so the same draws
        assert as_items(steps[uid]) == single(model, tokenizer, prompt, n, safety, sampler(i),
                                              processors(i))
        assert steps[uid][-1].finish_reason in ("stop", "length")
    assert single(model, tokenizer, *jobs[3][:2], safety, sampler(3)) != \
        single(model, tokenizer, *jobs[3][:2], safety, sampler(3), processors(3))
    every = [s for uid in uids for s in steps[uid]]
    refusing = {s.uid for s in every if isinstance(s, TokenStep) and s.refusal}
    retracting = {s.uid for s in every if isinstance(s, RetractStep)}
    early = {uid for uid in uids if steps[uid][-1].finish_reason == "stop"}
    assert retracting and refusing - retracting and early  # the mix really happens
    assert len(refusing) < len(uids)


def test_no_probe_after_the_refusal_insertion(tokenizer):
    for script in ([0.1, 0.1, 0.9, 0.9, 0.9], [0.9]):  # mid-answer, then at the query verdict
        model = make_model()
        head = ScriptedHead(model, script)  # counts the probes built into the graph
        calls_at_insertion, probes_after, tokens_after = None, [], 0
        for r in stream_generate(model, tokenizer, MSGS, 60,
                                 safety=SafetyConfig(schedule="each", tau=3)):
            inserted = [e.step for e in r.safety.events if e.kind == "refusal-inserted"]
            assert r.safety.inserted == (bool(inserted) or calls_at_insertion is not None)
            if inserted:
                calls_at_insertion, at = head.calls, inserted[0]
            elif calls_at_insertion is not None:
                tokens_after += 1
                probes_after += [e for e in r.safety.events if e.kind == "probe"]
        assert tokens_after > 40
        assert probes_after == [] and head.calls == calls_at_insertion
        assert at == (4 if len(script) > 1 else 0)  # after tokens 1, 2, 3 said malicious


def probe_steps(tokenizer, prefill, n=64):
    model = make_model(max_position_embeddings=1024)
    safety = SafetyConfig(schedule="annealing", **NEVER)
    steps = [e.step for r in stream_generate(model, tokenizer, MSGS, n, safety=safety,
                                             prefill_response=prefill)
             for e in r.safety.events if e.kind == "probe"]
    return steps


def test_a_500_token_prefill_gets_as_many_checks_as_none(tokenizer):
    prefill = "bread" * 167
    n_prefill = len(tokenizer.encode(prefill, add_special_tokens=False))
    assert 500 <= n_prefill < 510
    plain = probe_steps(tokenizer, None)
    prefilled = probe_steps(tokenizer, prefill)
    assert plain[0] == prefilled[0] == -1  # the query verdict
    assert prefilled[1] == n_prefill - 1  # the prefill judged before the first generated token
    generated = [t - n_prefill for t in prefilled[2:]]
    assert generated == plain[1:]
    assert len(generated) == 47  # annealing: every token up to 30, then every 2nd


def conversation_turns(model, tokenizer, cache, turns=3, n=12):
    """A 3-turn conversation; each turn's tokens, logprobs and query verdict."""
    history, out = [{"role": "system", "content": "You are terse."}], []
    for k, question in enumerate(["Tell me a story", "Write a poem about the sea",
                                  "What is the capital of France"][:turns]):
        history.append({"role": "user", "content": question})
        results = list(stream_generate(model, tokenizer, history, n, prompt_cache=cache,
                                       safety=SafetyConfig(schedule="each", **NEVER)))
        text = "".join(r.text for r in results)
        out.append(([r.token for r in results], [r.logprobs for r in results],
                    [e.p for r in results for e in r.safety.events]))
        history.append({"role": "assistant", "content": text})
    return out


def test_a_reused_conversation_cache_equals_prefilling_the_whole_conversation(tokenizer):
    model = make_model()
    cache = make_prompt_cache(model)
    reused = conversation_turns(model, tokenizer, cache)
    again = conversation_turns(model, tokenizer, None)
    for (tok_a, lp_a, p_a), (tok_b, lp_b, p_b) in zip(reused, again):
        assert tok_a == tok_b
        assert all(mx.abs(a - b).max().item() < 1e-5 for a, b in zip(lp_a, lp_b) if a is not None)
        assert max(abs(a - b) for a, b in zip(p_a, p_b)) < 1e-5
    assert cache.offset > 60  # the conversation really sits in the cache


def test_a_reused_cache_with_safety_off_equals_mlx_lm_on_the_whole_prompt(tokenizer):
    model = make_model()
    cache = make_prompt_cache(model)
    for turns in (1, 2):
        history = MSGS + [{"role": "assistant", "content": "Mix flour."}] * (turns - 1) + (
            [{"role": "user", "content": "Tell me more"}] if turns > 1 else [])
        reused = [r.token for r in stream_generate(model, tokenizer, history, 10,
                                                   safety=SafetyConfig(enabled=False),
                                                   prompt_cache=cache)]
        whole = [r.token for r in stream_generate(model, tokenizer, history, 10,
                                                  safety=SafetyConfig(enabled=False))]
        assert reused == whole


def test_kv_bits_and_a_prompt_cache_work_with_safety_on(tokenizer):
    model = make_model(head_dim=32)  # mlx quantizes groups of 32 and more
    cache = make_prompt_cache(model)
    safety = SafetyConfig(schedule="each", **NEVER)
    full = [r.token for r in stream_generate(model, tokenizer, MSGS, 16, safety=safety)]
    quantized = [r.token for r in stream_generate(model, tokenizer, MSGS, 16, safety=safety,
                                                  kv_bits=8, kv_group_size=32,
                                                  prompt_cache=cache)]
    assert len(quantized) == 16
    assert quantized[:4] == full[:4]  # 8-bit keys/values: close to the full-precision run


def test_options_that_cannot_be_honoured_are_one_clear_error(tokenizer, model):
    with pytest.raises(SafesigError, match="max_kv_size cannot be honoured with safety on"):
        list(stream_generate(model, tokenizer, MSGS, 4, max_kv_size=64))
    with pytest.raises(SafesigError, match="max_kv_size cannot be honoured"):
        make_prompt_cache(model, max_kv_size=64)
    with pytest.raises(SafesigError, match="prompt_cache must come from mlx_safesig.make_prompt"):
        list(stream_generate(model, tokenizer, MSGS, 4, prompt_cache=model.make_cache()))
    with pytest.raises(SafesigError, match="with safety on does not take prefill_step_size"):
        list(stream_generate(model, tokenizer, MSGS, 4, prefill_step_size=64))
    engine = SafeBatchGenerator(make_model(head_dim=32), tokenizer, SafetyConfig(), kv_bits=8,
                                kv_group_size=32)
    engine.insert([MSGS], 4)
    with pytest.raises(SafesigError, match="kv_bits works with safety on for one row"):
        engine.insert([MSGS], 4)


def test_a_batch_with_separate_probes_equals_the_fused_batch(tokenizer):
    model = judging_model()
    safety = SafetyConfig(schedule="each", **MIXED)
    rows = [(user(p), 40, None, None) for p in PROMPTS[:6]]
    fused, a = drain(SafeBatchGenerator(model, tokenizer, safety), rows[:4], late=rows[4:])
    separate, b = drain(SafeBatchGenerator(model, tokenizer, safety, fused_probe=False),
                        rows[:4], late=rows[4:])
    n_probes = 0
    for ua, ub in zip(a, b):
        items_a, items_b = as_items(fused[ua]), as_items(separate[ub])
        assert [i[:3] for i in items_a] == [i[:3] for i in items_b]
        probes_a = [p for i in items_a if i[0] == "token" for p in i[3]]
        probes_b = [p for i in items_b if i[0] == "token" for p in i[3]]
        assert probes_a == pytest.approx(probes_b, abs=1e-4)
        n_probes += len(probes_a)
    assert n_probes > 60


def test_removed_rows_leave_and_the_others_go_on_unchanged(tokenizer):
    model = judging_model()
    safety = SafetyConfig(schedule="annealing", **MIXED)
    engine = SafeBatchGenerator(model, tokenizer, safety)
    uids = engine.insert([user(p) for p in PROMPTS[:4]], 30)
    steps = {}
    for k in range(40):
        if k == 3:
            engine.remove([uids[1]])
        for s in engine.next():
            steps.setdefault(s.uid, []).append(s)
    assert len(steps[uids[1]]) == 3 and steps[uids[1]][-1].finish_reason is None
    for i in (0, 2, 3):
        assert as_items(steps[uids[i]]) == single(model, tokenizer, user(PROMPTS[i]), 30, safety)


def test_rows_with_their_own_safety_settings_equal_their_single_runs(tokenizer):
    model = judging_model()
    each = SafetyConfig(schedule="each", **MIXED)
    own = SafetyConfig(schedule="periodic:3", threshold=0.39, window_threshold=0.6, tau=2,
                       refusal_prefix="\nNo.")
    engine = SafeBatchGenerator(model, tokenizer, each)
    a = engine.insert([user(p) for p in PROMPTS[:3]], 30)
    b = engine.insert([user(p) for p in PROMPTS[:3]], 30, safety=own)
    steps = {}
    while engine.rows or engine.joining:
        for s in engine.next():
            steps.setdefault(s.uid, []).append(s)
    for i in range(3):
        assert as_items(steps[a[i]]) == single(model, tokenizer, user(PROMPTS[i]), 30, each)
        assert as_items(steps[b[i]]) == single(model, tokenizer, user(PROMPTS[i]), 30, own)
    assert as_items(steps[a[0]]) != as_items(steps[b[0]]) or \
        as_items(steps[a[1]]) != as_items(steps[b[1]])


def plain_tokens(model, tokenizer, prompt, n):
    return [(r.token, r.logprobs) for r in stream_generate(
        model, tokenizer, prompt, n, safety=SafetyConfig(enabled=False)) if r.token is not None]


def test_a_benign_verdict_left_out_of_context_gives_the_language_models_own_answer(tokenizer):
    """keep_verdict="flagged": a benign verdict's [CLS] leaves the cache, so the answer is the
    language model's own (safety off), at the same relative positions; the probes still run."""
    model = judging_model()
    safety = SafetyConfig(schedule="each", keep_verdict="flagged", **NEVER)
    for prompt in (user(PROMPTS[0]), user(PROMPTS[5])):
        on = [(r.token, r.logprobs, r.safety) for r in stream_generate(
            model, tokenizer, prompt, 24, safety=safety) if r.token is not None]
        off = plain_tokens(model, tokenizer, prompt, 24)
        assert [t for t, _, _ in on] == [t for t, _ in off]
        assert max(mx.abs(a - b).max().item() for (_, a, _), (_, b) in zip(on, off)) < 1e-4
        assert sum(len(s.events) for _, _, s in on) >= len(on) - 1  # the checks did run
    kept = [r.token for r in stream_generate(model, tokenizer, user(PROMPTS[0]), 24,
                                             safety=SafetyConfig(schedule="each", **NEVER))]
    assert kept != [t for t, _ in plain_tokens(model, tokenizer, user(PROMPTS[0]), 24)]


def test_a_flagged_verdict_stays_in_context_either_way(tokenizer):
    model = judging_model()
    flagged = dict(schedule="each", threshold=0.01)
    for prompt in (user(PROMPTS[0]), user(PROMPTS[1])):
        assert single(model, tokenizer, prompt, 20, SafetyConfig(keep_verdict="flagged", **flagged)) \
            == single(model, tokenizer, prompt, 20, SafetyConfig(**flagged))


def test_a_batch_mixing_kept_and_dropped_verdicts_gives_each_row_its_single_run(tokenizer):
    model = judging_model()
    safety = SafetyConfig(schedule="annealing", keep_verdict="flagged", **MIXED)
    jobs = [(user(p), 40, None, None) for p in PROMPTS[:6]]
    steps, uids = drain(SafeBatchGenerator(model, tokenizer, safety), jobs[:4], late=jobs[4:])
    for (prompt, n, _, _), uid in zip(jobs, uids):
        assert as_items(steps[uid]) == single(model, tokenizer, prompt, n, safety)
    flagged = {s.uid for uid in uids for s in steps[uid] if s.safety.flagged}
    assert flagged and flagged != set(uids)  # both kinds of row were in the batch


def test_keep_verdict_takes_two_values_and_the_models_default():
    with pytest.raises(ValueError, match="keep_verdict must be 'always' or 'flagged'"):
        SafetyConfig(keep_verdict="never")
    assert SafetyConfig().resolved({}).keep_verdict == "always"
    assert SafetyConfig().resolved({"keep_verdict": "flagged"}).keep_verdict == "flagged"
    assert SafetyConfig(keep_verdict="always").resolved(
        {"keep_verdict": "flagged"}).keep_verdict == "always"


def test_a_conversation_without_a_kept_verdict_runs_only_the_new_turn(tokenizer):
    """keep_verdict="flagged", benign verdicts: each reply's keys never saw a [CLS], so the next
    turn reuses prompt and reply (it runs only the new user turn) and still equals a prefill of
    the whole conversation."""
    model = make_model()
    safety = SafetyConfig(schedule="each", keep_verdict="flagged", **NEVER)
    cache, history, reused_prefix, lengths = make_prompt_cache(model), [], [], []
    reuse = cache.reuse
    cache.reuse = lambda ids, safety, **kw: reused_prefix.append(reuse(ids, safety, **kw)) or \
        reused_prefix[-1]
    for question in ["Tell me a story", "Write a poem about the sea", "What is the capital"]:
        history.append({"role": "user", "content": question})
        reused = list(stream_generate(model, tokenizer, history, 12, prompt_cache=cache,
                                      safety=safety))
        whole = list(stream_generate(model, tokenizer, history, 12, safety=safety))
        assert [r.token for r in reused] == [r.token for r in whole]
        assert max(mx.abs(a.logprobs - b.logprobs).max().item()
                   for a, b in zip(reused, whole)) < 1e-5
        lengths.append(whole[0].prompt_tokens)
        history.append({"role": "assistant", "content": "".join(r.text for r in reused)})
    assert reused_prefix == [0, lengths[0] + 12, lengths[1] + 12]  # prompt and reply kept


def test_a_conversation_row_leaving_a_batch_keeps_its_reply_in_its_cache(tokenizer):
    """The conversation's row shares a batch with a longer row; when it finishes, its keys are
    taken out of the batch cache into the conversation's, and the next turn equals a prefill."""
    model = make_model()
    safety = SafetyConfig(schedule="each", keep_verdict="flagged", **NEVER)
    cache, history = make_prompt_cache(model), [{"role": "user", "content": "Tell me a story"}]
    engine = SafeBatchGenerator(model, tokenizer, safety)
    mine = engine.insert([history], 6, prompt_cache=cache)[0]
    engine.insert(["Write a long poem about the sea"], 20)
    reply = []
    while steps := engine.next():
        reply += [s.token for s in steps if s.uid == mine and isinstance(s, TokenStep)]
    assert cache.ids == prepare_prompt(tokenizer, history).ids + reply
    history.append({"role": "assistant", "content": tokenizer.decode(reply)})
    history.append({"role": "user", "content": "Tell me more"})
    reused = list(stream_generate(model, tokenizer, history, 8, prompt_cache=cache, safety=safety))
    whole = list(stream_generate(model, tokenizer, history, 8, safety=safety))
    assert [r.token for r in reused] == [r.token for r in whole]
    assert max(mx.abs(a.logprobs - b.logprobs).max().item() for a, b in zip(reused, whole)) < 1e-5
