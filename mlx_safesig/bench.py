"""Speed of safety-aware decoding against plain mlx-lm, same process, same model, same prompt.

Runs are interleaved (mlx-lm, then each schedule, repeated) and the median of the repeats is
reported, because these machines are noisy: compare ratios, not seconds. Insertions are disabled
during the benchmark (threshold and tau out of reach) so every run decodes the same tokens and the
numbers are the cost of the checks alone.
"""

import statistics
import time
from typing import Callable, Optional, Sequence

import mlx.core as mx
import mlx_lm

from .decoding import SafetyConfig
from .generate import prefill_prompt, probe, stream_generate
from .loading import SAFETY_FILE, load, resolve_model_path
from .prompt import prepare_prompt

BENCH_PROMPT = (
    "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle. "
    "Describe the sea, the weather, the keeper's daily routine and the people of the nearby "
    "village, and let the story unfold over several days."
)
NO_INSERTION = dict(threshold=0.999999, tau=10**9)



def bench(
    model_path: str,
    schedules: Sequence[str] = ("each", "annealing"),
    max_tokens: int = 128,
    prefill_tokens: int = 512,
    repeats: int = 3,
    prompt: str = BENCH_PROMPT,
    progress: Optional[Callable[[str], None]] = None,
) -> dict:
    """Decode tok/s and prefill tok/s of plain mlx-lm and of safesig per schedule.

    Returns ``{"runs": [{"name": "mlx-lm", "decode_tok_s", "prefill_tok_s"},
    {"name": "safesig", "schedule", "decode_tok_s", "prefill_tok_s", "decode_ratio",
    "prefill_ratio"}, ...], ...}``."""
    path = resolve_model_path(model_path)
    plain, plain_tok = mlx_lm.load(str(path))
    model, tokenizer = load(str(path), add_safety=not (path / SAFETY_FILE).is_file())
    messages = [{"role": "user", "content": prompt}]
    ids = plain_tok.apply_chat_template(messages, add_generation_prompt=True)
    long_ids = (ids * (prefill_tokens // len(ids) + 1))[:prefill_tokens]

    def plain_decode():
        r = None
        for r in mlx_lm.stream_generate(plain, plain_tok, mx.array(ids), max_tokens=max_tokens):
            pass
        return r.generation_tps

    def safe_decode(schedule):
        r = None
        config = SafetyConfig(schedule=schedule, **NO_INSERTION)
        for r in stream_generate(model, tokenizer, messages, max_tokens, safety=config):
            pass
        return r.generation_tps

    def plain_prefill():
        cache = plain.make_cache() if hasattr(plain, "make_cache") else None
        if cache is None:
            from mlx_lm.models.cache import make_prompt_cache

            cache = make_prompt_cache(plain)
        tic = time.perf_counter()
        mx.eval(plain(mx.array(long_ids)[None], cache=cache)[:, -1])
        return len(long_ids) / (time.perf_counter() - tic)

    def safe_prefill():
        cache = model.make_cache()
        slots = prepare_prompt(tokenizer, long_ids).query_slots
        tic = time.perf_counter()
        h = prefill_prompt(model, long_ids, cache)
        p = probe(model, cache, slots, keep=True)
        mx.eval(model.logits(h[None]), p)
        return len(long_ids) / (time.perf_counter() - tic)

    configs = [("mlx-lm", None)] + [("safesig", s) for s in schedules]
    samples = {c: {"decode": [], "prefill": []} for c in configs}
    plain_decode(), safe_decode(schedules[0] if schedules else "first")  # warm-up
    for rep in range(repeats):
        for name, schedule in configs:
            if progress:
                progress(f"repeat {rep + 1}/{repeats}: {name} {schedule or ''}".rstrip())
            if schedule is None:
                samples[(name, schedule)]["decode"].append(plain_decode())
                samples[(name, schedule)]["prefill"].append(plain_prefill())
            else:
                samples[(name, schedule)]["decode"].append(safe_decode(schedule))
                samples[(name, schedule)]["prefill"].append(safe_prefill())
    runs = []
    for name, schedule in configs:
        s = samples[(name, schedule)]
        run = {"name": name}
        if schedule is not None:
            run["schedule"] = schedule
        run["decode_tok_s"] = round(statistics.median(s["decode"]), 3)
        run["prefill_tok_s"] = round(statistics.median(s["prefill"]), 3)
        runs.append(run)
    base = runs[0]
    for run in runs[1:]:
        run["decode_ratio"] = round(run["decode_tok_s"] / base["decode_tok_s"], 4)
        run["prefill_ratio"] = round(run["prefill_tok_s"] / base["prefill_tok_s"], 4)
    return {
        "model": str(path),
        "max_tokens": max_tokens,
        "prefill_tokens": len(long_ids),
        "repeats": repeats,
        "device": str(mx.default_device()),
        "runs": runs,
    }


def format_table(result: dict) -> str:
    lines = [
        f"{'run':<24}{'decode tok/s':>14}{'ratio':>8}{'prefill tok/s':>15}{'ratio':>8}",
    ]
    for run in result["runs"]:
        name = run["name"] + (f" ({run['schedule']})" if "schedule" in run else "")
        lines.append(
            f"{name:<24}{run['decode_tok_s']:>14.2f}{run.get('decode_ratio', 1.0):>8.3f}"
            f"{run['prefill_tok_s']:>15.1f}{run.get('prefill_ratio', 1.0):>8.3f}"
        )
    return "\n".join(lines)
