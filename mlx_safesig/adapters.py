"""Adapter directories written by ``mlx-safesig train``: LoRA weights in mlx-lm's name and
layout (``adapters.safetensors``), the ``[CLS]`` row and head (``safety_adapter.safetensors``) and
``adapter_config.json`` (mlx-lm's keys, the training settings and optional decoding defaults)."""

import json
import os
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map_with_path
from mlx_lm.tuner.utils import linear_to_lora_layers

from .decoding import MODEL_DEFAULTS
from .model import Model, SafesigError

ADAPTER_FILE = "adapters.safetensors"  # LoRA or full blocks: what mlx-lm's loader reads
SAFETY_ADAPTER_FILE = "safety_adapter.safetensors"  # cls_embed, cls_head.*
ADAPTER_CONFIG = "adapter_config.json"
SAFETY_KEYS = ("cls_embed", "cls_head.weight", "cls_head.bias")
STATE_FILE = "training_state.safetensors"  # optimizer state, for --resume
STEP_KEY = "checkpoint_step"  # stored in STATE_FILE beside the optimizer state
STEP_FILE = "training_state.json"  # the step of the last checkpoint, readable without mlx


def lora_parameters(config) -> dict:
    """mlx-lm's ``lora_parameters`` block from a ``TrainConfig``."""
    return {"rank": config.lora_rank, "scale": config.lora_scale, "dropout": config.lora_dropout}


def save_atomic(path: Path, arrays: dict):
    """``arrays`` as a safetensors file at ``path``, through a temporary file and a rename."""
    tmp = path.with_name(f".{path.stem}.tmp.safetensors")
    mx.save_safetensors(str(tmp), arrays)
    os.replace(tmp, path)


FINE_TUNE_TYPES = ("lora", "full")


def add_lora(model: Model, num_layers: int, parameters: dict, fine_tune_type: str = "lora") -> int:
    """LoRA on the last ``num_layers`` blocks (-1: all; 0: none, so only the ``[CLS]`` row and
    head train: mlx-lm's ``layers[-0:]`` would take every block); ``fine_tune_type="full"``
    leaves those blocks as they are, for training all their weights. Returns the number of
    blocks."""
    n = len(model.layers) if num_layers == -1 else num_layers
    if not 0 <= n <= len(model.layers):
        raise SafesigError(f"--num-layers must be -1 (all), 0 (none) or up to the model's "
                           f"{len(model.layers)} layers, got {num_layers}.")
    if fine_tune_type not in FINE_TUNE_TYPES:
        raise SafesigError(f"unknown fine-tune type {fine_tune_type!r} (lora or full).")
    if n and fine_tune_type == "lora":
        linear_to_lora_layers(model, n, parameters)
    return n


def save_adapters(model: Model, path: Path, config, num_layers: int, prefix: str = ""):
    """LoRA weights, or with full fine-tuning the trained blocks' weights (``adapters.safetensors``,
    mlx-lm's name and layout), the safety parts (``safety_adapter.safetensors``) and
    ``adapter_config.json`` (mlx-lm's keys + ours)."""
    path.mkdir(parents=True, exist_ok=True)
    trained = dict(tree_flatten(model.trainable_parameters()))
    lora = {k: v for k, v in trained.items() if k not in SAFETY_KEYS}
    save_atomic(path / f"{prefix}{ADAPTER_FILE}", lora)
    save_atomic(path / f"{prefix}{SAFETY_ADAPTER_FILE}", {k: trained[k] for k in SAFETY_KEYS})
    adapter_config = {
        "fine_tune_type": config.fine_tune_type,
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


def set_decoding_defaults(adapter_path, values: dict):
    """Write decoding defaults into the ``safesig`` block of an adapter's ``adapter_config.json``
    (merged with what it holds; the file is replaced in one rename)."""
    unknown = set(values) - DECODING_KEYS
    if unknown:
        raise SafesigError(f"unknown safesig setting {sorted(unknown)[0]!r}.")
    from .eval.report import atomic_write

    config_file = Path(adapter_path) / ADAPTER_CONFIG
    config = json.loads(config_file.read_text())
    config["safesig"] = {**config.get("safesig", {}), **values}
    atomic_write(config_file, json.dumps(config, indent=2))


def load_adapters(model: Model, adapter_path) -> Model:
    """Apply adapters written by ``train`` to a loaded safety model (in place): LoRA layers (or
    fully trained blocks) from ``adapters.safetensors``, the ``[CLS]`` row and head from
    ``safety_adapter.safetensors`` and the decoding defaults of ``adapter_config.json``'s
    optional ``safesig`` block."""
    path = Path(adapter_path)
    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file():
        raise SafesigError(f"{path}: no {ADAPTER_CONFIG}; is it an adapter directory from `train`?")
    config = json.loads(config_file.read_text())
    kind = config.get("fine_tune_type", "lora")
    if kind not in FINE_TUNE_TYPES:
        raise SafesigError(f"{config_file}: fine_tune_type {kind!r} is not supported (lora, full).")
    if not -1 <= config["num_layers"] <= len(model.layers):
        raise SafesigError(f"{path}: the adapters need {config['num_layers']} layers but the "
                           f"model has {len(model.layers)}.")
    decoding = config.get("safesig", {})
    unknown = set(decoding) - DECODING_KEYS
    if unknown:
        raise SafesigError(f"{config_file}: unknown safesig setting {sorted(unknown)[0]!r}.")
    add_lora(model, config["num_layers"], config["lora_parameters"], kind)
    load_adapter_weights(model, path)
    model.args.safesig.update(decoding)  # decoding defaults chosen for this adapter
    mx.eval(model.parameters())
    return model


# -- Training checkpoints -------------------------------------------------------------------------


def save_checkpoint(path: Path, optimizer, step: int):
    """The optimizer state and ``step`` beside the adapters saved at that step (``--resume``)."""
    save_atomic(path / STATE_FILE, {**dict(tree_flatten(optimizer.state)), STEP_KEY: mx.array(step)})
    (path / STEP_FILE).write_text(json.dumps({"step": step}))


def checkpoint_step(path: Path):
    """The step of the last checkpoint saved in ``path`` (None: none)."""
    file = Path(path) / STEP_FILE
    return json.loads(file.read_text())["step"] if file.is_file() else None


def load_adapter_weights(model: Model, path: Path, prefix: str = ""):
    """Put the LoRA (or trained blocks), ``[CLS]`` row and head saved in ``path`` into ``model``
    (after LoRA layers are in place); every saved array must have a place of the same shape."""
    path = Path(path)
    for name in (ADAPTER_FILE, SAFETY_ADAPTER_FILE):
        if not (path / f"{prefix}{name}").is_file():
            raise SafesigError(f"{path}: missing {prefix}{name}.")
    weights = {**mx.load(str(path / f"{prefix}{ADAPTER_FILE}")),
               **mx.load(str(path / f"{prefix}{SAFETY_ADAPTER_FILE}"))}
    have = dict(tree_flatten(model.parameters()))
    wrong = sorted(k for k, v in weights.items() if k not in have or have[k].shape != v.shape)
    if wrong:
        raise SafesigError(f"{path}: the adapters do not fit this model and LoRA settings "
                           f"(e.g. {wrong[0]}); train with the settings they were saved with.")
    model.load_weights(list(weights.items()), strict=False)


def load_checkpoint(path: Path, model: Model, optimizer) -> int:
    """Load the last checkpoint; its step comes from the state file and its adapters from that
    step's copies: a run killed between two of these writes resumes from one consistent step."""
    for name in (STATE_FILE, STEP_FILE, ADAPTER_FILE, SAFETY_ADAPTER_FILE):
        if not (path / name).is_file():
            raise SafesigError(f"{path}: nothing to resume from (no {name}).")
    saved = mx.load(str(path / STATE_FILE))
    step = int(saved.pop(STEP_KEY)) if STEP_KEY in saved else checkpoint_step(path)
    prefix = f"{step:07d}_" if (path / f"{step:07d}_{ADAPTER_FILE}").is_file() else ""
    load_adapter_weights(model, path, prefix)
    optimizer.init(model.trainable_parameters())
    optimizer.state = tree_map_with_path(lambda k, v: saved.get(k, v), optimizer.state)
    return step
