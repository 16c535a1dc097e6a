"""How much faster align's rows stage makes the base model's answers with more worker processes.

Times ``answers.generate_missing`` (what the rows stage calls) on the same prompts with 1 and with N
workers, each into a fresh cache, in one run (ratios, not wall-clock: these machines are noisy;
pause other jobs first), and checks both gave the same answers. Prompts: the first ``--prompts``
benign dev prompts of a built data folder by a hash of their id (counts only are printed).

    python examples/bench_answer_workers.py --data runs/v18/data --prompts 64 --workers 2
"""

# ruff: noqa: I001  (import order: mlx_safesig before mlx)
from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

import mlx_safesig  # noqa: F401  (preloads OpenBLAS on Linux: must come before mlx)
from mlx_safesig.align.answers import generate_missing, model_fingerprint
from mlx_safesig.align.rows import RowsOptions
from mlx_safesig.default_model import default_base_model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="A built data folder (its benign dev split).")
    ap.add_argument("--model", default=None, help="Base model (default: the embedded one).")
    ap.add_argument("--prompts", type=int, default=64, help="Prompts answered per setting.")
    ap.add_argument("--workers", type=int, default=2, help="Workers compared with one.")
    ap.add_argument("--max-tokens", type=int, default=RowsOptions.benign_max_tokens,
                    help="Tokens per answer (the rows stage's benign limit by default).")
    args = ap.parse_args(argv)
    model_dir = args.model or str(default_base_model())
    rows = [json.loads(ln) for ln in (Path(args.data) / "benign.dev.jsonl").open()]
    rows = sorted(rows, key=lambda r: hashlib.sha256(str(r["id"]).encode()).hexdigest())
    rows = rows[: args.prompts]
    key = model_fingerprint(model_dir)
    seconds, answers = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, args.workers):
            t = time.perf_counter()
            answers[workers], _ = generate_missing(
                rows, Path(tmp) / f"w{workers}.jsonl", model_dir, args.max_tokens,
                RowsOptions.batch, key, log=lambda m: None, workers=workers)
            seconds[workers] = time.perf_counter() - t
    same = answers[1] == answers[args.workers]
    print(f"{len(rows)} prompts, {args.max_tokens} tokens at most, batch {RowsOptions.batch}: "
          f"1 worker {seconds[1]:.1f} s, {args.workers} workers {seconds[args.workers]:.1f} s, "
          f"speedup {seconds[1] / seconds[args.workers]:.2f}x; same answers: {same}")
    return same


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
