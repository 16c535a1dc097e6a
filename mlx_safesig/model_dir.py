"""A safety model directory: the mlx-lm layout plus ``safety.safetensors`` and a ``safesig`` block.

The language model loads through mlx-lm's own ``load_model`` (weights, quantization, sanitize) with
our model class; the ``[CLS]`` row and head come from ``safety.safetensors``, a file plain
``mlx_lm.load`` never reads.
"""

import json
import sys
from pathlib import Path
from typing import Optional, Sequence, Tuple

import mlx.core as mx
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_model, load_tokenizer

from .model import Model, ModelArgs, SafesigError, fresh_safety_parts

SAFETY_FILE = "safety.safetensors"
SAFETY_TENSORS = {"cls_embed", "cls_head.weight", "cls_head.bias"}
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
# set by `convert --add-safety` in the safesig block; dropped once trained adapters are applied
UNTRAINED_HEAD = "untrained_head"


class NoSafetyParts(SafesigError):
    """A plain model directory where a safety model was expected."""

    def __init__(self, path: Path):
        self.path = path
        super().__init__(
            f"{path} has no safety parts ({SAFETY_FILE}); load it with add_safety=True to train "
            f"it (`mlx-safesig train --add-safety`) or pass the adapters trained for it."
        )


def is_hub_id(name: str) -> bool:
    """Whether ``name`` looks like a Hugging Face repo id (``owner/name``) rather than a path."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and all(
        name.split("/"))


def fetch_from_hub(repo_id: str, allow_patterns: Sequence[str] = HUB_PATTERNS,
                   revision: Optional[str] = None) -> Path:
    """The local snapshot of hub repo ``repo_id`` (downloaded with huggingface_hub, cached)."""
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(repo_id, revision=revision, allow_patterns=list(allow_patterns))
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one sentence
        raise SafesigError(
            f"could not fetch {repo_id} from the Hugging Face hub ({type(e).__name__})."
        ) from e
    return Path(local)


def resolve_model_path(path_or_repo: str, revision: Optional[str] = None) -> Path:
    """A local directory as is; otherwise a Hugging Face repo id fetched with huggingface_hub."""
    path = Path(path_or_repo).expanduser()
    if not path.exists():
        if not is_hub_id(path_or_repo):
            raise SafesigError(f"{path_or_repo} does not exist.")
        path = fetch_from_hub(path_or_repo, revision=revision)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise SafesigError(f"{path} is not a model directory (no config.json in it).")
    return path


def _model_classes(config: dict):
    return Model, ModelArgs


def load_model_dir(
    path: Path,
    *,
    add_safety: bool = False,
    adapter_path: Optional[str] = None,
    lazy: bool = False,
) -> Tuple[Model, TokenizerWrapper]:
    """Load the safety model directory ``path`` (see ``mlx_safesig.load`` for the options). A head
    that was never trained (fresh from ``add_safety`` or ``convert --add-safety``, no adapters
    given) says so on stderr: its verdicts are noise."""
    add_safety = add_safety or adapter_path is not None
    config = json.loads((path / "config.json").read_text())
    safety_file = path / SAFETY_FILE
    extra = {}
    if safety_file.is_file():
        missing = SAFETY_TENSORS - set(mx.load(str(safety_file)))
        if missing:
            raise SafesigError(f"{safety_file} lacks {', '.join(sorted(missing))}.")
        extra["safety_weights_file"] = str(safety_file)
    elif not add_safety:
        raise NoSafetyParts(path)
    ModelArgs.from_dict(config)  # unknown model_type -> one clear sentence
    try:
        model, config = load_model(
            path, lazy=True, strict=not add_safety or safety_file.is_file(),
            model_config=extra, get_model_classes=_model_classes,
        )
    except (ValueError, FileNotFoundError) as e:
        raise SafesigError(f"could not load {path}: {' '.join(str(e).split())}") from e
    untrained = bool(model.args.safesig.pop(UNTRAINED_HEAD, False))
    if add_safety and not safety_file.is_file():
        embed = model.model.embed_tokens
        weight = embed.weight if not hasattr(embed, "scales") else mx.dequantize(
            embed.weight, embed.scales, embed.biases, embed.group_size, embed.bits
        )
        model.load_weights(list(fresh_safety_parts(weight).items()), strict=False)
        untrained = True
    if adapter_path is not None:
        from .adapters import load_adapters  # mlx-lm's tuner: only when needed

        load_adapters(model, adapter_path)
    elif untrained:
        print(f"warning: the safety head of {path} is untrained (random): its verdicts mean "
              "nothing until it is trained with `mlx-safesig train`.", file=sys.stderr, flush=True)
    if not lazy:
        mx.eval(model.parameters())
        model.fuse_projections()
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    return model, tokenizer
