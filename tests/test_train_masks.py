"""Training rows see exactly what inference sees: the query [CLS], the window probes and the response
logits of a training forward equal the ones generation computes step by step."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import make_model

from mlx_safesig.data import special_token_ids, tokenize_example
from mlx_safesig.decoding import REFUSAL_PREFIX, scheduled
from mlx_safesig.generate import score
from mlx_safesig.prefill import prefill_prompt, probe
from mlx_safesig.train import collate, layout, plan_probes, probe_ends, window_monitor

RECORD = {
    "messages": [
        {"role": "user", "content": "Tell me a story about a robot and the sea."},
        {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."},
    ],
    "label": 0,
    "continuation": "Write a poem about the capital of France, Paris.",
    "continuation_label": 1,
}
CONVERSATION = {  # SPEC §3b: the verdict judges every message before the response
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Tell me a story about a robot"},
        {"role": "assistant", "content": "Which robot?"},
        {"role": "user", "content": "and the sea."},
        {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."},
    ],
    "label": 0,
    "continuation": "Write a poem about the capital of France, Paris.",
    "continuation_label": 1,
}


def training_forward(model, tokenizer, examples, probes=3):
    monitor, special = window_monitor(model), special_token_ids(tokenizer)
    plans = [plan_probes(ex, probes, monitor, special) for ex in examples]
    rows = [layout(ex, p, model.cls_token_id, model.args.safesig["probe_position"])
            for ex, p in zip(examples, plans)]
    totals = {"lm": 1, "query": 1, "probe": 1}
    batch = collate(rows, totals)
    h = model.hidden(batch["ids"], mask=batch["mask"], positions=batch["positions"])
    return plans, rows, batch, h


def generation_cache(model, ex, branch_tokens):
    """Prompt prefilled, the query [CLS] kept, ``branch_tokens`` fed as the response."""
    cache = model.make_cache()
    prefill_prompt(model, ex.prompt, cache)
    probe(model, cache, ex.query_slots, position=0, keep=True)
    h = model.hidden(mx.array(branch_tokens)[None], cache)
    return cache, h


def inference_probe(model, ex, branch_tokens, p):
    """p(malicious) of generate.probe after branch index ``p.t`` over ``p.window``."""
    cache, _ = generation_cache(model, ex, branch_tokens[: p.t + 1])
    base = len(ex.prompt) + 1
    slot = cache[0].offset
    position = slot if model.args.safesig["probe_position"] == "current" else 0
    query = list(ex.query_slots) if p.query else []
    return probe(model, cache, query + [base + i for i in p.window], position=position).item()


@pytest.mark.parametrize("window_query", [False, True])
@pytest.mark.parametrize("probe_position", [0, "current"])
@pytest.mark.parametrize("record", [RECORD, CONVERSATION])
def test_probes_match_generation_time_probes(tokenizer, probe_position, window_query, record):
    model = make_model(safesig={"probe_position": probe_position, "window_query": window_query})
    ex = tokenize_example(tokenizer, record)
    plans, rows, batch, h = training_forward(model, tokenizer, [ex])
    assert len({p.branch_start for p in plans[0]}) == 2  # probes over the response and continuation
    assert all(p.query == window_query for p in plans[0])
    L = batch["ids"].shape[1]
    trained = model.safety_prob(h.reshape(-1, h.shape[-1])[mx.array(rows[0].cls_slots)])
    n = len(ex.prompt) + 1
    for j, p in enumerate(plans[0]):
        tokens = ex.response if p.branch_start == n else ex.continuation
        expected = inference_probe(model, ex, tokens, p)
        assert trained[1 + j].item() == pytest.approx(expected, abs=1e-5), (j, L)


@pytest.mark.parametrize("record", [RECORD, CONVERSATION])
def test_query_cls_matches_score(tokenizer, model, record):
    ex = tokenize_example(tokenizer, record)
    _, rows, _, h = training_forward(model, tokenizer, [ex])
    p_train = model.safety_prob(h[0, 0]).item()
    assert p_train == pytest.approx(score(model, tokenizer, record["messages"][:-1]), abs=1e-5)


def test_a_conversation_row_judges_every_message(tokenizer):
    ex = tokenize_example(tokenizer, CONVERSATION)
    judged = tokenizer.decode([ex.prompt[i] for i in ex.query_slots])
    assert judged == "".join(m["content"] for m in CONVERSATION["messages"][:-1])


@pytest.mark.parametrize("branch", ["response", "continuation"])
def test_branch_logits_match_generation(tokenizer, model, branch):
    ex = tokenize_example(tokenizer, RECORD)
    _, rows, _, h = training_forward(model, tokenizer, [ex])
    tokens = ex.response if branch == "response" else ex.continuation
    start = len(ex.prompt) + 1 + (0 if branch == "response" else len(ex.response))
    trained = model.logits(h[0, start : start + len(tokens)])
    _, h_gen = generation_cache(model, ex, tokens)
    np.testing.assert_allclose(np.array(trained), np.array(model.logits(h_gen[0])), atol=1e-4)


def test_lm_targets_are_the_response_only(tokenizer):
    ex = tokenize_example(tokenizer, RECORD)
    row = layout(ex, [], 999, 0)
    assert row.lm_targets.tolist() == ex.response
    assert row.ids[row.lm_slots + 1].tolist() == ex.response  # each slot predicts the next token
    assert tokenizer.decode(ex.response).startswith("The quick brown fox")


def test_a_prefill_is_in_the_sequence_but_not_an_lm_target(tokenizer):
    """A row's ``prefill`` (the refusal prefix strategic decoding inserts): the same tokens
    generation inserts, in the row, and the LM targets are only what follows it."""
    reply = REFUSAL_PREFIX + " it could hurt someone."
    record = {"prompt": "Tell me a story.", "response": reply, "prefill": REFUSAL_PREFIX, "label": 1}
    ex = tokenize_example(tokenizer, record)
    inserted = tokenizer.encode(REFUSAL_PREFIX, add_special_tokens=False)
    assert ex.lm_start == len(inserted) and ex.response[: ex.lm_start] == inserted
    assert tokenizer.decode(ex.response) == reply + "<|im_end|>\n"
    row = layout(ex, [], 999, 0)
    assert row.lm_targets.tolist() == ex.response[ex.lm_start:]
    assert row.ids[row.lm_slots + 1].tolist() == ex.response[ex.lm_start:]
    assert tokenizer.decode(row.lm_targets.tolist()) == " it could hurt someone.<|im_end|>\n"
    plain = tokenize_example(tokenizer, {k: v for k, v in record.items() if k != "prefill"})
    assert plain.lm_start == 0 and plain.prompt == ex.prompt


def test_padding_and_batching_do_not_change_results(tokenizer, model):
    short = tokenize_example(tokenizer, {"prompt": "Hi there?", "response": "Hello.", "label": 1})
    ex = tokenize_example(tokenizer, RECORD)
    _, rows, batch, h = training_forward(model, tokenizer, [ex, short])
    _, rows_alone, _, h_alone = training_forward(model, tokenizer, [short])
    L = batch["ids"].shape[1]
    flat = h.reshape(-1, h.shape[-1])
    np.testing.assert_allclose(
        np.array(model.safety_prob(flat[L + mx.array(rows[1].cls_slots)])),
        np.array(model.safety_prob(h_alone[0, mx.array(rows_alone[0].cls_slots)])), atol=1e-5,
    )


def test_special_tokens_stay_out_of_windows(tokenizer, model):
    ex = tokenize_example(tokenizer, RECORD)
    special = special_token_ids(tokenizer)
    plans = plan_probes(ex, 8, window_monitor(model), special)
    assert ex.response[-2] in special  # <|im_end|> then a newline
    for p in plans:
        tokens = ex.response if p.branch_start == len(ex.prompt) + 1 else ex.continuation
        assert all(tokens[i] not in special for i in p.window)
        assert max(p.window) <= p.t and p.t - min(p.window) < model.args.safesig["r2"]


def test_malicious_examples_get_no_probes_on_their_refusal(tokenizer, model):
    record = {"prompt": "Tell me a story.", "response": "Sorry, I can't.", "label": 1}
    ex = tokenize_example(tokenizer, record)
    assert plan_probes(ex, 4, window_monitor(model), special_token_ids(tokenizer)) == []


def test_probe_ends_follow_the_generation_schedule():
    # annealing probes every token below 31, every 2nd up to 94, every 4th after that
    ends = probe_ends(200, 12)
    assert ends == sorted(set(ends)) and len(ends) == 12
    assert all(scheduled("annealing", t) for t in ends)
    assert sum(t < 31 for t in ends) == 4  # 31 of the 89 scheduled slots come first: 12 * 31/89
    assert probe_ends(200, 4, "each") == [25, 75, 125, 175]  # even over the tokens
    assert probe_ends(200, 4, "first") == [25, 75, 125, 175]  # no generation probes: as "each"
    assert probe_ends(200, 4, "periodic:50") == [49, 99, 149, 199]
    assert probe_ends(5, 12) == [0, 1, 2, 3, 4]  # fewer slots than probes: all of them
    assert probe_ends(0, 4) == []
    # generation with min_window 8 checks nothing before 8 tokens: neither does training
    assert probe_ends(5, 12, min_window=3) == [2, 3, 4]
    assert min(probe_ends(200, 12, min_window=8)) >= 7
    assert probe_ends(6, 4, min_window=8) == []


def test_plan_probes_puts_windows_where_the_schedule_probes(tokenizer, model):
    ex = tokenize_example(tokenizer, RECORD)
    special = special_token_ids(tokenizer)
    for schedule in ("annealing", "each", "periodic:3"):
        plans = plan_probes(ex, 3, window_monitor(model), special, schedule)
        n = len(ex.prompt) + 1
        got = sorted(p.t for p in plans if p.branch_start == n)
        assert got == [t for t in probe_ends(len(ex.response), 3, schedule)
                       if ex.response[t] not in special]
        assert all(scheduled(schedule, t) for t in got)
    # a min_window from the model's config or the train option reaches the plan
    plans = plan_probes(ex, 64, window_monitor(model, min_window=6), special, "each")
    assert min(p.t for p in plans) == 5
