"""`mlx-safesig server` through the official `openai` client, on loopback, on tiny random models:
OpenAI's shapes, the safety object (whole, and streamed as it happens), refusals, retractions,
stop sequences and seeds. Faults and load: test_server_faults.py."""

import threading
from contextlib import contextmanager

import mlx.core as mx
import openai
import pytest
from conftest import make_model
from test_safe_batch import PROMPTS, judging_model

from mlx_safesig import SafetyConfig
from mlx_safesig.decoding import REFUSAL_PREFIX
from mlx_safesig.server import Sampling, Server

NEVER = SafetyConfig(threshold=0.999999)  # probes run, nothing is inserted
SAFETY_KEYS = {"query_p", "refusal_inserted", "events"}


def endless_model(**overrides):
    """The tiny model with a zero EOS row in its LM head: greedy answers never stop early."""
    model = make_model(tie_word_embeddings=False, **overrides)
    w = model.lm_head.weight
    model.lm_head.weight = mx.where((mx.arange(w.shape[0]) == 2)[:, None], 0.0, w)
    mx.eval(model.parameters())
    return model


@contextmanager
def running(model, tokenizer, safety=NEVER, **kwargs):
    """A server on a free loopback port, serving in a thread; stopped (drained) afterwards."""
    server = Server(model, tokenizer, safety, model_id="tiny", host="127.0.0.1", port=0,
                    **kwargs)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop()
        thread.join(30)
        assert not thread.is_alive()


def client(server, **kwargs):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, **kwargs)


@pytest.fixture(scope="module")
def server(tokenizer):
    with running(endless_model(), tokenizer, sampling=Sampling(max_tokens=12)) as s:
        yield s


def chat(text, system=None):
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": text}]


def test_models_lists_the_served_model(server):
    models = client(server).models.list()
    assert [(m.id, m.object, m.owned_by) for m in models.data] == [("tiny", "model", "mlx-safesig")]


def test_chat_completion_has_openai_shape_and_the_safety_object(server):
    r = client(server).chat.completions.create(
        model="tiny", messages=chat("Tell me a story", system="Be brief.") + [
            {"role": "assistant", "content": "Once"}, {"role": "user", "content": "Go on"}],
        max_tokens=7)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tiny"
    (choice,) = r.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7
    safety = r.model_extra["safety"]
    assert set(safety) == SAFETY_KEYS and safety["refusal_inserted"] is False
    first = safety["events"][0]
    assert first == {"kind": "probe", "step": -1, "p": safety["query_p"]}  # the query verdict
    assert [e["step"] for e in safety["events"][1:]] == list(range(6))  # annealing: every token
    assert all(set(e) == {"kind", "step", "p"} for e in safety["events"])


def test_default_max_tokens_is_the_servers(server):
    r = client(server).chat.completions.create(model="tiny", messages=chat("hi"))
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"


def test_stream_sends_events_apart_from_content_and_the_whole_object_last(server):
    messages = chat("Write a poem about the sea")
    whole = client(server).chat.completions.create(model="tiny", messages=messages, max_tokens=9)
    chunks = list(client(server).chat.completions.create(model="tiny", messages=messages,
                                                         max_tokens=9, stream=True))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    event_chunks = [c for c in chunks[:-1] if "safety" in c.model_extra]
    assert event_chunks and all(c.choices[0].delta.content is None for c in event_chunks)
    streamed = [e for c in event_chunks for e in c.model_extra["safety"]["events"]]
    last = chunks[-1]
    assert last.choices[0].finish_reason == "length"
    assert last.model_extra["safety"] == whole.model_extra["safety"]
    assert streamed == whole.model_extra["safety"]["events"]
    assert all(c.model_extra["safety"]["query_p"] == whole.model_extra["safety"]["query_p"]
               for c in event_chunks)


def test_streamed_refusal_flag_turns_true_with_its_event(tokenizer):
    """Each events chunk carries the state of its step: ``refusal_inserted`` is false before the
    ``refusal-inserted`` event and true from its chunk on (here mid-answer, after tau checks)."""
    safety = SafetyConfig(schedule="each", threshold=0.9, window_threshold=0.6)
    mid_answer = 0
    with running(judging_model(), tokenizer, safety) as s:
        for prompt in PROMPTS:
            chunks = list(client(s).chat.completions.create(
                model="tiny", messages=chat(prompt), max_tokens=24, stream=True))
            seen = False
            for c in chunks[:-1]:
                if "safety" in c.model_extra:
                    inserted = [e for e in c.model_extra["safety"]["events"]
                                if e["kind"] == "refusal-inserted"]
                    seen = seen or bool(inserted)
                    assert c.model_extra["safety"]["refusal_inserted"] is seen
                    mid_answer += any(e["step"] > 0 for e in inserted)
    assert mid_answer > 0


def test_stream_usage_chunk_comes_last_with_the_safety_object(server):
    chunks = list(client(server).chat.completions.create(
        model="tiny", messages=chat("hi"), max_tokens=3, stream=True,
        stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 3
    assert set(last.model_extra["safety"]) == SAFETY_KEYS
    assert chunks[-2].choices[0].finish_reason == "length"


def test_text_completion_takes_a_raw_prompt(server):
    c = client(server)
    r = c.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=5)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    assert set(r.model_extra["safety"]) == SAFETY_KEYS
    streamed = list(c.completions.create(model="tiny", prompt="The quick brown fox",
                                         max_tokens=5, stream=True))
    assert "".join(s.choices[0].text for s in streamed) == r.choices[0].text
    assert streamed[-1].model_extra["safety"] == r.model_extra["safety"]


def test_stop_sequence_ends_the_text_before_it(server):
    c = client(server)
    messages = chat("Tell me a story about a robot")
    full = c.chat.completions.create(model="tiny", messages=messages, max_tokens=12)
    text = full.choices[0].message.content
    stop = text[4:6]
    cut = c.chat.completions.create(model="tiny", messages=messages, max_tokens=12, stop=[stop])
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = c.chat.completions.create(model="tiny", messages=messages, max_tokens=12,
                                         stop=stop, stream=True)
    chunks = list(streamed)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == text[: text.find(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_seed_repeats_a_sampled_answer(server):
    c = client(server)

    def sample(seed):
        return c.chat.completions.create(model="tiny", messages=chat("Tell me a story"),
                                         max_tokens=10, temperature=1.0, seed=seed)

    a, b, other = sample(7), sample(7), sample(8)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.content != other.choices[0].message.content


def test_flagged_request_comes_back_with_the_refusal_inserted(tokenizer):
    # a head bias of +20 puts p(malicious) at ~1: the query verdict is malicious, deterministically
    with running(make_model(head_bias=20.0), tokenizer, SafetyConfig()) as s:
        r = client(s).chat.completions.create(model="tiny", messages=chat("placeholder request"),
                                              max_tokens=48)
        safety = r.model_extra["safety"]
        assert safety["refusal_inserted"] is True and safety["query_p"] > 0.99
        assert [e["kind"] for e in safety["events"]] == ["probe", "refusal-inserted"]
        assert r.choices[0].message.content.startswith(REFUSAL_PREFIX)
        assert r.choices[0].finish_reason in ("stop", "length")  # OpenAI's values
        chunks = list(client(s).chat.completions.create(
            model="tiny", messages=chat("placeholder request"), max_tokens=48, stream=True))
        assert chunks[-1].model_extra["safety"]["refusal_inserted"] is True


def test_rollback_streams_a_retraction_the_client_applies(tokenizer):
    """Under rollback some answers are withdrawn mid-way: a ``retracted`` event says how many
    characters to drop, and the client's text then equals the whole response's."""
    safety = SafetyConfig(schedule="each", threshold=0.39, window_threshold=0.6, rollback=True)
    retracted = 0
    with running(judging_model(), tokenizer, safety) as s:
        c = client(s)
        for prompt in PROMPTS:
            whole = c.chat.completions.create(model="tiny", messages=chat(prompt), max_tokens=24)
            shown = ""
            for chunk in c.chat.completions.create(model="tiny", messages=chat(prompt),
                                                   max_tokens=24, stream=True):
                for e in chunk.model_extra.get("safety", {}).get("events", []) \
                        if chunk.choices[0].finish_reason is None else []:
                    if e["kind"] == "retracted":
                        assert e["chars"] > 0
                        shown = shown[: len(shown) - e["chars"]]
                        retracted += 1
                shown += chunk.choices[0].delta.content or ""
            assert shown == whole.choices[0].message.content
    assert retracted > 0  # the prompts include answers withdrawn mid-way
