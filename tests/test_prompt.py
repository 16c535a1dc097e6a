"""What the [CLS] verdict judges (SPEC §3 rule 4, §3b): the content of every message, never
template markup or special tokens; a final assistant message is response; token ids take a span."""

import copy

import pytest
from conftest import make_model

from mlx_safesig import SafesigError, prepare_prompt, score
from mlx_safesig.prompt import prompt_with_prefill

SYSTEM = {"role": "system", "content": "You are terse."}
USER = {"role": "user", "content": "How do I bake bread at home?"}
REPLY = {"role": "assistant", "content": "Mix flour."}
FOLLOW = {"role": "user", "content": "Tell me a story about a robot."}


def judged(tokenizer, prepared):
    return tokenizer.decode([prepared.ids[i] for i in prepared.query_slots])


def test_single_user_turn_judges_its_content_only(tokenizer):
    prepared = prepare_prompt(tokenizer, [USER])
    assert judged(tokenizer, prepared) == USER["content"]
    assert prepared.ids == tokenizer.apply_chat_template([USER], add_generation_prompt=True,
                                                         return_dict=False)


def test_every_message_of_a_conversation_is_judged_in_order(tokenizer):
    prepared = prepare_prompt(tokenizer, [SYSTEM, USER, REPLY, FOLLOW])
    assert judged(tokenizer, prepared) == "".join(
        m["content"] for m in (SYSTEM, USER, REPLY, FOLLOW))


def test_template_markup_and_the_templates_own_system_prompt_are_not_judged(tokenizer):
    prepared = prepare_prompt(tokenizer, [USER])
    header = tokenizer.encode("<|im_start|>user\n", add_special_tokens=False)
    judged_ids = [prepared.ids[i] for i in prepared.query_slots]
    assert not set(header) & set(judged_ids) - set(tokenizer.encode(USER["content"]))
    assert "helpful assistant" not in judged(tokenizer, prepared)  # the template's default system
    assert min(prepared.query_slots) > len(tokenizer.encode(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", add_special_tokens=False))


def test_a_final_assistant_message_is_the_prefill_not_the_query(tokenizer):
    prefill = {"role": "assistant", "content": "Sure, here is"}
    prepared = prepare_prompt(tokenizer, [USER, prefill])
    assert prepared.prefill == "Sure, here is"
    assert prepared.ids == prepare_prompt(tokenizer, [USER]).ids
    assert judged(tokenizer, prepared) == USER["content"]
    model = make_model()
    given, ids = prompt_with_prefill(model, tokenizer, [USER, prefill])
    assert given.ids == prepared.ids
    assert ids == tokenizer.encode("Sure, here is", add_special_tokens=False)


def test_prefill_given_twice_is_an_error(tokenizer):
    with pytest.raises(SafesigError, match="give the start of the response one way"):
        prompt_with_prefill(make_model(), tokenizer, [USER, {"role": "assistant", "content": "Ok"}],
                            "Sure")


def test_raw_string_judges_every_token_but_special_ones(tokenizer):
    prepared = prepare_prompt(tokenizer, "<|im_start|>Tell me a story")
    assert prepared.query_slots == list(range(1, len(prepared.ids)))


def test_token_ids_take_a_query_span(tokenizer):
    ids = prepare_prompt(tokenizer, [USER]).ids
    assert prepare_prompt(tokenizer, ids).query_slots == [
        i for i, t in enumerate(ids) if t not in {tokenizer.convert_tokens_to_ids("<|im_start|>"),
                                                  tokenizer.convert_tokens_to_ids("<|im_end|>")}]
    assert prepare_prompt(tokenizer, ids, query_span=(3, 6)).query_slots == [3, 4, 5]
    with pytest.raises(SafesigError, match=r"query_span \(5, 99\) is not a non-empty range"):
        prepare_prompt(tokenizer, ids, query_span=(5, 99))
    with pytest.raises(SafesigError, match="only for prompts given as token ids"):
        prepare_prompt(tokenizer, "text", query_span=(0, 1))


@pytest.mark.parametrize("prompt", ["   \n ", [{"role": "user", "content": "  "}]])
def test_whitespace_only_prompt_is_empty(tokenizer, prompt):
    with pytest.raises(SafesigError, match="the prompt is empty"):
        prepare_prompt(tokenizer, prompt)


LLAMA3_STYLE = (
    "{{ '<|endoftext|>' }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n\n' + "
    "m['content'] | trim + '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n\n' }}{% endif %}"
)
NO_SYSTEM_ROLE = (
    "{% for m in messages %}{% if m['role'] != 'system' %}{{ '<|im_start|>' + m['role'] + '\n' + "
    "m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
REWRITES = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] | upper + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def with_template(tokenizer, template):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def test_a_template_that_adds_bos_and_trims_content(tokenizer):
    tok = with_template(tokenizer, LLAMA3_STYLE)
    prepared = prepare_prompt(tok, [{"role": "user", "content": "  Tell me a story about a robot.  "}])
    assert prepared.ids[0] == tok.convert_tokens_to_ids("<|endoftext|>")
    assert judged(tok, prepared).strip() == "Tell me a story about a robot."
    assert min(prepared.query_slots) > 2  # BOS and the role header are not judged


def test_a_template_that_leaves_a_role_out_judges_what_it_renders(tokenizer):
    tok = with_template(tokenizer, NO_SYSTEM_ROLE)
    assert judged(tok, prepare_prompt(tok, [SYSTEM, USER])) == USER["content"]


def test_a_template_that_rewrites_content_is_an_error_naming_it(tokenizer):
    tok = with_template(tokenizer, REWRITES)
    with pytest.raises(SafesigError, match="chat template .* rewrites message content"):
        prepare_prompt(tok, [USER])


def test_score_of_a_conversation_judges_all_of_it(tokenizer):
    model = make_model()
    alone = score(model, tokenizer, [FOLLOW])
    in_context = score(model, tokenizer, [USER, REPLY, FOLLOW])
    assert alone != pytest.approx(in_context, abs=1e-6)


@pytest.mark.parametrize("contents", [
    ["Tell me a story", "Once upon a time.", "  And then?  "],
    ["Qu'est-ce que c'est ? Ça va, très bien — merci!", "Sí, ¿cómo estás?", "ok\n\nnext line"],
    ["x", "a\tb", "emoji 🙂 and more", "end."],
])
def test_content_slots_from_offsets_equal_the_per_span_tokenization(tokenizer, contents):
    """One pass over the fast tokenizer's offsets gives the slots of re-tokenizing every span's
    prefixes (which costs turns x conversation length)."""
    from mlx_safesig.prompt import _token_span, content_slots, render_chat, wrap_tokenizer

    wrapped = wrap_tokenizer(tokenizer)
    roles = ["user", "assistant"] * len(contents)
    text, spans = render_chat(wrapped, [{"role": r, "content": c} for r, c in zip(roles, contents)])
    ids = wrapped.encode(text, add_special_tokens=False)
    spans = [(a, b) for a, b in spans if text[a:b].strip()]
    slow = [i for a, b in spans for i in _token_span(wrapped, text, ids, a, b)]
    assert wrapped._tokenizer.is_fast  # so content_slots takes its offsets path
    assert content_slots(wrapped, text, ids, spans) == slow and slow
