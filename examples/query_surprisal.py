"""Study: does the language model's own surprisal of the query tell a GCG suffix from a benign
prompt? (Issue 26: a token-level anomaly signal; measure before building a defence on it.)

For each prompt (built as the product builds it: ``prepare_prompt``), the model's per-token
surprisal (negative log-probability in nats of each query-slot token given everything before it,
template included; ``mlx_safesig.surprisal``) is averaged over every window of ``w``
consecutive query tokens; the feature is the highest window mean (the whole query's mean when it
is shorter than ``w``).

Groups: the dev split's benign rows (``--per-source`` per source, by a hash of their id), its
harmful rows, and the suffixed requests of ``eval --suite adaptive`` rows files (``--attacks``:
each ``attack`` row's suffix appended to its dev request, as the suite pastes it). The frozen
held-out split is never read: a rows file made on it is refused. Only counts and numbers are
printed, never text.

    python examples/query_surprisal.py --model runs/v17/model --data runs/v17/data \\
        --attacks runs/s20/adaptive-v17-dev-window-query/adaptive.rows.jsonl --out surprisal.json
"""

# ruff: noqa: I001  (import order: mlx_safesig before mlx)
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

import mlx_safesig  # noqa: F401  (preloads OpenBLAS on Linux: must come before mlx)
from mlx_safesig.eval.adaptive_suite import suffixed_messages
from mlx_safesig.eval.detection import row_messages
from mlx_safesig.generate import query_surprisal
from mlx_safesig.surprisal import max_window_mean

WINDOWS = (4, 8, 12)


def read_jsonl(path) -> list:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def attacked(files, harmful: dict) -> list:
    """``(source, messages)`` of every attack row's suffixed request (dev rows files only)."""
    out = []
    for f in files:
        for row in read_jsonl(f):
            if "fingerprint" in row and row["fingerprint"].get("split") == "heldout":
                raise SystemExit(f"query_surprisal: {f} attacks the frozen held-out split.")
            if row.get("kind") == "attack" and str(row["id"]) in harmful:
                request = harmful[str(row["id"])]
                out.append((request["source"], suffixed_messages(row_messages(request), row["suffix"])))
    return out


def summary(values) -> dict:
    a = np.asarray(values)
    return {"n": int(a.size), "min": round(float(a.min()), 3),
            "p50": round(float(np.percentile(a, 50)), 3), "p90": round(float(np.percentile(a, 90)), 3),
            "max": round(float(a.max()), 3)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="A safety model folder (its language model is read).")
    ap.add_argument("--data", required=True, help="A built data folder (its dev split is read).")
    ap.add_argument("--attacks", nargs="*", default=[], help="adaptive.rows.jsonl files of dev runs.")
    ap.add_argument("--per-source", type=int, default=20, help="Benign and harmful rows per source.")
    ap.add_argument("--gate", type=float, nargs="*", default=[9.0],
                    help="Gate thresholds (nats): count the benign rows of each source above each "
                         "(what a surprisal gate at that threshold would refuse).")
    ap.add_argument("--out", default=None, help="Write the numbers here as JSON.")
    args = ap.parse_args(argv)

    from mlx_safesig import load

    model, tokenizer = load(args.model)
    data = Path(args.data)
    picked = defaultdict(list)
    for name in ("benign", "harmful"):
        rows = sorted(read_jsonl(data / f"{name}.dev.jsonl"),
                      key=lambda r: hashlib.sha256(str(r["id"]).encode()).hexdigest())
        for r in rows:
            if len(picked[(name, r["source"])]) < args.per_source:
                picked[(name, r["source"])].append((r["source"], row_messages(r)))
    harmful = {str(r["id"]): r for r in read_jsonl(data / "harmful.dev.jsonl")}
    groups = {"benign": [m for (n, _), v in picked.items() if n == "benign" for m in v],
              "harmful": [m for (n, _), v in picked.items() if n == "harmful" for m in v],
              "suffixed": attacked(args.attacks, harmful)}
    features = {g: [(src, query_surprisal(model, tokenizer, m)) for src, m in rows]
                for g, rows in groups.items() if rows}
    report = {"model": args.model, "split": "dev", "windows": {}}
    for w in WINDOWS:
        per = {g: [max_window_mean(s, w) for _, s in rows] for g, rows in features.items()}
        entry = {g: summary(v) for g, v in per.items()}
        by_source = defaultdict(list)
        for (src, s) in features["benign"]:
            by_source[src].append(max_window_mean(s, w))
        entry["benign_sources"] = {src: dict(summary(v), above={
            str(t): sum(x > t for x in v) for t in args.gate}) for src, v in sorted(by_source.items())}
        for t in args.gate:
            print(f"window {w}, gate {t}: benign above it, per source: " + ", ".join(
                f"{src} {e['above'][str(t)]}/{e['n']}" for src, e in entry["benign_sources"].items()))
        if "suffixed" in per:
            top = max(per["benign"])
            entry["suffixed_above_benign_max"] = sum(v > top for v in per["suffixed"])
        report["windows"][str(w)] = entry
        print(f"window {w}: " + "; ".join(
            f"{g} n={e['n']} min {e['min']:.2f} p50 {e['p50']:.2f} max {e['max']:.2f}"
            for g, e in entry.items() if g in features))
        if "suffixed" in per:
            print(f"  suffixed above the highest benign value: "
                  f"{entry['suffixed_above_benign_max']}/{len(per['suffixed'])}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
