"""mlx-safesig: LLM safety alignment with explicit safety signals (Li & Kim, ICML 2025) on MLX.

    from mlx_safesig import load, generate, stream_generate, score, SafetyConfig
    model, tokenizer = load()                      # the default model (= load(DEFAULT_MODEL))
    model, tokenizer = load("path/to/safety-model")
    p = score(model, tokenizer, [{"role": "user", "content": "..."}])   # p(malicious)
    text = generate(model, tokenizer, messages, safety=SafetyConfig(schedule="each"))

The [CLS] token and head live in ``model.py``, the strategic attention masks in ``attention.py``,
the decoding rules in ``decoding.py``, the one generation loop (1..B rows) in ``engine.py``, the
command line in ``cli.py`` and the evaluation in ``eval/``.
"""

from ._blas import preload_openblas

preload_openblas()  # before anything imports mlx: the Linux wheel's reference BLAS is slow

from .decoding import SafetyConfig, SafetyEvent, SafetyMonitor  # noqa: E402
from .default_model import DEFAULT_MODEL  # noqa: E402
from .engine import SafeBatchGenerator, seeded_sampler  # noqa: E402
from .generate import (  # noqa: E402
    GenerationResult,
    SafetySignal,
    generate,
    score,
    stream_generate,
)
from .loading import load  # noqa: E402
from .model import Model, ModelArgs, SafesigError  # noqa: E402
from .prefill import PromptCache, make_prompt_cache  # noqa: E402
from .prompt import PreparedPrompt, prepare_prompt  # noqa: E402
from .steps import RetractStep, TokenStep  # noqa: E402

__all__ = [
    "DEFAULT_MODEL",
    "load",
    "generate",
    "stream_generate",
    "score",
    "SafetyConfig",
    "SafetyEvent",
    "SafetyMonitor",
    "SafetySignal",
    "GenerationResult",
    "make_prompt_cache",
    "PromptCache",
    "SafeBatchGenerator",
    "TokenStep",
    "RetractStep",
    "seeded_sampler",
    "prepare_prompt",
    "PreparedPrompt",
    "Model",
    "ModelArgs",
    "SafesigError",
]
