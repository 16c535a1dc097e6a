"""Adapter directories written by ``mlx-safesig train``: LoRA weights in mlx-lm's name and
layout (``adapters.safetensors``), the ``[CLS]`` row and head (``safety_adapter.safetensors``) and
``adapter_config.json`` (mlx-lm's keys, the training settings and optional decoding defaults)."""

import json
import os
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from .decoding import MODEL_DEFAULTS
from .model import Model, SafesigError

ADAPTER_FILE = "adapters.safetensors"  # LoRA only: what mlx-lm's loader reads
SAFETY_ADAPTER_FILE = "safety_adapter.safetensors"  # cls_embed, cls_head.*
ADAPTER_CONFIG = "adapter_config.json"
SAFETY_KEYS = ("cls_embed", "cls_head.weight", "cls_head.bias")


def lora_parameters(config) -> dict:
    """mlx-lm's ``lora_parameters`` block from a ``TrainConfig``."""
    return {"rank": config.lora_rank, "scale": config.lora_scale, "dropout": config.lora_dropout}


def save_atomic(path: Path, arrays: dict):
    """``arrays`` as a safetensors file at ``path``, through a temporary file and a rename."""
    tmp = path.with_name(f".{path.stem}.tmp.safetensors")
    mx.save_safetensors(str(tmp), arrays)
    os.replace(tmp, path)


def save_adapters(model: Model, path: Path, config, num_layers: int, prefix: str = ""):
    """LoRA weights (``adapters.safetensors``, mlx-lm's name and layout), the safety parts
    (``safety_adapter.safetensors``) and ``adapter_config.json`` (mlx-lm's keys + ours)."""
    path.mkdir(parents=True, exist_ok=True)
    trained = dict(tree_flatten(model.trainable_parameters()))
    lora = {k: v for k, v in trained.items() if k not in SAFETY_KEYS}
    save_atomic(path / f"{prefix}{ADAPTER_FILE}", lora)
    save_atomic(path / f"{prefix}{SAFETY_ADAPTER_FILE}", {k: trained[k] for k in SAFETY_KEYS})
    adapter_config = {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": lora_parameters(config),
        "safesig_training": asdict(config),
    }
    decoding = {}  # how generation must check to match what the probes were trained on
    if config.min_window:
        decoding["min_window"] = config.min_window
    if config.window_query:
        decoding["window_query"] = True
    if decoding:
        adapter_config["safesig"] = decoding
    (path / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2))


# decoding defaults an adapter_config.json may carry in a "safesig" block (e.g. a window
# threshold chosen on dev data for that adapter); they become the model's defaults
DECODING_KEYS = set(MODEL_DEFAULTS)


def load_adapters(model: Model, adapter_path) -> Model:
    """Apply adapters written by ``train`` to a loaded safety model (in place): LoRA layers from
    ``adapters.safetensors``, the ``[CLS]`` row and head from ``safety_adapter.safetensors`` and
    the decoding defaults of ``adapter_config.json``'s optional ``safesig`` block."""
    path = Path(adapter_path)
    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file():
        raise SafesigError(f"{path}: no {ADAPTER_CONFIG}; is it an adapter directory from `train`?")
    for name in (ADAPTER_FILE, SAFETY_ADAPTER_FILE):
        if not (path / name).is_file():
            raise SafesigError(f"{path}: missing {name}.")
    config = json.loads(config_file.read_text())
    if config.get("fine_tune_type", "lora") != "lora":
        raise SafesigError(f"{config_file}: only LoRA adapters are supported.")
    if config["num_layers"] > len(model.layers):
        raise SafesigError(f"{path}: the adapters need {config['num_layers']} layers but the "
                           f"model has {len(model.layers)}.")
    decoding = config.get("safesig", {})
    unknown = set(decoding) - DECODING_KEYS
    if unknown:
        raise SafesigError(f"{config_file}: unknown safesig setting {sorted(unknown)[0]!r}.")
    linear_to_lora_layers(model, config["num_layers"], config["lora_parameters"])
    weights = {**mx.load(str(path / ADAPTER_FILE)), **mx.load(str(path / SAFETY_ADAPTER_FILE))}
    params = dict(tree_flatten(model.parameters()))
    for name, w in weights.items():
        if name not in params or params[name].shape != w.shape:
            raise SafesigError(f"{path}: tensor {name} does not fit this model.")
    model.load_weights(list(weights.items()), strict=False)
    model.args.safesig.update(decoding)  # decoding defaults chosen for this adapter
    mx.eval(model.parameters())
    return model
