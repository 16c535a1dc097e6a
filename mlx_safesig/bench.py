"""Speed of safety-aware decoding against plain mlx-lm, same process, same model, same prompt.

Runs are interleaved (mlx-lm, then each schedule, repeated) and the median of the repeats is
reported, because these machines are noisy: compare ratios, not seconds. Insertions are disabled
during the benchmark (threshold and tau out of reach) so every run decodes the same tokens and the
numbers are the cost of the checks alone. Optional parts: a batch of B prompts (mlx-lm's
``BatchGenerator`` against the engine's ``SafeBatchGenerator``) and a chat of N turns (time to
first token with the conversation cache reused, and with the whole conversation prefilled again),
and the HTTP servers: mlx_lm.server and ``mlx-safesig server`` on the same model, each in its own
process on a free loopback port, driven by the same concurrent clients (``bench_server``).
"""

import json
import multiprocessing
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Sequence

import mlx.core as mx
import mlx_lm
from mlx_lm.generate import BatchGenerator

from .decoding import SURPRISAL_WINDOW, SafetyConfig
from .engine import SafeBatchGenerator
from .generate import stream_generate
from .loading import SAFETY_FILE, load, resolve_model_path
from .prefill import make_prompt_cache, prefill_query
from .prompt import prepare_prompt

BENCH_PROMPT = (
    "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle. "
    "Describe the sea, the weather, the keeper's daily routine and the people of the nearby "
    "village, and let the story unfold over several days."
)
NO_INSERTION = dict(threshold=0.999999, tau=10**9)
NEVER_GATE = 1e9  # a surprisal gate no query reaches: its cost without its refusals
BATCH_TOPICS = ("a lighthouse keeper", "a mountain village", "a river boat", "a city garden",
                "an old library", "a desert caravan", "a winter market", "an island school")
# one chat turn: about 60 tokens from the user and up to CHAT_REPLY_TOKENS from the model
CHAT_TURN = ("Now continue the story with a new chapter number {k}: describe the morning, the "
             "weather over the bay, what the keeper eats, who visits the lighthouse and what they "
             "talk about, and end the chapter with a small surprise.")
CHAT_REPLY_TOKENS = 40

def bench(
    model_path: str,
    schedules: Sequence[str] = ("each", "annealing"),
    max_tokens: int = 128,
    prefill_tokens: int = 512,
    repeats: int = 3,
    prompt: str = BENCH_PROMPT,
    progress: Optional[Callable[[str], None]] = None,
    batch_size: Optional[int] = None,
    chat_turns: Optional[int] = None,
    server_concurrency: Optional[int] = None,
    keep_verdict: Optional[str] = None,
    surprisal_gate: bool = False,
) -> dict:
    """Decode tok/s and prefill tok/s of plain mlx-lm and of safesig per schedule (and with
    ``surprisal_gate``, of the last schedule with the gate on, as ``"safesig+gate"``; a gate it
    never reaches, so the tokens are the same and the cost is computing the query's surprisal).

    Returns ``{"runs": [{"name": "mlx-lm", "decode_tok_s", "prefill_tok_s"},
    {"name": "safesig", "schedule", "decode_tok_s", "prefill_tok_s", "decode_ratio",
    "prefill_ratio"}, ...], ...}``. With ``batch_size`` B, rows ``{"name": "mlx-lm",
    "batch_size": B, "decode_tok_s"}`` and ``{"name": "safesig", "schedule", "batch_size": B,
    "decode_tok_s", "decode_ratio"}`` follow (``bench_batch``); with ``chat_turns`` N, rows
    ``{"name": "chat-reuse" | "chat-reprefill" | "chat-mlx-lm", "turn": k, "ttft_ms"}``
    (``bench_chat``); with ``server_concurrency`` C, rows ``{"name": "mlx_lm.server" |
    "safesig-server", "concurrency": C, "tok_s"}`` (``bench_server``)."""
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

    def safe_decode(schedule, gate=None):
        r = None
        config = SafetyConfig(schedule=schedule, surprisal_gate=gate, **NO_INSERTION)
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

    def safe_prefill(gate=None):  # the engine's admission of a prompt (``prefill_query``)
        slots = prepare_prompt(tokenizer, long_ids).query_slots
        tic = time.perf_counter()
        _, h, p, _ = prefill_query(model, long_ids, slots,
                                   window=None if gate is None else SURPRISAL_WINDOW)
        mx.eval(model.logits(h[None]), p)
        return len(long_ids) / (time.perf_counter() - tic)

    configs = [("mlx-lm", None)] + [("safesig", s) for s in schedules]
    if surprisal_gate and schedules:
        configs.append(("safesig+gate", schedules[-1]))
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
                gate = NEVER_GATE if name == "safesig+gate" else None
                samples[(name, schedule)]["decode"].append(safe_decode(schedule, gate))
                samples[(name, schedule)]["prefill"].append(safe_prefill(gate))
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
    if batch_size:
        runs += bench_batch(plain, model, tokenizer, batch_size, schedules, max_tokens, repeats,
                            progress)
    if chat_turns:
        runs += bench_chat(model, tokenizer, chat_turns, schedules[-1] if schedules else "first",
                           keep_verdict, progress)
    if server_concurrency:
        runs += bench_server(path, tokenizer, server_concurrency, max_tokens,
                             schedules[-1] if schedules else "first", repeats, progress)
    return {
        "model": str(path),
        "max_tokens": max_tokens,
        "prefill_tokens": len(long_ids),
        "repeats": repeats,
        "device": str(mx.default_device()),
        "runs": runs,
    }


def _batch_prompts(tokenizer, batch_size: int) -> list:
    """``batch_size`` chat prompts of different lengths (rows of a batch rarely line up)."""
    return [[{"role": "user", "content": f"Write a long story about "
              f"{BATCH_TOPICS[i % len(BATCH_TOPICS)]}." + " Make it vivid." * (i % 4)}]
            for i in range(batch_size)]


def bench_batch(plain, model, tokenizer, batch_size: int, schedules: Sequence[str],
                max_tokens: int, repeats: int, progress=None) -> list:
    """Decode tok/s of ``batch_size`` prompts decoded together: mlx-lm's ``BatchGenerator`` on
    the plain model, and the engine per schedule; tokens and time are counted from the first
    step after every row is prefilled."""
    prompts = _batch_prompts(tokenizer, batch_size)
    ids = [prepare_prompt(tokenizer, p).ids for p in prompts]  # what the engine runs

    def plain_decode():
        # both stop rows at EOS: greedy and without insertions they decode the same tokens
        gen = BatchGenerator(plain, max_tokens=max_tokens,
                             stop_tokens=[[t] for t in tokenizer.eos_token_ids])
        gen.insert(ids, [max_tokens] * batch_size)
        n, tic = 0, None
        while responses := gen.next_generated():
            if tic is None and len(responses) == batch_size:
                tic = time.perf_counter()
            elif tic is not None:
                n += len(responses)
        gen.close()
        return n / (time.perf_counter() - tic)

    def safe_decode(schedule):
        engine = SafeBatchGenerator(model, tokenizer, SafetyConfig(schedule=schedule,
                                                                   **NO_INSERTION))
        engine.insert(prompts, max_tokens)
        engine.next()
        n, tic = 0, time.perf_counter()
        while steps := engine.next():
            n += len(steps)
        return n / (time.perf_counter() - tic)

    samples = {s: [] for s in (None, *schedules)}
    plain_decode(), safe_decode(schedules[0] if schedules else "first")  # warm-up
    for rep in range(repeats):
        for schedule in samples:
            if progress:
                progress(f"batch {batch_size}, repeat {rep + 1}/{repeats}: "
                         f"{schedule or 'mlx-lm'}")
            samples[schedule].append(plain_decode() if schedule is None else safe_decode(schedule))
    base = round(statistics.median(samples[None]), 3)
    runs = [{"name": "mlx-lm", "batch_size": batch_size, "decode_tok_s": base}]
    for schedule in schedules:
        tok_s = round(statistics.median(samples[schedule]), 3)
        runs.append({"name": "safesig", "schedule": schedule, "batch_size": batch_size,
                     "decode_tok_s": tok_s, "decode_ratio": round(tok_s / base, 4)})
    return runs


def bench_chat(model, tokenizer, turns: int, schedule: str, keep_verdict: Optional[str] = None,
               progress=None) -> list:
    """Time to first token at each turn of a conversation whose turns each add about 100 tokens
    (a ~60-token user message and a reply of up to ``CHAT_REPLY_TOKENS``): on a reused
    conversation cache, and with the whole conversation prefilled again (what a chat without a
    cache does), and plain mlx-lm on its own reused cache (``chat-mlx-lm``: the same attention
    over a growing context, without the safety checks). All see the same conversation (the
    replies made on the safety cache)."""
    safety = SafetyConfig(schedule=schedule, keep_verdict=keep_verdict,
                          **NO_INSERTION).resolved(model.args.safesig)
    cache, plain_cache = make_prompt_cache(model), make_prompt_cache(model)
    history = [{"role": "user", "content": BENCH_PROMPT}]
    runs = []

    def first_token(prompt_cache, config=safety):
        tic = time.perf_counter()
        stream = stream_generate(model, tokenizer, history, CHAT_REPLY_TOKENS, safety=config,
                                 prompt_cache=prompt_cache)
        first = next(stream)
        return (time.perf_counter() - tic) * 1000, first, stream

    for k in range(1, turns + 1):
        if progress:
            progress(f"chat turn {k}/{turns}")
        if k > 1:
            history.append({"role": "user", "content": CHAT_TURN.format(k=k)})
        reprefill_ms, _, _ = first_token(None)
        plain_ms, _, plain_rest = first_token(plain_cache, SafetyConfig(enabled=False))
        for _ in plain_rest:  # its reply goes into its cache too
            pass
        reuse_ms, first, rest = first_token(cache)
        reply = first.text + "".join(r.text for r in rest)
        history.append({"role": "assistant", "content": reply})
        for name, ms in (("chat-reuse", reuse_ms), ("chat-reprefill", reprefill_ms),
                         ("chat-mlx-lm", plain_ms)):
            runs.append({"name": name, "turn": k, "ttft_ms": round(ms, 2),
                         "keep_verdict": safety.keep_verdict})
    return runs


def _serve_for_bench(path: str, schedule: str, ready):
    """``mlx-safesig server`` on ``path`` in a process of its own (insertions disabled, as in
    every run of the benchmark); sends its URL through ``ready``. SIGTERM stops it."""
    from .server import serve

    model, tokenizer = load(path, add_safety=not (Path(path) / SAFETY_FILE).is_file())
    serve(model, tokenizer, SafetyConfig(schedule=schedule, **NO_INSERTION),
          model_id=path, port=0, on_ready=lambda server: ready.put(server.url))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as r:
        return json.loads(r.read())


def _wait_healthy(url: str, proc, timeout: float = 600):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"mlx_lm.server exited with code {proc.returncode}.")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"mlx_lm.server did not answer at {url} within {timeout:.0f} s.")


def bench_server(path: Path, tokenizer, concurrency: int, max_tokens: int, schedule: str,
                 repeats: int, progress=None) -> list:
    """Tokens/s of mlx_lm.server and ``mlx-safesig server`` (safety on, ``schedule``) on the model
    at ``path``, each in its own process on a free loopback port, answering the same
    ``concurrency`` clients (two greedy chat requests each, ``max_tokens`` at most); generated
    tokens (the responses' usage) over wall time, median of ``repeats`` interleaved runs."""
    prompts = _batch_prompts(tokenizer, 2 * concurrency)
    plain_url = f"http://127.0.0.1:{_free_port()}"
    # mlx_lm.server with the BLAS ``import mlx_safesig`` preloads, as the other runs have it
    plain = subprocess.Popen(
        [sys.executable, "-c", "import mlx_safesig; from mlx_lm.server import main; main()",
         "--model", str(path), "--host", "127.0.0.1", "--port", plain_url.rsplit(":", 1)[1],
         "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    ours = ctx.Process(target=_serve_for_bench, args=(str(path), schedule, ready), daemon=True)
    ours.start()
    try:
        ours_url = ready.get(timeout=600)
        _wait_healthy(plain_url, plain)

        def run(url):
            def ask(messages):
                return _post(url + "/v1/chat/completions", {
                    "model": str(path), "messages": messages, "max_tokens": max_tokens,
                    "temperature": 0.0})["usage"]["completion_tokens"]

            tic = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                tokens = sum(pool.map(ask, prompts))
            return tokens / (time.perf_counter() - tic)

        names = {"mlx_lm.server": plain_url, "safesig-server": ours_url}
        for url in names.values():  # warm-up
            _post(url + "/v1/chat/completions", {"model": str(path), "messages": prompts[0],
                                                 "max_tokens": 4})
        samples = {name: [] for name in names}
        for rep in range(repeats):
            for name, url in names.items():
                if progress:
                    progress(f"servers, {concurrency} clients, repeat {rep + 1}/{repeats}: {name}")
                samples[name].append(run(url))
    finally:
        plain.terminate()
        ours.terminate()
        plain.wait(60)
        ours.join(60)
    runs = [{"name": name, "concurrency": concurrency,
             "tok_s": round(statistics.median(tok_s), 3)} for name, tok_s in samples.items()]
    runs[1]["schedule"] = schedule
    return runs


def format_table(result: dict) -> str:
    lines = [
        f"{'run':<24}{'decode tok/s':>14}{'ratio':>8}{'prefill tok/s':>15}{'ratio':>8}",
    ]
    for run in result["runs"]:
        if "decode_tok_s" not in run:
            continue  # chat rows: their own table
        name = run["name"] + (f" ({run['schedule']})" if "schedule" in run else "")
        if "batch_size" in run:
            lines.append(f"{name + ' x' + str(run['batch_size']):<24}"
                         f"{run['decode_tok_s']:>14.2f}{run.get('decode_ratio', 1.0):>8.3f}")
            continue
        lines.append(
            f"{name:<24}{run['decode_tok_s']:>14.2f}{run.get('decode_ratio', 1.0):>8.3f}"
            f"{run['prefill_tok_s']:>15.1f}{run.get('prefill_ratio', 1.0):>8.3f}"
        )
    for run in result["runs"]:
        if "concurrency" in run:
            lines.append(f"{run['name'] + ' c' + str(run['concurrency']):<24}{run['tok_s']:>14.2f}")
    chat = [run for run in result["runs"] if "turn" in run]
    if chat:
        lines.append(f"{'chat turn':<24}{'reuse ttft ms':>14}{'re-prefill ttft ms':>20}"
                     f"{'mlx-lm reuse ttft ms':>22}")
        by_turn = {}
        for run in chat:
            by_turn.setdefault(run["turn"], {})[run["name"]] = run["ttft_ms"]
        for k, row in sorted(by_turn.items()):
            lines.append(f"{k:<24}{row['chat-reuse']:>14.1f}{row['chat-reprefill']:>20.1f}"
                         f"{row['chat-mlx-lm']:>22.1f}")
    return "\n".join(lines)
