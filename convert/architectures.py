"""The model families the converter supports, as a table of what each one does differently.

Everything else (reading, the safety parts, dtype, quantization, writing) is one shared pipeline.
"""

import importlib
from dataclasses import dataclass

from mlx.utils import tree_flatten

from .errors import ConvertError


@dataclass(frozen=True)
class Architecture:
    """What one family does differently from the shared pipeline.

    `gguf_name` is llama.cpp's `general.architecture`; `gguf_permutes_qk` says whether llama.cpp
    permuted the q/k projection rows for its rope layout; `tie_default` is the Hugging Face config
    class default for `tie_word_embeddings` (mlx-lm's defaults differ, so it is always written out);
    `hf_class` is the transformers model class; `mlx_module` the mlx-lm module of the language
    model.
    """

    model_type: str
    hf_class: str
    mlx_module: str
    tie_default: bool
    gguf_name: str | None = None
    gguf_permutes_qk: bool = False


ARCHITECTURES = {
    a.model_type: a
    for a in (
        Architecture(
            "llama", "LlamaForCausalLM", "llama", False, gguf_name="llama", gguf_permutes_qk=True
        ),
        Architecture("mistral", "MistralForCausalLM", "llama", False),
        Architecture("qwen2", "Qwen2ForCausalLM", "qwen2", False, gguf_name="qwen2"),
        Architecture("qwen3", "Qwen3ForCausalLM", "qwen3", False, gguf_name="qwen3"),
    )
}


def supported_names() -> str:
    """The supported `model_type`s as one comma-separated string, for error messages."""
    return ", ".join(sorted(ARCHITECTURES))


def architecture_for(model_type: str | None, where: str) -> Architecture:
    """The table entry for `model_type`, or a ConvertError naming `where` and the supported ones."""
    if model_type not in ARCHITECTURES:
        raise ConvertError(
            f"{where}: model_type {model_type!r} is not supported (supported: {supported_names()})."
        )
    return ARCHITECTURES[model_type]


def architecture_for_gguf(gguf_name: str | None, where: str) -> Architecture:
    """The table entry whose llama.cpp architecture name is `gguf_name`."""
    for arch in ARCHITECTURES.values():
        if arch.gguf_name is not None and arch.gguf_name == gguf_name:
            return arch
    names = ", ".join(sorted(a.gguf_name for a in ARCHITECTURES.values() if a.gguf_name))
    raise ConvertError(
        f"{where}: GGUF architecture {gguf_name!r} is not supported (supported: {names})."
    )


def mlx_config(config: dict, arch: Architecture) -> dict:
    """`config` rewritten so mlx-lm 0.32 reads it as transformers does.

    transformers 5 nests `rope_theta` (and any scaling) in `rope_parameters`; mlx-lm reads only a
    top-level `rope_theta` and silently falls back to 10000, so both are lifted to the top level.
    `tie_word_embeddings` is written explicitly because mlx-lm's defaults differ from HF's.
    """
    out = {k: v for k, v in config.items() if k not in ("quantization_config", "quantization")}
    rope = dict(out.get("rope_parameters") or {})
    if "rope_theta" in rope:
        out.setdefault("rope_theta", rope.pop("rope_theta"))
    if rope.get("rope_type", "default") != "default" and not out.get("rope_scaling"):
        out["rope_scaling"] = rope
    out["tie_word_embeddings"] = bool(out.get("tie_word_embeddings", arch.tie_default))
    return out


def expected_shapes(config: dict, arch: Architecture) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the plain language model mlx-lm builds from `config`.

    The model is built lazily (MLX arrays are not evaluated), so this costs no weight memory.
    """
    module = importlib.import_module(f"mlx_lm.models.{arch.mlx_module}")
    try:
        model = module.Model(module.ModelArgs.from_dict(config))
    except (TypeError, KeyError, ValueError, AssertionError) as e:
        raise ConvertError(f"config.json: cannot build a {arch.model_type} model ({e}).") from e
    return {name: tuple(p.shape) for name, p in tree_flatten(model.parameters())}
