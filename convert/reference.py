"""A small PyTorch reference forward of the method, used by `convert --verify` and the tests.

It reads the Hugging Face folder with torch and transformers (never with the converter's own
readers, so it checks them) and applies the method's [CLS] rules itself:

    sequence  = [CLS] at position 0, then the text's tokens at positions 1..n
    attention = [CLS] attends to every token and itself; nobody attends to [CLS];
                text tokens attend causally among themselves
    score     = sigmoid(head(final-norm hidden state of [CLS]))   (1 logit)
              = softmax(head(...))[1]                             (2 logits: class 1 = malicious)

torch is imported inside the functions: importing this module never needs it.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import ConvertError
from .safety import EMBED, HEAD_PREFIXES

INSTALL_HINT = "--verify needs PyTorch and transformers: pip install torch transformers"


@dataclass
class Reference:
    """A transformers language model plus the safety parts, all fp32 torch tensors."""

    model: object
    cls_embed: object | None
    head_weight: object | None
    head_bias: object | None


def _torch():
    try:
        import torch
    except ImportError:
        raise ConvertError(INSTALL_HINT + ".") from None
    return torch


def read_state_dict(folder: Path) -> dict:
    """All tensors of an HF folder (safetensors or .bin, single or sharded) via torch."""
    torch = _torch()
    from safetensors.torch import load_file

    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (folder / index).exists():
            files = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
        elif (folder / single).exists():
            files = [single]
        else:
            continue
        state = {}
        for f in files:
            if f.endswith(".safetensors"):
                state.update(load_file(folder / f))
            else:
                state.update(torch.load(folder / f, map_location="cpu", weights_only=True))
        return state
    raise ConvertError(f"{folder}: no weights for the reference.")


def load_reference(folder, head_key: str | None = None) -> Reference:
    """The reference model of the HF folder `folder` (with or without safety parts), fp32."""
    torch = _torch()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    state = {k: v.float() for k, v in read_state_dict(folder).items()}
    cls_id = AutoTokenizer.from_pretrained(folder).cls_token_id
    prefixes = [head_key] if head_key else [p for p in HEAD_PREFIXES if f"{p}.weight" in state]
    head_w = head_b = cls_embed = None
    if prefixes:
        head_w = state.pop(f"{prefixes[0]}.weight")
        head_b = state.pop(f"{prefixes[0]}.bias", torch.zeros(head_w.shape[0]))
        cls_embed = state[EMBED][cls_id]
        vocab = cls_id
        state[EMBED] = state[EMBED][:vocab]
        if "lm_head.weight" in state:
            state["lm_head.weight"] = state["lm_head.weight"][:vocab]
    config = AutoConfig.from_pretrained(folder)
    if prefixes:
        config.vocab_size = vocab
    model = AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation="eager"
    )
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or [k for k in unexpected if "rotary_emb" not in k]:
        raise ConvertError(f"{folder}: reference cannot load ({missing or unexpected}).")
    model.tie_weights()
    return Reference(model.eval(), cls_embed, head_w, head_b)


def next_token_logits(ref: Reference, ids: list[int]):
    """Logits [len(ids), vocab] of a plain causal forward over `ids` (fp32 numpy)."""
    torch = _torch()
    with torch.no_grad():
        return ref.model(torch.tensor([ids])).logits[0].numpy()


def score(ref: Reference, ids: list[int]) -> float:
    """P(malicious) for the text tokens `ids` with [CLS] at position 0 (see module docstring)."""
    torch = _torch()
    if ref.cls_embed is None:
        raise ConvertError("reference: the model has no safety parts to score with.")
    n = len(ids) + 1
    with torch.no_grad():
        text = ref.model.get_input_embeddings()(torch.tensor([ids]))
        embeds = torch.cat([ref.cls_embed[None, None], text], dim=1)
        allowed = torch.tril(torch.ones(n, n, dtype=torch.bool))
        allowed[0, :] = True  # [CLS] sees everything
        allowed[1:, 0] = False  # nobody sees [CLS]
        mask = torch.zeros(n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)
        out = ref.model.model(
            inputs_embeds=embeds,
            attention_mask=mask[None, None],
            position_ids=torch.arange(n)[None],
        )
        logits = out.last_hidden_state[0, 0] @ ref.head_weight.T + ref.head_bias
    if logits.shape[0] == 1:
        return torch.sigmoid(logits[0]).item()
    return torch.softmax(logits, dim=0)[1].item()


def verify_conversion(source: Path, mlx_path: Path, report, texts=None) -> dict[str, float]:
    """Compare the converted folder with the PyTorch reference of `source` on a few texts and
    report the max differences: next-token logits through plain `mlx_lm.load`, and `score()`
    when the runtime provides it and the model has safety parts."""
    import numpy as np
    from mlx_lm import load

    _torch()
    if source.suffix == ".gguf":
        raise ConvertError(f"{source}: --verify needs a Hugging Face folder as the source.")
    texts = texts or ["The capital of France is", "How do I bake bread?\nStep 1:"]
    ref = load_reference(source)
    model, tokenizer = load(str(mlx_path))
    diffs = {"logits": 0.0}
    import mlx.core as mx

    for text in texts:
        ids = tokenizer.encode(text)
        ours = np.array(model(mx.array([ids]))[0].astype(mx.float32))
        diffs["logits"] = max(
            diffs["logits"], float(np.abs(ours - next_token_logits(ref, ids)).max())
        )
    if ref.cls_embed is not None:
        from mlx_safesig.generate import score as score_safe
        from mlx_safesig.model_dir import load_model_dir

        safe_model, safe_tok = load_model_dir(Path(mlx_path))
        diffs["score"] = max(
            abs(score_safe(safe_model, safe_tok, t) - score(ref, safe_tok.encode(t)))
            for t in texts
        )
    report("verify: " + ", ".join(f"max |{k} diff| = {v:.2e}" for k, v in diffs.items()))
    return diffs
