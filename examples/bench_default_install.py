"""Decode speed of mlx-safesig as installed (OpenBLAS preloaded on Linux) against stock mlx-lm in a
process that never imports mlx_safesig (the mlx[cpu] wheel's reference BLAS), same model, same
prompt, greedy. Each side runs in its own subprocess, interleaved and repeated; medians reported.

    python examples/bench_default_install.py [--model DIR] [--max-tokens 64] [--repeats 3] [--ceiling]

--ceiling adds a third subprocess (OpenBLAS loaded) that times only the weight reads of one decode
step: the matrix-vector products of every projection of every layer, in order and each feeding the
next, plus the LM head, compiled, nothing else (no attention, norms, cache or sampling): the
fastest a decoder built from these fp32 products can go here (``ceiling_tok_s``). It also times
one large matrix-vector product of the same total size (``one_matvec_gb_s``: the memory bandwidth
OpenBLAS reaches; ``bandwidth_tok_s``: the model's weights read once at that rate, the bound for
any fp32 decoder) and one LM-head product in float32, bfloat16 and 8/4-bit quantized form, which
shows why fp32 stays the CPU format.
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
CEILING = """
import sys, time, json, mlx_safesig, mlx.core as mx, mlx_lm
model, tok = mlx_lm.load(sys.argv[1])
layers = [[m.weight for _, m in layer.named_modules() if hasattr(m, "weight") and m.weight.ndim == 2]
          for layer in model.model.layers]
head = model.model.embed_tokens.weight
def step(x):
    # one decode step's weight reads, in order and dependent like a real step (each product
    # feeds the next), nothing else: no attention, norms, cache or sampling
    for weights in layers:
        for w in weights:
            x = (x[..., : w.shape[1]] if x.shape[-1] >= w.shape[1] else
                 mx.concatenate([x] * (w.shape[1] // x.shape[-1] + 1), -1)[..., : w.shape[1]]) @ w.T
    return mx.argmax(x[..., : head.shape[1]] @ head.T)
def timed(fn, n):
    mx.eval(fn()); t = time.perf_counter()
    for _ in range(n):
        mx.eval(fn())
    return (time.perf_counter() - t) / n
x = mx.random.normal((1, head.shape[1]))
step = mx.compile(step)
weight_bytes = sum(w.nbytes for ws in layers for w in ws) + head.nbytes
big = mx.random.normal((8 * head.shape[1], weight_bytes // (32 * head.shape[1])))
xb = mx.random.normal((1, big.shape[1]))
mx.eval(big, xb)
result = {"weight_mb": round(weight_bytes / 1e6, 1),
          "ceiling_tok_s": round(1 / timed(lambda: step(x), 30), 3),
          "one_matvec_gb_s": round(big.nbytes / timed(lambda: xb @ big.T, 20) / 1e9, 2),
          "lm_head_ms": {}}
result["bandwidth_tok_s"] = round(result["one_matvec_gb_s"] * 1e9 / weight_bytes, 3)
forms = {"float32": lambda: x @ head.T}
for dt in ("bfloat16", "float16"):
    h, xh = head.astype(getattr(mx, dt)), x.astype(getattr(mx, dt))
    forms[dt] = lambda h=h, xh=xh: xh @ h.T
for bits in (8, 4):
    q = mx.quantize(head, group_size=64, bits=bits)
    forms[f"q{bits}"] = lambda q=q, b=bits: mx.quantized_matmul(x, *q, transpose=True, group_size=64,
                                                                  bits=b)
for name, fn in forms.items():
    result["lm_head_ms"][name] = round(timed(fn, 10) * 1e3, 2)
print(json.dumps(result))
"""


def run(code, *args):
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    from mlx_safesig.bench import BENCH_PROMPT
    from mlx_safesig.default_model import default_base_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="mlx-lm model directory (default: the embedded default model)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens decoded per run")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repetitions")
    ap.add_argument("--schedule", default="each", help="safety schedule of our runs")
    ap.add_argument("--ceiling", action="store_true",
                    help="also time the weight reads alone: the fp32 decode speed limit here")
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
    if args.ceiling:
        ceiling = run(CEILING, model)
        result.update(ceiling)
        result["ceiling_ratio"] = round(ceiling["ceiling_tok_s"] / result["stock_mlx_lm_decode_tok_s"],
                                        3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
