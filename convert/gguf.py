"""GGUF (llama.cpp) files as a conversion source: weights, hyperparameters and tokenizer.

`mx.load` reads F32/F16 and Q4_0/Q4_1/Q8_0 tensors, the quantized ones straight into MLX affine
form (group 32), plus the metadata. A file it refuses (llama.cpp's k-quants: Q4_K_M, Q6_K, ...)
is read with the `gguf` package instead and dequantized to float32 (`dequant`). Two things
llama.cpp changed are undone here: its tensor names, and the q/k row permutation its llama
converter applies for its rope layout (`LlamaModel.permute` in llama.cpp's convert_hf_to_gguf.py).
"""

import json
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from .architectures import Architecture, architecture_for_gguf
from .dequant import Deferred, read_with_gguf
from .errors import ConvertError
from .quantize import Quantized

LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# HF config key -> GGUF key (after the "<arch>." prefix)
HPARAMS = {
    "hidden_size": "embedding_length",
    "num_hidden_layers": "block_count",
    "intermediate_size": "feed_forward_length",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_theta": "rope.freq_base",
    "max_position_embeddings": "context_length",
    "head_dim": "attention.key_length",
}
REQUIRED_HPARAMS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads")

# llama.cpp's `tokenizer.ggml.pre` -> the split applied before byte-level BPE. Those not listed
# use GPT-2's split (as transformers does); llama.cpp's SmolLM/StarCoder family first isolates
# every digit, as their original tokenizer.json does.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx"), LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), QWEN2_SPLIT),
}
DIGIT_SPLIT = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


def read_gguf(path: Path) -> tuple[dict, dict[str, "mx.array | Deferred"]]:
    """(metadata with plain Python values, raw tensors) of the GGUF file at `path`: MLX arrays
    if MLX reads the file, else `Deferred` float32 tensors dequantized by the gguf package."""
    try:
        tensors, metadata = mx.load(str(path), return_metadata=True)
    except Exception as e:  # mlx raises RuntimeError/ValueError with its own wording
        mlx_error = e
    else:
        return {k: _plain(v) for k, v in metadata.items()}, tensors
    return read_with_gguf(path, mlx_error)


def _plain(value):
    if not isinstance(value, mx.array):
        return value
    if value.ndim > 0:
        return value.tolist()
    if value.dtype == mx.float32:  # 1e-05, not 9.999999747378752e-06
        return float(str(np.float32(value.item())))
    return value.item()


def gguf_architecture(metadata: dict, path: Path) -> Architecture:
    """The table entry for the file's `general.architecture`."""
    return architecture_for_gguf(metadata.get("general.architecture"), str(path))


def gguf_config(metadata: dict, tensor_names, arch: Architecture, path: Path) -> dict:
    """An HF-style config.json for the model the GGUF metadata describes."""
    prefix = arch.gguf_name
    config = {"model_type": arch.model_type, "architectures": [arch.hf_class]}
    for hf_key, gguf_key in HPARAMS.items():
        if f"{prefix}.{gguf_key}" in metadata:
            config[hf_key] = metadata[f"{prefix}.{gguf_key}"]
    missing = [k for k in REQUIRED_HPARAMS if k not in config]
    if missing:
        raise ConvertError(f"{path}: metadata lacks {prefix}.{HPARAMS[missing[0]]}.")
    if "rope_freqs.weight" in tensor_names:
        raise ConvertError(f"{path}: rope frequency scaling (rope_freqs) is not supported.")
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    config.setdefault("max_position_embeddings", 4096)
    config["vocab_size"] = len(metadata.get("tokenizer.ggml.tokens") or []) or metadata.get(
        f"{prefix}.vocab_size"
    )
    config["tie_word_embeddings"] = "output.weight" not in tensor_names
    config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    config["mlp_bias"] = False
    for name in ("bos", "eos", "padding"):
        if f"tokenizer.ggml.{name}_token_id" in metadata:
            key = "pad_token_id" if name == "padding" else f"{name}_token_id"
            config[key] = metadata[f"tokenizer.ggml.{name}_token_id"]
    return config


def hf_name(gguf_name: str, path: Path) -> str:
    """The HF / mlx-lm name of a GGUF tensor (`blk.3.attn_q.weight` ->
    `model.layers.3.self_attn.q_proj.weight`)."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m and m[2] in LAYER_NAMES:
        return f"model.layers.{m[1]}.{LAYER_NAMES[m[2]]}.{m[3]}"
    m = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
    if m and m[1] in TOP_NAMES:
        return f"{TOP_NAMES[m[1]]}.{m[2]}"
    raise ConvertError(f"{path}: tensor {gguf_name!r} has no known Hugging Face name.")


def unpermute_index(rows: int, n_heads: int) -> mx.array:
    """Row order that undoes llama.cpp's q/k permutation of a [rows, ...] projection.

    llama.cpp stores row `h*d + 2*j + i` what HF stores at `h*d + i*d/2 + j` (d = rows / n_heads,
    i in {0, 1}, j < d/2): the two rotary halves interleaved. This index gathers them back.
    """
    d = rows // n_heads
    stored = mx.arange(rows).reshape(n_heads, d // 2, 2)
    return stored.transpose(0, 2, 1).reshape(rows)


def gguf_tensors(
    raw: dict[str, "mx.array | Deferred"],
    config: dict,
    arch: Architecture,
    path: Path,
    keep_quantized: bool,
) -> dict[str, "mx.array | Quantized | Deferred"]:
    """HF-named tensors: quantized ones as `Quantized` (if `keep_quantized`) or dequantized to
    fp32, `Deferred` ones left to be made, q/k rows restored to HF order for families llama.cpp
    permutes."""
    out = {}
    for name in raw:
        if name.endswith((".scales", ".biases")):
            continue
        base = name.removesuffix(".weight")
        if f"{base}.scales" in raw:
            w, s = raw[name], raw[f"{base}.scales"]
            bits = w.shape[-1] // s.shape[-1]
            t = Quantized(w, s, raw[f"{base}.biases"], 32, bits)
            t = t if keep_quantized else t.dequantize(mx.float32)
        elif isinstance(raw[name], Deferred):
            t = raw[name]
        else:
            t = raw[name].astype(mx.float32)
        key = hf_name(name, path)
        heads = _permuted_heads(key, config, arch)
        if heads:
            index = unpermute_index(t.shape[0], heads)
            t = t[index] if isinstance(t, mx.array) else t.take_rows(index)
        out[key] = t
    return out


def _permuted_heads(key: str, config: dict, arch: Architecture) -> int:
    if not arch.gguf_permutes_qk:
        return 0
    if key.endswith("self_attn.q_proj.weight"):
        return config["num_attention_heads"]
    if key.endswith("self_attn.k_proj.weight"):
        return config["num_key_value_heads"]
    return 0


def gguf_tokenizer_files(metadata: dict, path: Path) -> dict[str, str]:
    """`tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` (as text) rebuilt
    from the GGUF metadata: byte-level BPE with the file's merges, control tokens as special
    added tokens, the chat template, bos/eos/unk/pad."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConvertError(
            f"{path}: tokenizer.ggml.model {kind!r} is not supported (supported: gpt2)."
        )
    tokens = metadata["tokenizer.ggml.tokens"]
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ConvertError(f"{path}: tokenizer.ggml.token_type does not match the token list.")
    tokenizer = byte_level_bpe(tokens, metadata.get("tokenizer.ggml.merges") or [])
    tokenizer.pre_tokenizer = byte_level_split(metadata.get("tokenizer.ggml.pre"))
    tokenizer.add_special_tokens(
        [
            AddedToken(t, normalized=False, special=True)
            for t, k in zip(tokens, types, strict=True)
            if k == CONTROL
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(t, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k == USER_DEFINED
        ]
    )
    specials = {
        name: tokens[metadata[f"tokenizer.ggml.{key}"]]
        for name, key in (
            ("bos_token", "bos_token_id"),
            ("eos_token", "eos_token_id"),
            ("unk_token", "unknown_token_id"),
            ("pad_token", "padding_token_id"),
        )
        if f"tokenizer.ggml.{key}" in metadata
    }
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
    if add_bos and "bos_token" in specials:
        bos = specials["bos_token"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))]
        )
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": _context_length(metadata),
        **specials,
    }
    if "tokenizer.chat_template" in metadata:
        tokenizer_config["chat_template"] = metadata["tokenizer.chat_template"]
    return {
        "tokenizer.json": tokenizer.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2, ensure_ascii=False),
        "special_tokens_map.json": json.dumps(specials, indent=2, ensure_ascii=False),
    }


def _context_length(metadata: dict) -> int:
    arch = metadata.get("general.architecture")
    return int(metadata.get(f"{arch}.context_length", 4096))


def byte_level_bpe(tokens: list[str], merges: list[str]) -> Tokenizer:
    """A GPT-2 style byte-level BPE tokenizer over `tokens` (ids = positions) and `merges`
    ("a b" strings, best first). Tokens spelled outside the byte alphabet are re-spelled."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    spelling = _bytes_to_unicode()
    vocab = {}
    for i, t in enumerate(tokens):
        key = t if set(t) <= set(alphabet) else "".join(spelling[b] for b in t.encode("utf-8"))
        vocab.setdefault(key, i)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False)
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def byte_level_split(pre: str | None):
    """The pre-tokenizer for llama.cpp's pre-tokenizer name `pre`."""
    if pre in SPLITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in DIGIT_SPLIT:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable character table
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))
