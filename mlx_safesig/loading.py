"""``load``: a safety model by path, hub repo id, or the embedded default model."""

import sys
from pathlib import Path
from typing import Optional, Tuple

from mlx_lm.tokenizer_utils import TokenizerWrapper

from .default_model import DEFAULT_MODEL, default_model_path
from .model import Model
from .model_dir import SAFETY_FILE, load_model_dir, resolve_model_path

__all__ = ["load", "resolve_model_path", "SAFETY_FILE"]  # the last two: where bench.py reads them


def _stderr(message: str):
    print(message, file=sys.stderr, flush=True)


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
    None / ``DEFAULT_MODEL`` for the embedded default model (assembled and cached on first use).
    ``add_safety``: accept a plain mlx-lm directory and give it a fresh ``[CLS]`` row (mean of the
    embedding rows) and a random head -- a model to train or benchmark, not a safe one.
    ``adapter_path``: a directory written by ``mlx-safesig train`` (LoRA, ``[CLS]`` row and head),
    applied on top; the base may then be a plain mlx-lm directory.
    ``lazy``: leave the weights unevaluated (and the projections unfused: ``Model.fuse_projections``).
    """
    if path_or_repo is None or (str(path_or_repo) == DEFAULT_MODEL
                                and not Path(DEFAULT_MODEL).exists()):
        path = default_model_path(progress=_stderr)
    else:
        path = resolve_model_path(str(path_or_repo), revision)
    return load_model_dir(path, add_safety=add_safety, adapter_path=adapter_path, lazy=lazy)
