"""Tiny random safety models and a tiny byte-level BPE tokenizer with a ChatML template, built in
process so the fast tests need no files and no network."""

# ruff: noqa: I001  (import order: mlx_safesig before mlx, see below)
import json
from pathlib import Path

# First: on Linux it loads OpenBLAS, which takes effect only if mlx.core is not imported yet
# (libmlx's BLAS calls are bound when it is imported; mlx_safesig/_blas.py). Imported after
# mlx, every test ran on the wheel's reference BLAS.
import mlx_safesig  # noqa: F401

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from mlx_safesig.model import Model, ModelArgs

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "How do I bake bread at home? Mix flour, water, yeast and salt, then knead.",
    "Sorry, I can't fulfill your request because it could cause harm.",
    "The quick brown fox jumps over the lazy dog. Tell me a story about a robot.",
    "Write a poem about the sea. What is the capital of France? Paris is the capital.",
    "You are a helpful assistant. system user assistant",
] * 20

TINY = dict(
    model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
    tie_word_embeddings=True, max_position_embeddings=512,
)
FAMILY_CONFIGS = {
    "llama": TINY,
    "qwen2": {**TINY, "model_type": "qwen2", "tie_word_embeddings": False},
    "qwen3": {**TINY, "model_type": "qwen3", "head_dim": 16},
}


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


def make_model(family="llama", vocab_size=320, seed=0, head_bias=None, **overrides):
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict({**FAMILY_CONFIGS[family], "vocab_size": vocab_size,
                                        **overrides}))
    model.cls_embed = mx.random.normal((model.args.hidden_size,))
    if head_bias is not None:
        model.cls_head.bias = mx.full(model.cls_head.bias.shape, head_bias)
    mx.eval(model.parameters())
    return model


@pytest.fixture
def model():
    return make_model()


def write_model_dir(path: Path, model: Model, tokenizer, safety=True) -> Path:
    """An mlx-lm directory + safety.safetensors, as `convert` writes it."""
    path.mkdir(parents=True, exist_ok=True)
    params = dict(tree_flatten(model.parameters()))
    safety_keys = {"cls_embed", "cls_head.weight", "cls_head.bias"}
    mx.save_safetensors(str(path / "model.safetensors"),
                        {k: v for k, v in params.items() if k not in safety_keys})
    if safety:
        mx.save_safetensors(str(path / "safety.safetensors"),
                            {k: v for k, v in params.items() if k in safety_keys})
    config = {k: v for k, v in vars(model.args).items()
              if k not in ("safety_weights_file",) and v is not None}
    (path / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(str(path))
    return path


def load_example(name: str):
    """``examples/<name>.py`` as a module (the examples are scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
