"""Utility measures: the reference NLL is what the two forwards (generation with the kept [CLS], plain
mlx-lm without it) assign to the answer, and the loop detector counts repeated 4-grams."""

import random
from collections import Counter

import mlx.core as mx
import pytest
from conftest import make_model
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_safesig import SafesigError, SafetyConfig, stream_generate
from mlx_safesig.eval.utility import answer_nll, has_loop, loop_cut, loop_rate
from mlx_safesig.prompt import prepare_prompt

ROW = {"id": "r1", "text": "How do I bake bread at home?",
       "reference": "Mix flour, water, yeast and salt, then knead."}


def test_without_cls_the_nll_is_plain_mlx_lms(tokenizer):
    model = make_model(seed=1)
    prompt = prepare_prompt(tokenizer, [{"role": "user", "content": ROW["text"]}]).ids
    answer = tokenizer.encode(ROW["reference"], add_special_tokens=False)
    logits = model(mx.array([prompt + answer[:-1]]))[0, len(prompt) - 1:]
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    expected = -sum(logprobs[i, t].item() for i, t in enumerate(answer)) / len(answer)
    assert answer_nll(model, tokenizer, [ROW], cls_in_context=False)[0] == pytest.approx(expected,
                                                                                       abs=1e-4)


def test_with_cls_the_nll_is_what_generation_samples_from(tokenizer):
    model = make_model(seed=1)
    wrapped = TokenizerWrapper(tokenizer)
    messages = [{"role": "user", "content": ROW["text"]}]
    answer = tokenizer.encode(ROW["reference"], add_special_tokens=False)
    total = 0.0
    for i, tok in enumerate(answer):
        prefill = tokenizer.decode(answer[:i]) if i else None
        r = next(iter(stream_generate(model, wrapped, messages, max_tokens=1,
                                      safety=SafetyConfig(schedule="first", threshold=0.999999),
                                      prefill_response=prefill)))
        assert not i or tokenizer.encode(prefill, add_special_tokens=False) == answer[:i]
        total -= r.logprobs[tok].item()
    got = answer_nll(model, tokenizer, [ROW], cls_in_context=True)[0]
    assert got == pytest.approx(total / len(answer), abs=1e-4)


def test_a_row_without_reference_is_an_error(tokenizer):
    with pytest.raises(SafesigError, match="row r2 has no reference answer"):
        answer_nll(make_model(), tokenizer, [{"id": "r2", "text": "Hi"}], cls_in_context=False)


def test_loops_are_4_grams_repeated_three_times():
    rng = random.Random(0)
    for _ in range(300):  # loop_cut agrees with a plain count of every word 4-gram
        text = " ".join(rng.choice("a b c d".split()) for _ in range(rng.randint(0, 14)))
        words = text.split()
        counts = Counter(tuple(words[i:i + 4]) for i in range(len(words) - 3))
        assert has_loop(text) == any(c >= 3 for c in counts.values()), text
        cut = loop_cut(text)
        assert cut is None or not has_loop(text[:cut])
    assert loop_cut("x a b c d a b c d a b c d") == 10  # the second "a b c d"
    assert has_loop("the leaves fall down " * 3)
    assert not has_loop("the leaves fall down " * 2)
    assert not has_loop("Golden leaves drift down, crisp air whispers, autumn sighs.")
    assert loop_rate(["a b c d " * 3, "one two three"]) == 0.5
    with pytest.raises(SafesigError, match="no answers"):
        loop_rate([])
