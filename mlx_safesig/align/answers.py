"""The base model's greedy answers to batches of prompts, in this process or in worker processes,
and their cache (``generate_missing``: what the rows stage calls).

On a CPU one generation uses about one core (MLX's own ops run on one thread; OpenBLAS helps
only the matrix products of a small batch), so the rows stage runs ``workers`` processes, each
with the model and one OpenBLAS thread, and hands each a whole batch: the batches are the same
as with one process, so are the answers (a test compares them). With Metal there is one GPU:
one process.
"""

import hashlib
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator, List, Sequence, Tuple

from .records import row_messages

Batch = Sequence[Sequence[dict]]  # chat messages of each prompt of one batch
_loaded: dict = {}  # this process's model and tokenizer


def model_fingerprint(model_dir) -> str:
    """sha256 (16 hex digits) of a model folder's config and weights, in name order: the same
    model gives the same key on any machine and under any path."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(model_dir).iterdir()
                   if p.name == "config.json" or p.suffix == ".safetensors")
    for p in files:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:16]


def default_workers() -> int:
    """One process per core on a CPU (at most 4: each holds the model), one with Metal."""
    import mlx_safesig  # noqa: F401, I001  (OpenBLAS before mlx on Linux)
    import mlx.core as mx

    if mx.metal.is_available():
        return 1
    return max(1, min(os.cpu_count() or 1, 4))


def _load(model_dir: str):
    import mlx_safesig  # noqa: F401, I001  (OpenBLAS before mlx on Linux)
    from mlx_lm import load

    _loaded["model"], _loaded["tokenizer"] = load(model_dir)


def _answer(batch: Batch, max_tokens: int) -> Tuple[List[str], List[int]]:
    """Greedy answers to one batch: their texts and token counts."""
    from mlx_lm import batch_generate

    model, tok = _loaded["model"], _loaded["tokenizer"]
    prompts = [tok.apply_chat_template(list(m), add_generation_prompt=True) for m in batch]
    result = batch_generate(model, tok, prompts, max_tokens=max_tokens, return_token_ids=True)
    return list(result.texts), [len(ids) for ids in result.token_ids]


@contextmanager
def _one_blas_thread():
    """Workers inherit the environment at spawn: one OpenBLAS thread each unless the user chose."""
    old = os.environ.get("OPENBLAS_NUM_THREADS")
    if old is None:
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("OPENBLAS_NUM_THREADS", None)


def pool_size(workers: int, n_batches: int) -> int:
    """The processes ``answer_batches`` runs for ``n_batches``: ``workers``, at most one per batch."""
    return max(1, min(workers, n_batches))


def answer_batches(model_dir: str, batches: Sequence[Batch], max_tokens: int,
                   workers: int = 1) -> Iterator[Tuple[List[str], List[int]]]:
    """(texts, token counts) of each batch, in order, as they finish; ``workers`` > 1 runs that
    many spawned processes (``pool_size``; the batches go to whichever is free)."""
    if not batches:
        return
    workers = pool_size(workers, len(batches))
    if workers == 1:
        _load(model_dir)
        try:
            for batch in batches:
                yield _answer(batch, max_tokens)
        finally:
            _loaded.clear()
        return
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_load,
                               initargs=(model_dir,))
    try:
        with _one_blas_thread():  # map submits every batch now, which spawns the workers
            results = pool.map(_answer, batches, [max_tokens] * len(batches))
        yield from results
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def generate_missing(rows, cache_path: Path, model_dir: str, max_tokens: int, batch: int,
                     model_key: str, log=None, workers: int = 1):
    """Base-model answers (safety off, greedy) for rows not yet in the cache: id -> text, with
    ``finished`` (ended on its own, not by ``max_tokens``) kept in the cache file. Cache rows
    record their ``max_tokens`` and ``model`` (``model_fingerprint``): rows made with another
    limit or base model (or before these were recorded) are not used, so one folder serves every
    limit and model. A line torn by a killed run is cut off: the run goes on after the last whole
    one. ``workers`` processes generate whole batches (``answer_batches``: the same answers)."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    cache, finished = {}, {}
    if cache_path.exists():
        whole = cache_path.read_bytes()
        if not whole.endswith(b"\n") and whole:
            with open(cache_path, "r+b") as f:
                f.truncate(whole.rfind(b"\n") + 1)
        for r in (json.loads(x) for x in cache_path.read_text().splitlines() if x.strip()):
            if r.get("max_tokens") == max_tokens and r.get("model") == model_key:
                cache[r["id"]], finished[r["id"]] = r["text"], r.get("finished")
    # shortest prompts first: a batch is left-padded to its longest prompt, so one long prompt
    # among short ones costs the whole batch its length (the cache is keyed by id: order-free)
    todo = sorted((r for r in rows if r["id"] not in cache),
                  key=lambda r: sum(len(m["content"]) for m in row_messages(r)))
    if not todo:
        return cache, finished
    chunks = [todo[i : i + batch] for i in range(0, len(todo), batch)]
    batches = [[row_messages(r) for r in chunk] for chunk in chunks]
    workers = pool_size(workers, len(chunks))
    log(f"generating {len(todo)} answers of the base model in {workers} process"
        + ("es" if workers > 1 else ""))
    done = 0
    with open(cache_path, "a") as out:
        for chunk, (texts, lengths) in zip(chunks, answer_batches(model_dir, batches, max_tokens,
                                                                  workers)):
            for r, text, n in zip(chunk, texts, lengths):
                cache[r["id"]], finished[r["id"]] = text, n < max_tokens
                out.write(json.dumps({"id": r["id"], "text": text, "finished": finished[r["id"]],
                                      "max_tokens": max_tokens, "model": model_key}) + "\n")
            out.flush()
            done += len(chunk)
            log(f"generated {done}/{len(todo)}")
    return cache, finished
