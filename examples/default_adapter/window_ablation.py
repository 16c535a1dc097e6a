"""Window supervision, with and without: two adapters trained alike except ``--probes``, measured on
the same dev rows (``valid.jsonl`` of mlx_safesig.align.rows, never trained on) with the same
window probes.

    python examples/default_adapter/window_ablation.py --data data/adapter \\
        --adapter with=runs/probes4 --adapter without=runs/probes0

For each adapter: the query [CLS] verdict (accuracy / precision / recall / F1 at the threshold) and
the window probes -- the [CLS] over windows of the base model's own harmful continuations (should
say malicious) and of benign answers (should say benign), built by the trainer's Batcher with
exactly the masks and positions of the generation-time probe -- as recall and false-positive rate.
Every adapter sees the same probe windows (same seed). Prints metrics only, never text.
"""

# ruff: noqa: I001  (import order: mlx_safesig before mlx)

import argparse
import json
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/adapter", help="folder with valid.jsonl")
    ap.add_argument("--model", default=None, help="base model (default: the embedded base model)")
    ap.add_argument("--adapter", action="append", required=True, metavar="NAME=DIR",
                    help="an adapter folder from `mlx-safesig train` (repeat)")
    ap.add_argument("--probes", type=int, default=4, help="window probes per response")
    ap.add_argument("--probe-schedule", default="annealing",
                    help="place the windows where this generation schedule probes (as train)")
    ap.add_argument("--batch-size", type=int, default=8, help="rows per forward")
    ap.add_argument("--max-seq-length", type=int, default=768, help="longest row in tokens")
    ap.add_argument("--sweep", type=float, action="append", default=[], metavar="T",
                    help="also report recall / false-positive rate at threshold T (repeat)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    import mlx_safesig  # noqa: F401  (first: it preloads OpenBLAS on Linux before mlx loads)
    import mlx.core as mx
    from mlx_safesig import load
    from mlx_safesig.data import load_jsonl
    from mlx_safesig.default_model import default_base_model
    from mlx_safesig.train import Batcher, TrainConfig, evaluate

    base = args.model or str(default_base_model(progress=lambda m: print(m, file=sys.stderr)))
    config = TrainConfig(probes=args.probes, probe_schedule=args.probe_schedule,
                         max_seq_length=args.max_seq_length,
                         batch_size=args.batch_size)
    results = {}
    for spec in args.adapter:
        name, _, path = spec.partition("=")
        model, tok = load(base, adapter_path=path)
        batcher = Batcher(model, tok, config, mx.distributed.init())
        rows = load_jsonl(f"{args.data}/valid.jsonl", tok, config.max_seq_length,
                          lambda ex, b=batcher: len(b.probes(ex)))
        model.eval()
        report = evaluate(model, rows, batcher, config.batch_size, sweep=args.sweep)
        results[name] = {"adapter": path, "rows": len(rows), **{
            k: (round(v, 4) if isinstance(v, float) else v) for k, v in report.items()}}
        r = results[name]
        print(f"{name}: query acc {r['accuracy']:.3f} P {r['precision']:.3f} R {r['recall']:.3f} "
              f"F1 {r['f1']:.3f}; probes ({r['probes']}) recall {r['probe_recall']:.3f} "
              f"FPR {r['probe_false_positive_rate']:.3f}; lm loss {r['lm_loss']:.3f}",
              file=sys.stderr)
        for t, v in report.get("sweep", {}).items():
            print(f"  threshold {t}: query recall {v['query']['recall']:.3f} FPR "
                  f"{v['query']['false_positive_rate']:.3f}; probes recall "
                  f"{v['probe']['recall']:.3f} FPR {v['probe']['false_positive_rate']:.3f}",
                  file=sys.stderr)
    if args.json:
        print(json.dumps({"probes": args.probes, "results": results}))


if __name__ == "__main__":
    main()
