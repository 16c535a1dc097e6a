"""Builders shared by the converter tests (no tests here): tiny random HF models with the
method's safety parts, saved in each checkpoint format."""

import json
from pathlib import Path

import numpy as np
import torch  # noqa: E402  (test dependency)

VOCAB = 300
HIDDEN = 64
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
FORMATS = ("safetensors", "sharded-safetensors", "bin", "sharded-bin")
TEXTS = ["the cat sat on the mat", "how do I make a cake? 123", "  spaced\tout\ntext"]
CORPUS = ["the cat sat on the mat and the dog ate a cake"] * 20 + [
    "how do I make a bomb? how do I bake bread? 0123456789"
] * 20


def tiny_tokenizer():
    """A byte-level BPE tokenizer with exactly VOCAB tokens (ids 0..VOCAB-1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False,
    )
    tk.train_from_iterator(CORPUS, trainer)
    assert tk.get_vocab_size() == VOCAB, tk.get_vocab_size()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )


def tiny_config(family: str, tie: bool, hidden: int = HIDDEN, intermediate: int = 128):
    """A 2-layer transformers config of `family` (hidden 64, 4 heads / 2 kv heads)."""
    from transformers import AutoConfig

    kwargs = dict(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family == "qwen3":
        kwargs["head_dim"] = 16
    config = AutoConfig.for_model(family, **kwargs)
    # not the mlx-lm fallback 10000: a nested theta that is dropped would show in the logits
    rope = dict(getattr(config, "rope_parameters", None) or {"rope_type": "default"})
    rope["rope_theta"] = 5e5
    config.rope_parameters = rope
    return config


def tiny_model(family: str, tie: bool, seed: int = 0, **sizes):
    """A random fp32 model of `family` with outputs scaled up so logit differences show;
    `sizes` (hidden, intermediate) go to `tiny_config`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, tie, **sizes)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    return model.eval()


def safety_state_dict(model, head_logits: int = 1, head_prefix: str = "cls_head", seed: int = 1):
    """The model's state dict with the safety parts: the embedding grown by one ([CLS]) row and
    top-level head tensors. A tied lm_head keeps sharing the grown embedding's storage, as in a
    real `torch.save(model.state_dict())` after `resize_token_embeddings`."""
    g = torch.Generator().manual_seed(seed)
    emb = model.get_input_embeddings().weight.detach()
    grown = torch.cat([emb, torch.randn(1, emb.shape[1], generator=g)])
    state = dict(model.state_dict())
    state["model.embed_tokens.weight"] = grown
    if model.config.tie_word_embeddings:
        state["lm_head.weight"] = grown
    state[f"{head_prefix}.weight"] = 0.1 * torch.randn(head_logits, HIDDEN, generator=g)
    state[f"{head_prefix}.bias"] = 0.1 * torch.randn(head_logits, generator=g)
    return state


def save_checkpoint(state: dict, folder: Path, fmt: str, dtype=None) -> None:
    """Write `state` into `folder` as `fmt` (one of FORMATS), sharded into ~4 pieces."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    names = list(state)
    shards = [names] if not fmt.startswith("sharded") else [names[i::4] for i in range(4)]
    ext = "safetensors" if fmt.endswith("safetensors") else "bin"
    base = "model" if ext == "safetensors" else "pytorch_model"
    weight_map = {}
    for i, keys in enumerate(shards):
        file = (
            f"{base}.{ext}"
            if len(shards) == 1
            else f"{base}-{i + 1:05d}-of-{len(shards):05d}.{ext}"
        )
        part = {k: state[k] for k in keys}
        if ext == "safetensors":
            seen = {}
            part = {k: v for k, v in part.items() if seen.setdefault(v.data_ptr(), k) == k}
            save_file({k: v.contiguous() for k, v in part.items()}, folder / file, {"format": "pt"})
        else:
            torch.save(part, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    if len(shards) > 1:
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / f"{base}.{ext}.index.json").write_text(json.dumps(index))


def make_hf_folder(
    folder: Path,
    family="llama",
    fmt="safetensors",
    tie=True,
    head_logits=1,
    head_prefix="cls_head",
    safety=True,
    dtype=None,
) -> Path:
    """A complete HF folder (config, tokenizer with [CLS], weights in `fmt`)."""
    model = tiny_model(family, tie)
    tokenizer = tiny_tokenizer()
    if safety:
        tokenizer.add_special_tokens({"cls_token": "[CLS]"})
        assert tokenizer.cls_token_id == VOCAB
        state = safety_state_dict(model, head_logits, head_prefix)
    else:
        state = dict(model.state_dict())
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    save_checkpoint(state, folder, fmt, dtype)
    return folder


def leftovers(path: Path) -> list[str]:
    """Anything beside `path` in its parent that a failed conversion could have left."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}"))


def mlx_logits(folder: Path, ids: list[int]) -> np.ndarray:
    """Next-token logits [len(ids), vocab] through plain `mlx_lm.load`."""
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(folder))
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))
