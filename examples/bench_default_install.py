"""Decode speed of mlx-safesig as installed (OpenBLAS preloaded on Linux) against stock mlx-lm in a
process that never imports mlx_safesig (the mlx[cpu] wheel's reference BLAS), same model, same
prompt, greedy. Each side runs in its own subprocess, interleaved and repeated; medians reported.

    python examples/bench_default_install.py [--model DIR] [--max-tokens 64] [--repeats 3]
"""

import argparse
import json
import statistics
import subprocess
import sys

STOCK = """
import sys, mlx.core as mx, mlx_lm
model, tok = mlx_lm.load(sys.argv[1])
ids = tok.apply_chat_template([{"role": "user", "content": sys.argv[2]}], add_generation_prompt=True)
for r in mlx_lm.stream_generate(model, tok, mx.array(ids), max_tokens=int(sys.argv[3])):
    pass
print(r.generation_tps)
"""
OURS = """
import sys
from mlx_safesig import SafetyConfig, load, stream_generate
from mlx_safesig.bench import NO_INSERTION
model, tok = load(sys.argv[1], add_safety=True)
msgs = [{"role": "user", "content": sys.argv[2]}]
config = SafetyConfig(schedule=sys.argv[4], **NO_INSERTION)
for r in stream_generate(model, tok, msgs, max_tokens=int(sys.argv[3]), safety=config):
    pass
print(r.generation_tps)
"""


def run(code, *args):
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                         text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main():
    from mlx_safesig.bench import BENCH_PROMPT
    from mlx_safesig.default_model import default_base_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="mlx-lm model directory (default: the embedded default model)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens decoded per run")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repetitions")
    ap.add_argument("--schedule", default="each", help="safety schedule of our runs")
    args = ap.parse_args()
    model = args.model or str(default_base_model(progress=print))
    stock, ours = [], []
    for _ in range(args.repeats):
        stock.append(run(STOCK, model, BENCH_PROMPT, args.max_tokens))
        ours.append(run(OURS, model, BENCH_PROMPT, args.max_tokens, args.schedule))
    result = {
        "model": model, "max_tokens": args.max_tokens, "schedule": args.schedule,
        "stock_mlx_lm_decode_tok_s": round(statistics.median(stock), 3),
        "mlx_safesig_decode_tok_s": round(statistics.median(ours), 3),
    }
    result["ratio"] = round(result["mlx_safesig_decode_tok_s"] / result["stock_mlx_lm_decode_tok_s"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
