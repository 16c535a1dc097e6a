"""The safety model: a llama-family decoder with the ``[CLS]`` input row and the binary safety head.

Module names match mlx-lm (``model.layers.N.self_attn.q_proj`` ...) so mlx-lm weights, quantization
and LoRA keys fit unchanged. What differs from mlx-lm's models: the forward pass takes an explicit
``mask`` and explicit ``positions``, and the model carries ``cls_embed`` (the embedding row of the
``[CLS]`` token, id = vocab size) and ``cls_head`` (1 or 2 logits on the final-norm ``[CLS]`` state).
Without ``mask``/``positions`` it is exactly the plain mlx-lm forward.

Families differ in a few switches (``FAMILIES``): llama/mistral plain, qwen2 adds q/k/v biases,
qwen3 adds RMSNorm on queries and keys.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import BaseModelArgs, create_attention_mask
from mlx_lm.models.cache import KVCache
from mlx_lm.models.rope_utils import initialize_rope

from .attention import Positions, attend, rope_at, rope_table
from .decoding import REFUSAL_PREFIX
from .speed import (
    GATE_UP,
    QKV,
    compiled_layers,
    fuse_projections,
    project,
    project_group,
    unfuse_projections,
)

# model_type -> switches; defaults for keys the family's config may leave out.
FAMILIES: Dict[str, Dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "qwen2": {"qkv_bias": True, "rope_theta": 1000000.0},
    "qwen3": {"qk_norm": True},
}

SAFESIG_DEFAULTS: Dict[str, Any] = {
    "cls_token_id": None,  # None: the embedding row count (old vocab size)
    "head_logits": 1,
    "threshold": 0.5,
    "tau": 3,
    "r1": 10,
    "r2": 10,
    "r3": 10,
    "refusal_prefix": REFUSAL_PREFIX,
    "probe_position": 0,  # RoPE position of a probe; "current" = the slot it is appended at
}


class SafesigError(ValueError):
    """Bad input from a user: the message is one sentence meant to be shown as is."""


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    rms_norm_eps: float
    vocab_size: int
    head_dim: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    num_key_value_heads: Optional[int] = None
    attention_bias: bool = False
    mlp_bias: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    rope_theta: Optional[float] = None
    rope_traditional: bool = False
    rope_scaling: Optional[Dict[str, Union[float, str]]] = None
    rope_parameters: Optional[Dict[str, Any]] = None
    tie_word_embeddings: bool = True
    safesig: Dict[str, Any] = field(default_factory=dict)
    safety_weights_file: Optional[str] = None

    @classmethod
    def from_dict(cls, params):
        model_type = params.get("model_type")
        if model_type not in FAMILIES:
            raise SafesigError(
                f"model_type {model_type!r} is not supported; supported: {', '.join(FAMILIES)}."
            )
        return super().from_dict({**FAMILIES[model_type], **params})

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        # transformers >= 5 nests rope_theta / scaling in rope_parameters
        rp = self.rope_parameters or {}
        if self.rope_theta is None:
            self.rope_theta = rp.get("rope_theta", 10000.0)
        if self.rope_scaling is None and rp.get("rope_type", "default") != "default":
            self.rope_scaling = rp
        self.safesig = {**SAFESIG_DEFAULTS, **(self.safesig or {})}
        if self.safesig["cls_token_id"] is None:
            self.safesig["cls_token_id"] = self.vocab_size


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hd = args.hidden_size, args.head_dim
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.scale = hd**-0.5
        qkv_bias = args.attention_bias or args.qkv_bias
        self.q_proj = nn.Linear(dim, self.n_heads * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, dim, bias=args.attention_bias)
        if args.qk_norm:
            self.q_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        self.rope = initialize_rope(
            hd, args.rope_theta, args.rope_traditional, args.rope_scaling,
            args.max_position_embeddings,
        )

    def qkv(self, x: mx.array, positions: Positions):
        """Normed input [B, L, D] -> RoPE'd queries, keys and values [B, heads, L, head_dim]."""
        B, L, _ = x.shape
        q, k, v = project_group(self, QKV, x)
        q = q.reshape(B, L, self.n_heads, -1)
        k = k.reshape(B, L, self.n_kv_heads, -1)
        v = v.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
        return rope_at(self.rope, q, positions), rope_at(self.rope, k, positions), v

    def output(self, o: mx.array) -> mx.array:
        B, _, L, _ = o.shape
        return project(self.o_proj, o.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hidden, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)

    def __call__(self, x) -> mx.array:
        gate, up = project_group(self, GATE_UP, x)
        return project(self.down_proj, swiglu(gate, up))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def attention_inputs(self, x, positions):
        return self.self_attn.qkv(self.input_layernorm(x), positions)

    def finish(self, x, o):
        """Residual stream after attention output ``o`` [B, heads, L, head_dim]: o_proj, MLP."""
        h = x + self.self_attn.output(o)
        return h + self.mlp(self.post_attention_layernorm(h))

    def __call__(self, x, mask, cache, positions, compiled=None):
        qkv, finish = compiled or (self.attention_inputs, self.finish)
        if positions is None:
            positions = cache.offset if cache is not None else 0
            if isinstance(positions, mx.array):  # mlx-lm's batch caches: one offset per row
                positions = positions[:, None] + mx.arange(x.shape[1])
        q, k, v = qkv(x, positions)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        o = attend(q, k, v, scale=self.self_attn.scale, mask=mask, cache=cache)
        return finish(x, o)


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class Model(nn.Module):
    """Safety model. Call it like an mlx-lm model (``model(ids, cache) -> logits``); use
    ``hidden``/``logits``/``safety_prob`` for the ``[CLS]`` paths."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Backbone(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.cls_embed = mx.zeros((args.hidden_size,))
        self.cls_head = nn.Linear(args.hidden_size, args.safesig["head_logits"])

    @property
    def cls_token_id(self) -> int:
        return self.args.safesig["cls_token_id"]

    @property
    def layers(self):
        return self.model.layers

    def embed(self, inputs: mx.array) -> mx.array:
        """Token ids [B, L] -> embeddings [B, L, D]; the ``[CLS]`` id maps to ``cls_embed``."""
        is_cls = inputs == self.cls_token_id
        h = self.model.embed_tokens(mx.where(is_cls, 0, inputs))
        return mx.where(is_cls[..., None], self.cls_embed.astype(h.dtype), h)

    def hidden(
        self,
        inputs: mx.array,
        cache=None,
        mask=None,
        positions: Optional[Positions] = None,
        input_embeddings: Optional[mx.array] = None,
        compiled: bool = False,
    ) -> mx.array:
        """Final-norm hidden states [B, L, D].

        ``mask``: None for mlx-lm's default (causal), or a bool array [L, K] / [B, 1, L, K] with
        K = cached slots + L. ``positions``: None (= cache offset), the int position of the first
        token, or per-token positions [L] / [B, L]. ``compiled``: run each layer's cache-free parts
        through ``mx.compile`` (decode steps: few tokens, fixed shapes, array positions).
        """
        h = input_embeddings if input_embeddings is not None else self.embed(inputs)
        if cache is None:
            cache = [None] * len(self.layers)
        if mask is None:
            mask = create_attention_mask(h, cache[0])
        pieces = compiled_layers(self) if compiled else [None] * len(self.layers)
        if positions is not None:
            positions = rope_table(self.layers[0].self_attn.rope, positions, self.args.head_dim)
        for layer, c, piece in zip(self.layers, cache, pieces):
            h = layer(h, mask, c, positions, piece)
        return self.model.norm(h)

    def fuse_projections(self) -> int:
        """For inference: each layer's q/k/v and gate/up weights become one buffer each, run as
        one matrix product per group (``speed.fuse_projections``). Returns the number of fused
        groups."""
        return fuse_projections(self)

    def update(self, parameters: dict, strict: bool = True):
        unfuse_projections(self)  # the fused buffers would hold stale weights
        return super().update(parameters, strict=strict)

    def update_modules(self, modules: dict, strict: bool = True):
        unfuse_projections(self)
        return super().update_modules(modules, strict=strict)

    def logits(self, h: mx.array) -> mx.array:
        """Hidden [..., D] -> LM logits [..., V]."""
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def safety_prob(self, h_cls: mx.array) -> mx.array:
        """Final-norm ``[CLS]`` states [..., D] -> p(malicious) [...] (sigmoid of a 1-logit head,
        softmax[1] of a 2-logit head)."""
        z = self.cls_head(h_cls.astype(self.cls_head.weight.dtype))
        if z.shape[-1] == 1:
            return mx.sigmoid(z[..., 0])
        return mx.softmax(z, axis=-1)[..., 1]

    def __call__(self, inputs, cache=None, input_embeddings=None, mask=None, positions=None):
        return self.logits(self.hidden(inputs, cache, mask, positions, input_embeddings))

    def make_cache(self):
        return [KVCache() for _ in self.layers]

    def sanitize(self, weights):
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        if self.args.safety_weights_file is not None:
            weights.update(mx.load(self.args.safety_weights_file))
        return weights


def fresh_safety_parts(embed_weight: mx.array, head_logits: int = 1, seed: int = 0):
    """A new ``[CLS]`` row (mean of the embedding rows, SPEC §2) and a small random head.

    ``embed_weight``: [V, D] float. Returns ``{"cls_embed": [D], "cls_head.weight": [k, D],
    "cls_head.bias": [k]}`` in float32.
    """
    D = embed_weight.shape[-1]
    key = mx.random.key(seed)
    return {
        "cls_embed": embed_weight.astype(mx.float32).mean(axis=0),
        "cls_head.weight": mx.random.normal((head_logits, D), key=key) * (D**-0.5) * 0.02,
        "cls_head.bias": mx.zeros((head_logits,)),
    }
