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

import click
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import save_config

from .convert.quantize import GROUP_SIZE
from .convert.writer import atomic_directory
from .loading import SAFETY_FILE, load, resolve_model_path
from .model import SafesigError
from .train import SAFETY_KEYS, load_adapters


def fuse(model_path, adapter_path, save_path, q_bits: Optional[int] = None) -> Path:
    """Write base ``model_path`` + adapters at ``adapter_path`` as a model directory at
    ``save_path`` (which must not exist; written atomically). The base may be a plain mlx-lm
    model: the adapters carry the ``[CLS]`` row and head. Returns ``save_path``."""
    save_path = Path(save_path)
    if save_path.exists():
        raise SafesigError(f"{save_path} already exists; remove it or pick another --save-path.")
    model, tokenizer = load(model_path, add_safety=True)
    load_adapters(model, adapter_path)
    fused = [(name, m.fuse()) for name, m in model.named_modules() if hasattr(m, "fuse")]
    model.update_modules(tree_unflatten(fused))
    config = json.loads((resolve_model_path(str(model_path)) / "config.json").read_text())
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


@click.command("fuse")
@click.option("--model", "model_path", required=True,
              help="The base model the adapters were trained on.")
@click.option("--adapter-path", default="adapters", show_default=True, type=click.Path(),
              help="Adapter directory written by `mlx-safesig train`.")
@click.option("--save-path", default="fused_model", show_default=True, type=click.Path(),
              help="Output model directory (must not exist).")
@click.option("-q", "--quantize", is_flag=True,
              help="Quantize the language model's matrices (the head and [CLS] row stay float).")
@click.option("--q-bits", type=click.Choice(["4", "8"]), default="4", show_default=True,
              help="Bits per weight with -q (group size 64).")
def fuse_command(model_path, adapter_path, save_path, quantize, q_bits):
    """Merge trained adapters into a standalone safety model directory."""
    try:
        fuse(model_path, adapter_path, save_path, int(q_bits) if quantize else None)
    except (SafesigError, ValueError) as e:
        raise click.ClickException(str(e).splitlines()[0]) from None
    except OSError as e:
        raise click.ClickException(f"{e.filename or save_path}: {e.strerror or e}.") from None
    click.echo(f"wrote {save_path}", err=True)
