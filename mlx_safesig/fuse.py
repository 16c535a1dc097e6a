"""Fusing trained adapters into a standalone safety model directory (``mlx-safesig fuse``).

base + ``adapters.safetensors`` (LoRA, merged into the weights) + ``safety_adapter.safetensors``
(the ``[CLS]`` row and head) -> the directory layout ``convert`` writes: mlx-lm files, the safety
parts in ``safety.safetensors``, a ``safesig`` block in ``config.json``. With ``q_bits`` the language
model's matrices are quantized; the head and the ``[CLS]`` row stay float (they live in their own
file and are never quantized).
"""

import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import save_config

from .adapters import SAFETY_KEYS
from .convert.quantize import GROUP_SIZE
from .convert.writer import atomic_directory
from .model import SafesigError
from .model_dir import SAFETY_FILE, load_model_dir, resolve_model_path


def fuse(model_path, adapter_path, save_path, q_bits: Optional[int] = None) -> Path:
    """Write base ``model_path`` + adapters at ``adapter_path`` as a model directory at
    ``save_path`` (which must not exist; written atomically). The base may be a plain mlx-lm
    model: the adapters carry the ``[CLS]`` row and head. Returns ``save_path``."""
    save_path = Path(save_path)
    if save_path.exists():
        raise SafesigError(f"{save_path} already exists; remove it or pick another --save-path.")
    base = resolve_model_path(str(model_path))
    model, tokenizer = load_model_dir(base, adapter_path=adapter_path, lazy=True)
    fused = [(name, m.fuse()) for name, m in model.named_modules() if hasattr(m, "fuse")]
    model.update_modules(tree_unflatten(fused))
    config = json.loads((base / "config.json").read_text())
    config["safesig"] = dict(model.args.safesig)
    if q_bits:
        if "quantization" in config:
            raise SafesigError(f"{model_path} is already quantized; fuse it without -q.")
        nn.quantize(
            model, group_size=GROUP_SIZE, bits=q_bits,
            class_predicate=lambda p, m: p != "cls_head" and hasattr(m, "to_quantized")
            and m.weight.shape[-1] % GROUP_SIZE == 0,
        )
        config["quantization"] = {"group_size": GROUP_SIZE, "bits": q_bits, "mode": "affine"}
    weights = dict(tree_flatten(model.parameters()))
    safety = {k: weights.pop(k) for k in SAFETY_KEYS}
    with atomic_directory(save_path) as folder:
        mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
        mx.save_safetensors(str(folder / SAFETY_FILE), safety, metadata={"format": "mlx"})
        save_config(config, folder / "config.json")
        tokenizer.save_pretrained(str(folder))
    return save_path

