"""Loading a safety model directory (mlx-lm layout + ``safety.safetensors`` + a ``safesig`` block).

The language model loads through mlx-lm's own ``load_model`` (weights, quantization, sanitize) with
our model class; the ``[CLS]`` row and head come from ``safety.safetensors``, a file plain
``mlx_lm.load`` never reads.
"""

import json
import sys
from pathlib import Path
from typing import Optional, Tuple

import mlx.core as mx
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_model, load_tokenizer

from .model import Model, ModelArgs, SafesigError, fresh_safety_parts

SAFETY_FILE = "safety.safetensors"
SAFETY_TENSORS = {"cls_embed", "cls_head.weight", "cls_head.bias"}
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


def resolve_model_path(path_or_repo: str, revision: Optional[str] = None) -> Path:
    """A local directory as is; otherwise a Hugging Face repo id fetched with huggingface_hub."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise SafesigError(f"{path} is not a model directory (no config.json in it).")
        return path
    if path_or_repo.count("/") != 1 or path_or_repo.startswith((".", "/", "~")):
        raise SafesigError(f"{path_or_repo} does not exist.")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(path_or_repo, revision=revision, allow_patterns=HUB_PATTERNS)
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one sentence
        raise SafesigError(
            f"could not fetch {path_or_repo} from the Hugging Face hub ({type(e).__name__})."
        ) from e
    return resolve_model_path(local)


def _stderr(message: str):
    print(message, file=sys.stderr, flush=True)


def _model_classes(config: dict):
    return Model, ModelArgs


def load(
    path_or_repo: Optional[str] = None,
    *,
    add_safety: bool = False,
    adapter_path: Optional[str] = None,
    lazy: bool = False,
    revision: Optional[str] = None,
) -> Tuple[Model, TokenizerWrapper]:
    """Load a safety model and its tokenizer.

    ``path_or_repo``: a directory written by ``mlx-safesig convert`` / ``fuse``, a hub repo id, or
    None for the embedded default model (``DEFAULT_MODEL``, assembled and cached on first use).
    ``add_safety``: accept a plain mlx-lm directory and give it a fresh ``[CLS]`` row (mean of the
    embedding rows) and a random head -- a model to train or benchmark, not a safe one.
    ``adapter_path``: a directory written by ``mlx-safesig train`` (LoRA, ``[CLS]`` row and head),
    applied on top; the base may then be a plain mlx-lm directory.
    ``lazy``: leave the weights unevaluated (and the projections unfused: ``Model.fuse_projections``).
    """
    add_safety = add_safety or adapter_path is not None
    if path_or_repo is None:
        from .default_model import default_model_path

        path_or_repo = default_model_path(progress=_stderr)
    path = resolve_model_path(str(path_or_repo), revision)
    config = json.loads((path / "config.json").read_text())
    safety_file = path / SAFETY_FILE
    extra = {}
    if safety_file.is_file():
        missing = SAFETY_TENSORS - set(mx.load(str(safety_file)))
        if missing:
            raise SafesigError(f"{safety_file} lacks {', '.join(sorted(missing))}.")
        extra["safety_weights_file"] = str(safety_file)
    elif not add_safety:
        raise SafesigError(
            f"{path} has no safety parts ({SAFETY_FILE}); add them with "
            f"`mlx-safesig convert --hf-path {path} --mlx-path OUT --add-safety`."
        )
    ModelArgs.from_dict(config)  # unknown model_type -> one clear sentence
    try:
        model, config = load_model(
            path, lazy=True, strict=not add_safety or safety_file.is_file(),
            model_config=extra, get_model_classes=_model_classes,
        )
    except (ValueError, FileNotFoundError) as e:
        raise SafesigError(f"could not load {path}: {' '.join(str(e).split())}") from e
    if add_safety and not safety_file.is_file():
        embed = model.model.embed_tokens
        weight = embed.weight if not hasattr(embed, "scales") else mx.dequantize(
            embed.weight, embed.scales, embed.biases, embed.group_size, embed.bits
        )
        model.load_weights(list(fresh_safety_parts(weight).items()), strict=False)
    if adapter_path is not None:
        from .train import load_adapters  # the trainer pulls in mlx-lm's tuner: only when needed

        load_adapters(model, adapter_path)
    if not lazy:
        mx.eval(model.parameters())
        model.fuse_projections()
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    return model, tokenizer
