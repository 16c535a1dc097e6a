"""The one conversion pipeline: plan and check everything from the headers, then stream the
shards through `transform` into an atomically written mlx-lm folder."""

import sys
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from mlx_safesig.model_dir import fetch_from_hub, is_hub_id

from . import tokenizer_files as tok
from .architectures import expected_shapes, mlx_config
from .errors import ConvertError
from .quantize import Quantized, qualifies, quantization_block, quantize
from .safety import EMBED, SAFETY_FILE, UNTRAINED_HEAD, Head, find_head, fresh_parts, settings
from .sources import Source, open_source
from .writer import atomic_directory, write_config, write_files, write_index, write_shard

# what a hub repo holds that `open_source` reads (weights in either format, tokenizer files)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.jinja", "*.model", "*.txt", "*.tiktoken"]
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
LM_HEAD = "lm_head.weight"


@dataclass
class Plan:
    """Every decision of a conversion, made before any weight is read.

    `config` is the output config.json; `split_cls` moves the embedding's last row to
    `cls_embed`; `fresh` makes new safety parts (--add-safety); `vocab` is the LM's vocab size
    without [CLS]; `dropped` are source tensors not written (tied lm_head, rotary buffers).
    """

    config: dict
    head: Head | None
    split_cls: bool
    fresh: bool
    vocab: int
    dropped: set[str] = field(default_factory=set)
    dtype: mx.Dtype | None = None
    q_bits: int | None = None
    tokenizer: dict = field(default_factory=dict)

    @property
    def has_safety(self) -> bool:
        """Whether the output carries safety parts."""
        return "safesig" in self.config


def make_plan(
    source: Source, head_key: str | None, add_safety: bool, dtype: str | None, q_bits: int | None
) -> Plan:
    """Decide and check the whole conversion of `source`; any problem is a ConvertError."""
    config, shapes = source.config, source.shapes
    hidden = config.get("hidden_size")
    if not isinstance(hidden, int):
        raise ConvertError(f"{source.path}: config has no integer hidden_size.")
    if EMBED not in shapes:
        raise ConvertError(f"{source.path}: missing tensor {EMBED}.")
    rows = shapes[EMBED][0]
    head = find_head(shapes, hidden, head_key)
    cls_id = tok.cls_token_id(source.tokenizer)
    if cls_id is None:
        cls_id = (config.get("safesig") or {}).get("cls_token_id")
    out = mlx_config(config, source.arch)
    plan = Plan(out, head, split_cls=False, fresh=False, vocab=rows, tokenizer=source.tokenizer)

    if source.safety:
        _check_mlx_safety(source, hidden)
        head_logits = source.safety["cls_head.weight"].shape[0]
        out["safesig"] = settings(
            config, config.get("safesig", {}).get("cls_token_id"), head_logits
        )
    elif head is not None:
        if add_safety:
            raise ConvertError(f"{source.path}: already has a safety head; drop --add-safety.")
        if cls_id is None:
            raise ConvertError(f"{source.path}: has a safety head but no [CLS] token (cls_token).")
        if cls_id != rows - 1:
            raise ConvertError(
                f"{source.path}: [CLS] id {cls_id} is not the embedding's last row ({rows - 1})."
            )
        plan.split_cls, plan.vocab = True, rows - 1
        out["safesig"] = settings(config, cls_id, head.logits)
        plan.dropped |= {head.weight, head.bias} - {None}
    elif add_safety:
        plan.fresh = True
        plan.tokenizer = tok.with_cls_token(source.tokenizer, rows)
        out["safesig"] = {**settings(config, rows, 1), UNTRAINED_HEAD: True}
    elif cls_id is not None and cls_id == rows - 1:
        raise ConvertError(
            f"{source.path}: has a [CLS] row but no head (looked for cls_head, safety_head, "
            "classifier, score; use --head-key)."
        )

    _check_vocab(source, plan.vocab, plan.split_cls)
    out["vocab_size"] = plan.vocab
    plan.dropped |= {k for k in shapes if k.endswith("rotary_emb.inv_freq")}
    if out["tie_word_embeddings"]:
        plan.dropped.add(LM_HEAD)
    _check_shapes(source, plan)
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}.")
    plan.dtype = DTYPES.get(dtype)
    if q_bits is not None and q_bits not in (4, 8):
        raise ConvertError(f"--q-bits: {q_bits} is not 4 or 8.")
    plan.q_bits = q_bits
    return plan


def _check_vocab(source: Source, vocab: int, split_cls: bool) -> None:
    declared = source.config.get("vocab_size")
    allowed = (vocab, vocab + 1) if split_cls else (vocab,)
    if declared is not None and declared not in allowed:
        raise ConvertError(
            f"{source.path}: config vocab_size {declared} does not match {EMBED} "
            f"({vocab + split_cls} rows)."
        )


def _check_mlx_safety(source: Source, hidden: int) -> None:
    parts = source.safety
    if "cls_embed" not in parts or "cls_head.weight" not in parts:
        raise ConvertError(f"{source.path / SAFETY_FILE}: needs cls_embed and cls_head.weight.")
    shapes = {k: tuple(v.shape) for k, v in parts.items()}
    find_head(shapes, hidden, "cls_head")
    if shapes["cls_embed"] != (hidden,):
        raise ConvertError(f"{source.path / SAFETY_FILE}: cls_embed is not [{hidden}].")


def _output_shape(name: str, shape: tuple, plan: Plan) -> tuple:
    if name in (EMBED, LM_HEAD) and shape[0] == plan.vocab + 1 and plan.split_cls:
        return (plan.vocab, *shape[1:])
    return tuple(shape)


def _check_shapes(source: Source, plan: Plan) -> None:
    expected = expected_shapes(plan.config, source.arch)
    for name, shape in source.shapes.items():
        if name in plan.dropped:
            continue
        if name not in expected:
            raise ConvertError(
                f"{source.path}: unexpected tensor {name} for a {source.arch.model_type} model."
            )
        got = _output_shape(name, shape, plan)
        if got != expected[name]:
            raise ConvertError(
                f"{source.path}: tensor {name} has shape {list(got)} but config.json implies "
                f"{list(expected[name])}."
            )
    missing = sorted(set(expected) - set(source.shapes))
    if missing:
        raise ConvertError(f"{source.path}: missing tensor {missing[0]}.")


def transform(tensors: dict, plan: Plan) -> tuple[dict, dict]:
    """One shard's tensors -> (language-model tensors, safety parts), per `plan`.

    Splits the [CLS] row off the embedding, takes the head out, drops what `plan.dropped`
    names, casts to `plan.dtype` and quantizes qualifying matrices to `plan.q_bits`.
    """
    lm, safety = {}, {}
    head = plan.head
    for name, t in tensors.items():
        if head is not None and name in (head.weight, head.bias):
            safety["cls_head.weight" if name == head.weight else "cls_head.bias"] = _cast(t, plan)
            continue
        if name in plan.dropped:
            continue
        if plan.split_cls and name in (EMBED, LM_HEAD) and t.shape[0] == plan.vocab + 1:
            if name == EMBED:
                safety["cls_embed"] = _cast(t[plan.vocab], plan)
            t = t[: plan.vocab]
        if plan.fresh and name == EMBED:
            embed = t.dequantize() if isinstance(t, Quantized) else t
            safety.update({k: _cast(v, plan) for k, v in fresh_parts(embed).items()})
        t = _cast(t, plan)
        if plan.q_bits and not isinstance(t, Quantized) and qualifies(name, t.shape):
            t = quantize(t, plan.q_bits)
        lm[name] = t
    return lm, safety


def _cast(t, plan: Plan):
    if plan.dtype is None:
        return t
    if isinstance(t, Quantized):
        return Quantized(
            t.weight, t.scales.astype(plan.dtype), t.biases.astype(plan.dtype), t.group_size, t.bits
        )
    return t.astype(plan.dtype) if mx.issubdtype(t.dtype, mx.floating) else t


def _shard_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write(source: Source, plan: Plan, mlx_path: Path, report) -> None:
    """Stream `source` through `transform` into the folder `mlx_path`, atomically."""
    quantized: dict[str, Quantized] = {}
    weight_map, total = {}, 0
    safety = {k: _cast(v, plan) for k, v in source.safety.items()}
    n = len(source.shards)
    with atomic_directory(mlx_path) as folder:
        for i, shard in enumerate(source.shards):
            report(
                f"[{i + 1}/{n}] {getattr(shard, 'name', 'tensors')} "
                f"({source.shard_bytes(shard) / 2**20:.0f} MiB)"
            )
            lm, parts = transform(source.load(shard), plan)
            safety.update(parts)
            quantized.update({k: v for k, v in lm.items() if isinstance(v, Quantized)})
            if lm:
                name = _shard_name(i, n)
                sizes = write_shard(folder, name, lm)
                weight_map.update(dict.fromkeys(sizes, name))
                total += sum(sizes.values())
            del lm
        if n > 1:
            write_index(folder, weight_map, total)
        if plan.has_safety:
            _check_safety_parts(safety, source)
            write_shard(folder, SAFETY_FILE, safety)
        config = dict(plan.config)
        if quantized:
            config["quantization"] = quantization_block(quantized)
        write_config(folder, config)
        write_files(folder, plan.tokenizer)


def _check_safety_parts(safety: dict, source: Source) -> None:
    if "cls_embed" not in safety or "cls_head.weight" not in safety:
        raise ConvertError(f"{source.path}: the safety parts are incomplete.")
    if "cls_head.bias" not in safety:
        logits = safety["cls_head.weight"].shape[0]
        safety["cls_head.bias"] = mx.zeros((logits,), dtype=safety["cls_head.weight"].dtype)


def convert(
    hf_path,
    mlx_path,
    quantize: bool = False,
    q_bits: int = 4,
    dtype: str | None = None,
    add_safety: bool = False,
    head_key: str | None = None,
    verify: bool = False,
    progress: bool = True,
) -> Path:
    """Convert the model at `hf_path` (HF folder, mlx-lm folder or llama-family GGUF) into an
    mlx-lm folder at `mlx_path` with the safety parts in `safety.safetensors`.

    `hf_path` that is no local path but looks like `owner/name` is fetched from the Hugging Face
    hub first (config, tokenizer files and weights: `HUB_PATTERNS`).
    `quantize` quantizes the language model's matrices to `q_bits` (group 64; a GGUF MLX reads
    keeps its own Q4_0/Q4_1/Q8_0 quantization instead, a k-quant one is dequantized first);
    `dtype` ("float32", "float16", "bfloat16") casts float tensors (default: keep the source's;
    GGUF: float32); `add_safety` gives a plain model a fresh [CLS] row and head; `head_key`
    names the head's tensors; `verify` compares against PyTorch.
    Returns the output path. Raises ConvertError (one sentence) on bad input, leaving nothing
    at `mlx_path`.
    """
    report = _reporter(progress)
    mlx_path = Path(mlx_path)
    if mlx_path.exists():
        raise ConvertError(f"{mlx_path}: already exists; remove it or pick another --mlx-path.")
    hf_path = Path(hf_path).expanduser()
    if not hf_path.exists() and is_hub_id(str(hf_path)):
        hf_path = fetch_from_hub(str(hf_path), HUB_PATTERNS)
    source = open_source(hf_path, keep_quantized=quantize, report=report)
    plan = make_plan(source, head_key, add_safety, dtype, q_bits if quantize else None)
    write(source, plan, mlx_path, report)
    report(f"wrote {mlx_path}")
    if verify:
        from .reference import verify_conversion

        verify_conversion(source.path, mlx_path, report)
    return mlx_path


def _reporter(progress: bool):
    def report(message: str) -> None:
        if progress:
            print(message, file=sys.stderr, flush=True)

    return report
