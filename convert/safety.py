"""The method's safety parts in a checkpoint: the `[CLS]` embedding row and the binary head.

In a trained PyTorch checkpoint the `[CLS]` row is the last row of the grown input embedding
(id = old vocab size) and the head sits at the top level under one of `HEAD_PREFIXES`. In the MLX
folder both live in `safety.safetensors` (`cls_embed` [hidden], `cls_head.weight` [1 or 2,
hidden], `cls_head.bias` [1 or 2]) so plain `mlx_lm.load` never sees them.
"""

from dataclasses import dataclass

import mlx.core as mx

from mlx_safesig.model import SAFESIG_DEFAULTS
from mlx_safesig.model_dir import SAFETY_FILE, UNTRAINED_HEAD  # noqa: F401  (for the pipeline)

from .errors import ConvertError

HEAD_PREFIXES = ("cls_head", "safety_head", "classifier", "score")
EMBED = "model.embed_tokens.weight"
DEFAULT_SETTINGS = {k: v for k, v in SAFESIG_DEFAULTS.items() if k != "cls_token_id"}


@dataclass(frozen=True)
class Head:
    """Where the head lives in the source: its tensor names and logit count."""

    weight: str
    bias: str | None
    logits: int


def find_head(shapes: dict[str, tuple], hidden: int, head_key: str | None) -> Head | None:
    """The head in a checkpoint whose tensor shapes are `shapes`, or None if it has none.

    `head_key` (a prefix like `my_head`, or its `.weight` name) overrides the usual prefixes.
    The weight must be [1 or 2, hidden] and the bias, if present, [1 or 2].
    """
    if head_key is not None:
        prefix = head_key.removesuffix(".weight")
        if f"{prefix}.weight" not in shapes:
            raise ConvertError(f"--head-key: no tensor {prefix}.weight in the checkpoint.")
        prefixes = [prefix]
    else:
        prefixes = [p for p in HEAD_PREFIXES if f"{p}.weight" in shapes]
        if len(prefixes) > 1:
            raise ConvertError(
                f"checkpoint: several heads ({', '.join(prefixes)}); pick one with --head-key."
            )
        if not prefixes:
            return None
    weight, bias = f"{prefixes[0]}.weight", f"{prefixes[0]}.bias"
    shape = tuple(shapes[weight])
    if len(shape) != 2 or shape[0] not in (1, 2) or shape[1] != hidden:
        raise ConvertError(
            f"checkpoint: head {weight} has shape {list(shape)}, expected [1 or 2, {hidden}]."
        )
    if bias in shapes and tuple(shapes[bias]) != (shape[0],):
        raise ConvertError(
            f"checkpoint: head {bias} has shape {list(shapes[bias])}, expected [{shape[0]}]."
        )
    return Head(weight, bias if bias in shapes else None, shape[0])


def settings(config: dict, cls_token_id: int, head_logits: int) -> dict:
    """The `safesig` config block: defaults, then the source's own `safesig` values."""
    block = {"cls_token_id": cls_token_id, **DEFAULT_SETTINGS, "head_logits": head_logits}
    source = config.get("safesig") or {}
    if "cls_token_id" in source and source["cls_token_id"] != cls_token_id:
        raise ConvertError(
            f"config.json: safesig.cls_token_id {source['cls_token_id']} does not match the "
            f"[CLS] row {cls_token_id}."
        )
    block.update({k: v for k, v in source.items() if k not in ("cls_token_id", "head_logits")})
    return block


def fresh_parts(embed: mx.array) -> dict[str, mx.array]:
    """New safety parts for a plain model with input embedding `embed` [vocab, hidden]: the
    runtime's own initialisation (mean row, small random 1-logit head, zero bias), stored in the
    embedding's float dtype."""
    from mlx_safesig.model import fresh_safety_parts

    dtype = embed.dtype if mx.issubdtype(embed.dtype, mx.floating) else mx.float32
    return {k: v.astype(dtype) for k, v in fresh_safety_parts(embed).items()}
