"""Inference speed paths of the safety model, apart from the model's definition.

* Fused projections: a layer's q/k/v (and gate/up) weights live in one buffer and run as one
  matrix product per group -- fewer, larger products per decode step. The layers keep row views
  into the buffer, so memory and saved weights do not change.
* The two-row CPU product: the fused ``[token, [CLS]]`` decode step multiplies two rows.
* Compiled decode layers: each layer's cache-free parts under ``mx.compile``.
"""

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

QKV, GATE_UP = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")

# On CPU, BLAS packs the weight for an x @ W.T with two rows (the fused [token, [CLS]] decode
# step), reading it twice: ~11% slower than one row. W @ x.T takes the skinny kernel instead (~3%).
_SKINNY_ON_CPU = not mx.metal.is_available()


def _linear(weight: mx.array, bias: Optional[mx.array], x: mx.array) -> mx.array:
    if _SKINNY_ON_CPU and x.shape[0] * x.shape[1] == 2:
        y = (weight @ x.reshape(2, -1).T).T.reshape(*x.shape[:2], -1)
    else:
        y = x @ weight.T
    return y if bias is None else y + bias


def project(layer: nn.Module, x: mx.array) -> mx.array:
    """``layer(x)`` with the two-row CPU fast path for plain ``nn.Linear`` layers."""
    if type(layer) is nn.Linear:
        return _linear(layer.weight, layer.get("bias"), x)
    return layer(x)


def project_group(module: nn.Module, names: tuple, x: mx.array) -> list:
    """``[module.<name>(x) for name in names]``; one product through the group's fused weight
    (``fuse_group``) while every member is still a plain ``nn.Linear``."""
    fused = module.__dict__.get("_fused")
    if fused is not None and all(type(module[n]) is nn.Linear for n in names):
        weight, bias, splits = fused
        return mx.split(_linear(weight, bias, x), splits, axis=-1)
    return [project(module[n], x) for n in names]


def fuse_group(module: nn.Module, names: tuple) -> bool:
    """Store the weights of ``names`` (plain ``nn.Linear`` layers, same input size and dtype, all
    with or all without bias) in one buffer; the layers keep row views into it, so memory and
    saved weights do not change. Returns False (nothing done) for any other group."""
    layers = [module[n] for n in names]
    if not all(type(m) is nn.Linear for m in layers):
        return False
    weights = [m.weight for m in layers]
    has_bias = ["bias" in m for m in layers]
    if len({(w.shape[1], w.dtype) for w in weights}) != 1 or len(set(has_bias)) != 1:
        return False
    weight = mx.concatenate(weights)
    bias = mx.concatenate([m.bias for m in layers]) if has_bias[0] else None
    mx.eval(weight if bias is None else [weight, bias])
    start, splits = 0, []
    for m in layers:
        end = start + m.weight.shape[0]
        m.weight = weight[start:end]
        if bias is not None:
            m.bias = bias[start:end]
        splits.append(end)
        start = end
    mx.eval([m.parameters() for m in layers])
    object.__setattr__(module, "_fused", (weight, bias, splits[:-1]))
    return True


def fuse_projections(model) -> int:
    """Fuse each layer's q/k/v and gate/up groups of ``model`` (see ``fuse_group``). Groups that
    are not plain ``nn.Linear`` (LoRA, quantized) stay as they are; a layer later replaced (e.g. by
    LoRA) falls back to its own product, and any later weight update (``Model.update``,
    ``load_weights``, ``update_modules``) drops the fusion. Returns the number of fused groups."""
    unfuse_projections(model)
    n = sum(fuse_group(layer.self_attn, QKV) + fuse_group(layer.mlp, GATE_UP)
            for layer in model.layers)
    model.__dict__.pop("_compiled", None)  # traced code must see the fused weights
    return n


def unfuse_projections(model) -> None:
    """Drop the fused buffers of ``model`` (the layers' own weights stay valid)."""
    fused = [m for layer in model.layers for m in (layer.self_attn, layer.mlp)
             if "_fused" in m.__dict__]
    for m in fused:
        del m.__dict__["_fused"]
    if fused:
        model.__dict__.pop("_compiled", None)


def compiled_layers(model) -> list:
    """Per layer, ``(attention_inputs, finish)`` under ``mx.compile``, built once per model.
    ``inputs=layer.state`` makes them read the current weights (LoRA updates, load_weights) at
    every call instead of baking them in."""
    if "_compiled" not in model.__dict__:
        compiled = [
            (
                mx.compile(layer.attention_inputs, inputs=layer.state),
                mx.compile(layer.finish, inputs=layer.state),
            )
            for layer in model.layers
        ]
        object.__setattr__(model, "_compiled", compiled)  # a plain attribute, not a child
    return model.__dict__["_compiled"]
