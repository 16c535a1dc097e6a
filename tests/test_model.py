"""Equivalences of the safety model's forward pass (tiny random models, fp32)."""

import mlx.core as mx
import pytest
from conftest import FAMILY_CONFIGS, make_model
from mlx.utils import tree_flatten
from mlx_lm.models import llama, qwen2, qwen3

from mlx_safesig.attention import causal_mask, rope_at, rope_table, scoring_mask, sft_mask
from mlx_safesig.prefill import prefill_prompt, probe

MLX_LM = {"llama": llama, "qwen2": qwen2, "qwen3": qwen3}
IDS = [1, 17, 45, 99, 130, 7, 250, 3, 66]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_plain_forward_is_mlx_lm_forward_bit_for_bit(family):
    ours = make_model(family)
    module = MLX_LM[family]
    ref = module.Model(module.ModelArgs.from_dict({**FAMILY_CONFIGS[family], "vocab_size": 320}))
    ref.load_weights(
        [(k, v) for k, v in tree_flatten(ours.parameters()) if not k.startswith("cls_")]
    )
    x = mx.array([IDS])
    assert mx.array_equal(ours(x), ref(x))
    from mlx_lm.models.cache import make_prompt_cache

    c1, c2 = ours.make_cache(), make_prompt_cache(ref)
    ours(x, cache=c1), ref(x, cache=c2)
    step = mx.array([[42]])
    assert mx.array_equal(ours(step, cache=c1), ref(step, cache=c2))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_cls_nobody_attends_to_leaves_normal_tokens_unchanged(family):
    model = make_model(family)
    n = len(IDS)
    plain = model.hidden(mx.array([IDS]), positions=1)  # text at positions 1..n, no [CLS]
    with_cls = model.hidden(
        mx.array([[model.cls_token_id] + IDS]), mask=scoring_mask(n), positions=0
    )
    assert mx.allclose(with_cls[:, 1:], plain, atol=1e-5).item()
    # and RoPE is relative: shifting every position by one changes nothing either
    assert mx.allclose(model.hidden(mx.array([IDS])), plain, atol=1e-5).item()


def test_scoring_mask_rules():
    m = scoring_mask(3).tolist()
    assert m[0] == [True, True, True, True]  # [CLS] sees every text token and itself
    assert [row[0] for row in m] == [True, False, False, False]  # nobody attends to [CLS]
    assert m[2] == [False, True, True, False]  # otherwise causal


def test_sft_mask_rules():
    # slots: 0 [CLS], 1 bos, 2 template, 3-4 query, 5 template, 6-7 response
    m = sft_mask(8, query_slots=[3, 4], response_start=6).tolist()
    assert m[0] == [True, False, False, True, True, False, False, False]
    assert [row[0] for row in m] == [True, False, False, False, False, False, True, True]
    assert m[7][1:] == [True] * 7
    assert all(any(row) for row in m)


def test_per_token_rope_equals_contiguous_rope():
    model = make_model()
    rope = model.layers[0].self_attn.rope
    x = mx.random.normal((2, 4, 6, 16))
    assert mx.allclose(rope_at(rope, x, mx.arange(5, 11)), rope_at(rope, x, 5), atol=1e-6).item()
    h_int = model.hidden(mx.array([IDS]), positions=3)
    h_arr = model.hidden(mx.array([IDS]), positions=mx.arange(3, 3 + len(IDS)))
    assert mx.allclose(h_int, h_arr, atol=1e-5).item()


@pytest.mark.parametrize("rope_kind", ["default", "llama3", "yarn", "traditional"])
def test_rope_table_equals_per_token_rope(rope_kind):
    from mlx_lm.models.rope_utils import initialize_rope

    scaling = {"default": None, "traditional": None,
               "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
               "yarn": {"rope_type": "yarn", "factor": 4.0,
                        "original_max_position_embeddings": 64}}[rope_kind]
    rope = initialize_rope(16, 10000.0, rope_kind == "traditional", scaling, 256)
    x = mx.random.normal((2, 4, 6, 16))
    for positions in (mx.array([0, 7, 3, 100, 1, 2]), mx.array([[5, 6, 7, 8, 9, 0], [0] * 6])):
        table = rope_table(rope, positions, 16)
        assert isinstance(table, tuple) == (rope_kind != "traditional")
        assert mx.allclose(rope_at(rope, x, table), rope_at(rope, x, positions), atol=1e-5).item()
    assert rope_table(rope, 4, 16) == 4


def test_score_equals_dense_scoring_mask_forward():
    model = make_model()
    n = len(IDS)
    dense = model.hidden(
        mx.array([[model.cls_token_id] + IDS]), mask=scoring_mask(n), positions=0
    )
    p_dense = model.safety_prob(dense[0, 0]).item()
    cache = model.make_cache()
    prefill_prompt(model, IDS, cache)
    assert probe(model, cache, range(n)).item() == pytest.approx(p_dense, abs=1e-6)


def test_split_prefill_equals_dense_strategic_mask():
    """Generation's prefill (prompt causal, [CLS] kept, response after) == one forward with the
    SFT mask of SPEC §3 over [CLS] prompt response."""
    model = make_model()
    prompt, response, span = IDS[:7], IDS[7:], (2, 5)
    seq = [model.cls_token_id] + prompt + response
    L = len(seq)
    mask = sft_mask(L, query_slots=range(span[0] + 1, span[1] + 1), response_start=len(prompt) + 1)
    dense = model.hidden(mx.array([seq]), mask=mask, positions=0)
    cache = model.make_cache()
    prefill_prompt(model, prompt, cache)
    p = probe(model, cache, range(*span), keep=True)
    h_resp = model.hidden(mx.array([response]), cache)
    assert p.item() == pytest.approx(model.safety_prob(dense[0, 0]).item(), abs=1e-6)
    assert mx.allclose(h_resp[0], dense[0, len(prompt) + 1 :], atol=1e-5).item()


def test_causal_mask_with_offset():
    m = causal_mask(2, offset=3).tolist()
    assert m == [[True, True, True, True, False], [True, True, True, True, True]]


def test_two_logit_head_uses_softmax_of_second_logit():
    model = make_model(safesig={"head_logits": 2})
    h = mx.random.normal((model.args.hidden_size,))
    z = model.cls_head(h)
    assert model.safety_prob(h).item() == pytest.approx(mx.softmax(z)[1].item(), abs=1e-6)


def _decode_hidden(model, ids, steps=6, probe_window=(1, 3)):
    """Prefill ``ids`` then decode ``steps`` compiled steps, one of them a fused [token, probe]
    step: every final-norm state, for comparing models."""
    from mlx_safesig.attention import decode_probe_mask

    cache = model.make_cache()
    outs = [model.hidden(mx.array([ids]), cache)]
    for t in range(steps):
        n = cache[0].offset
        if t == 2:
            mask = decode_probe_mask(n, list(range(*probe_window)))
            h = model.hidden(mx.array([[7, model.cls_token_id]]), cache, mask=mask[None],
                             positions=mx.array([n, 0]), compiled=True)
            for c in cache:
                c.offset -= 1  # drop the probe's keys/values
        else:
            h = model.hidden(mx.array([[7 + t]]), cache, positions=mx.array([n]), compiled=True)
        outs.append(h)
    return outs


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_fused_projections_equal_separate_ones_and_keep_the_weights(family):
    model = make_model(family)
    before = dict(tree_flatten(model.parameters()))
    expected = _decode_hidden(model, IDS)
    assert model.fuse_projections() == 2 * len(model.layers)
    after = dict(tree_flatten(model.parameters()))
    assert before.keys() == after.keys()
    assert all(mx.array_equal(before[k], after[k]).item() for k in before)
    got = _decode_hidden(model, IDS)
    assert all(mx.allclose(a, b, atol=1e-5).item() for a, b in zip(expected, got))


def test_weight_updates_and_lora_after_fusing_are_not_ignored():
    from mlx_lm.tuner.utils import linear_to_lora_layers

    fresh = make_model(seed=1)
    model = make_model()
    model.fuse_projections()
    _decode_hidden(model, IDS)  # trace the compiled steps with the fused weights
    model.load_weights(list(tree_flatten(fresh.parameters())))
    assert all(mx.allclose(a, b, atol=1e-5).item()
               for a, b in zip(_decode_hidden(model, IDS), _decode_hidden(fresh, IDS)))

    model.fuse_projections()
    lora = {"rank": 4, "scale": 20.0, "dropout": 0.0}
    for m in (model, fresh):
        mx.random.seed(3)
        linear_to_lora_layers(m, 2, lora)
        for layer in m.layers[-2:]:  # non-zero LoRA B, so the adapters change the output
            for name in ("q_proj", "v_proj"):
                lin = layer.self_attn[name]
                lin.lora_b = mx.random.normal(lin.lora_b.shape) * 0.1
        mx.eval(m.parameters())
    assert all(mx.allclose(a, b, atol=1e-5).item()
               for a, b in zip(_decode_hidden(model, IDS), _decode_hidden(fresh, IDS)))
