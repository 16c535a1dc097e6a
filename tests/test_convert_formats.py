"""Converting tiny random HF checkpoints: every family and input format matches the PyTorch
reference, and the output folder keeps the contract others build on."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_safesig.convert import convert
from mlx_safesig.convert import reference as ref_forward
from test_convert_support import (
    FAMILIES,
    FORMATS,
    HIDDEN,
    TEXTS,
    VOCAB,
    make_hf_folder,
    mlx_logits,
    torch,
)

import mlx_safesig


def converted(tmp_path, **kwargs):
    convert_kwargs = {
        k: kwargs.pop(k)
        for k in ("quantize", "q_bits", "dtype", "head_key", "add_safety")
        if k in kwargs
    }
    src = make_hf_folder(tmp_path / "hf", **kwargs)
    return src, convert(src, tmp_path / "mlx", progress=False, **convert_kwargs)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_score_match_the_pytorch_reference(tmp_path, family, fmt):
    src, out = converted(tmp_path, family=family, fmt=fmt, tie=family in ("llama", "qwen3"))
    ref = ref_forward.load_reference(src)
    model, tokenizer = mlx_safesig.load(str(out))
    for text in TEXTS:
        ids = tokenizer.encode(text)
        diff = np.abs(mlx_logits(out, ids) - ref_forward.next_token_logits(ref, ids)).max()
        assert diff < 1e-4
        assert abs(mlx_safesig.score(model, tokenizer, text) - ref_forward.score(ref, ids)) < 1e-4


@pytest.mark.parametrize("tie", [True, False])
def test_safety_parts_are_split_off_into_their_own_file(tmp_path, tie):
    src, out = converted(tmp_path, tie=tie, fmt="bin")
    ref = ref_forward.load_reference(src)
    parts = mx.load(str(out / "safety.safetensors"))
    assert np.array_equal(np.array(parts["cls_embed"]), ref.cls_embed.numpy())
    assert np.array_equal(np.array(parts["cls_head.weight"]), ref.head_weight.numpy())
    assert np.array_equal(np.array(parts["cls_head.bias"]), ref.head_bias.numpy())
    lm = mx.load(str(out / "model.safetensors"))
    assert lm["model.embed_tokens.weight"].shape == (VOCAB, HIDDEN)
    assert ("lm_head.weight" in lm) == (not tie)
    assert not any(k.startswith("cls_head") for k in lm)


def test_config_keeps_the_contract(tmp_path):
    _, out = converted(tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == 5e5  # lifted out of transformers-5 rope_parameters
    assert config["vocab_size"] == VOCAB
    assert config["tie_word_embeddings"] is True
    assert config["safesig"] == {
        "cls_token_id": VOCAB,
        "head_logits": 1,
        "threshold": 0.5,
        "tau": 3,
        "r1": 10,
        "r2": 10,
        "r3": 10,
        "refusal_prefix": "\nSorry, I can't fulfill your request because",
        "probe_position": 0,
    }


def test_safesig_block_in_the_source_config_is_carried_over(tmp_path):
    src = make_hf_folder(tmp_path / "hf")
    config = json.loads((src / "config.json").read_text())
    config["safesig"] = {"threshold": 0.7, "tau": 5, "refusal_prefix": "No."}
    (src / "config.json").write_text(json.dumps(config))
    out = convert(src, tmp_path / "mlx", progress=False)
    block = json.loads((out / "config.json").read_text())["safesig"]
    assert (block["threshold"], block["tau"], block["refusal_prefix"]) == (0.7, 5, "No.")


def test_tokenizer_keeps_the_cls_token(tmp_path):
    from transformers import AutoTokenizer

    _, out = converted(tmp_path)
    assert AutoTokenizer.from_pretrained(out).cls_token_id == VOCAB


@pytest.mark.parametrize("prefix", ["safety_head", "classifier", "score"])
def test_head_found_under_each_known_prefix(tmp_path, prefix):
    _, out = converted(tmp_path, head_prefix=prefix, head_logits=2)
    parts = mx.load(str(out / "safety.safetensors"))
    assert parts["cls_head.weight"].shape == (2, HIDDEN)
    assert json.loads((out / "config.json").read_text())["safesig"]["head_logits"] == 2


def test_head_key_names_an_unusual_head(tmp_path):
    _, out = converted(tmp_path, head_prefix="my_probe", head_key="my_probe")
    assert mx.load(str(out / "safety.safetensors"))["cls_head.weight"].shape == (1, HIDDEN)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_source_dtype_is_kept_without_dtype_option(tmp_path, dtype):
    src = make_hf_folder(tmp_path / "hf", fmt="bin", dtype=getattr(torch, dtype))
    out = convert(src, tmp_path / "mlx", progress=False)
    lm = mx.load(str(out / "model.safetensors"))
    assert lm["model.layers.0.mlp.up_proj.weight"].dtype == getattr(mx, dtype)
    assert mx.load(str(out / "safety.safetensors"))["cls_embed"].dtype == getattr(mx, dtype)


def test_bf16_bits_survive_the_bin_reader(tmp_path):
    src = make_hf_folder(tmp_path / "hf", fmt="bin", dtype=torch.bfloat16)
    out = convert(src, tmp_path / "mlx", progress=False)
    theirs = torch.load(src / "pytorch_model.bin", weights_only=True)["model.norm.weight"]
    ours = mx.load(str(out / "model.safetensors"))["model.norm.weight"]
    assert np.array_equal(
        np.array(ours.view(mx.uint16)), theirs.view(torch.int16).numpy().view(np.uint16)
    )


def test_dtype_option_casts_everything_float(tmp_path):
    _, out = converted(tmp_path, dtype="float16")
    assert mx.load(str(out / "model.safetensors"))["model.norm.weight"].dtype == mx.float16
    assert mx.load(str(out / "safety.safetensors"))["cls_head.weight"].dtype == mx.float16


@pytest.mark.parametrize("bits", [4, 8])
def test_quantization_spares_head_cls_row_and_norms(tmp_path, bits):
    _, out = converted(tmp_path, quantize=True, q_bits=bits)
    lm = mx.load(str(out / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.scales" in lm
    assert "model.norm.scales" not in lm and lm["model.norm.weight"].dtype == mx.float32
    assert {k: v.dtype for k, v in mx.load(str(out / "safety.safetensors")).items()} == {
        "cls_embed": mx.float32,
        "cls_head.weight": mx.float32,
        "cls_head.bias": mx.float32,
    }
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": bits, "mode": "affine"}
    mlx_safesig.load(str(out))  # the runtime takes it


def test_plain_model_loads_with_plain_mlx_lm(tmp_path):
    from mlx_lm import load

    _, out = converted(tmp_path, fmt="sharded-safetensors")
    model, tokenizer = load(str(out))
    assert model(mx.array([tokenizer.encode("the cat")])).shape[-1] == VOCAB


def test_add_safety_gives_a_plain_hf_model_fresh_parts(tmp_path):
    from transformers import AutoTokenizer

    src, out = converted(tmp_path, safety=False, add_safety=True)
    parts = mx.load(str(out / "safety.safetensors"))
    embed = mx.load(str(out / "model.safetensors"))["model.embed_tokens.weight"]
    assert np.allclose(np.array(parts["cls_embed"]), np.array(embed.mean(axis=0)), atol=1e-6)
    assert parts["cls_head.weight"].shape == (1, HIDDEN)
    assert not np.array(parts["cls_head.bias"]).any()
    assert AutoTokenizer.from_pretrained(out).cls_token_id == VOCAB
    model, tokenizer = mlx_safesig.load(str(out))
    assert 0.0 < mlx_safesig.score(model, tokenizer, "the cat") < 1.0


def test_add_safety_works_on_an_mlx_lm_folder(tmp_path):
    _, plain = converted(tmp_path, safety=False)
    out = convert(plain, tmp_path / "safe", add_safety=True, progress=False)
    assert (out / "safety.safetensors").is_file()
    mlx_safesig.load(str(out))


def test_a_converted_folder_converts_again(tmp_path):
    _, first = converted(tmp_path)
    second = convert(first, tmp_path / "q", quantize=True, progress=False)
    before = mx.load(str(first / "safety.safetensors"))
    after = mx.load(str(second / "safety.safetensors"))
    assert all(np.array_equal(np.array(before[k]), np.array(after[k])) for k in before)
    assert json.loads((second / "config.json").read_text())["safesig"]["cls_token_id"] == VOCAB


def test_a_head_from_add_safety_is_marked_untrained_and_says_so_when_loaded(tmp_path, capsys):
    _, out = converted(tmp_path, safety=False, add_safety=True)
    assert json.loads((out / "config.json").read_text())["safesig"]["untrained_head"] is True
    model, _ = mlx_safesig.load(str(out))
    assert "untrained_head" not in model.args.safesig  # a marker, not a decoding setting
    assert capsys.readouterr().err == (
        f"warning: the safety head of {out} is untrained (random): its verdicts mean nothing "
        "until it is trained with `mlx-safesig train`.\n")


def test_a_trained_head_is_not_marked(tmp_path, capsys):
    _, out = converted(tmp_path)
    assert "untrained_head" not in json.loads((out / "config.json").read_text())["safesig"]
    mlx_safesig.load(str(out))
    assert capsys.readouterr().err == ""
