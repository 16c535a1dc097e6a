"""Study: does the language model's own surprisal of the query tell a GCG suffix from a benign
prompt? (Issue 26: a token-level anomaly signal; measure before building a defence on it.)

For each prompt (built as the product builds it: ``prepare_prompt``), the model's per-token
surprisal (negative log-probability in nats of each query-slot token given everything before it,
template included; ``mlx_safesig.surprisal``) is averaged over every window of ``w``
consecutive query tokens; the feature is the highest window mean (the whole query's mean when it
is shorter than ``w``). A second feature, ``excess``, does the same with each token's surprisal
minus the entropy of the model's prediction there (what the model expected to be surprised by):
is an adversarial suffix still an outlier once text the model finds hard everywhere (another
language, code, names) is discounted? Benign counts above each gate are also given per language.

Groups: the dev split's benign rows (``--per-source`` per source, by a hash of their id), its
harmful rows, and the suffixed requests of ``eval --suite adaptive`` rows files (``--attacks``:
each ``attack`` row's suffix appended to its dev request, as the suite pastes it). The frozen
held-out split is never read: a rows file made on it is refused. Only counts and numbers are
printed, never text.

    python examples/query_surprisal.py --data runs/v19/data --per-source 40 --gate 5 6 7 8 9 10 11 \\
        --attacks runs/s30/adaptive-nogate/adaptive.rows.jsonl --out surprisal.json
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
from mlx_safesig.prompt import prepare_prompt, wrap_tokenizer
from mlx_safesig.surprisal import max_window_mean, token_surprisal

WINDOWS = (4, 8, 12)
FEATURES = ("nats", "excess")


def token_stats(model, tokenizer, messages, check: bool = True) -> dict:
    """Per query token (slot order, slot 0 left out as the gate leaves it out): ``nats``, the
    surprisal, equal to ``query_surprisal``'s (``check``: compared, at the cost of a second
    forward), and ``excess``, that minus the entropy of the prediction. One causal forward of
    the prompt: query tokens never see the ``[CLS]`` row, so their predictions are the prefill's."""
    import mlx.core as mx

    prepared = prepare_prompt(wrap_tokenizer(tokenizer), messages)
    ids, slots = list(prepared.ids), [s for s in prepared.query_slots if s > 0]
    logits = model.logits(model.hidden(mx.array(ids)[None], positions=0)[0]).astype(mx.float32)
    rows = logits[mx.array([s - 1 for s in slots])]
    nats = token_surprisal(rows, mx.array([ids[s] for s in slots]))
    logp = rows - mx.logsumexp(rows, axis=-1, keepdims=True)
    entropy = -(mx.exp(logp) * logp).sum(axis=-1)
    nats, entropy = np.array(nats, dtype=np.float64), np.array(entropy, dtype=np.float64)
    if check and not np.allclose(nats, query_surprisal(model, tokenizer, messages), atol=1e-2):
        raise SystemExit("query_surprisal: the causal forward disagrees with the prefill's surprisal.")
    return {"nats": nats, "excess": nats - entropy}


def read_jsonl(path) -> list:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def attacked(files, harmful: dict) -> list:
    """``(source, messages, lang)`` of every attack row's suffixed request (dev rows files only)."""
    out = []
    for f in files:
        for row in read_jsonl(f):
            if "fingerprint" in row and row["fingerprint"].get("split") == "heldout":
                raise SystemExit(f"query_surprisal: {f} attacks the frozen held-out split.")
            if row.get("kind") == "attack" and str(row["id"]) in harmful:
                request = harmful[str(row["id"])]
                out.append((request["source"], suffixed_messages(row_messages(request), row["suffix"]),
                            request.get("lang", "en")))
    return out


def summary(values) -> dict:
    a = np.asarray(values)
    return {"n": int(a.size), "min": round(float(a.min()), 3),
            "p50": round(float(np.percentile(a, 50)), 3), "p90": round(float(np.percentile(a, 90)), 3),
            "max": round(float(a.max()), 3)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None,
                    help="A safety model folder (its language model is read; default: the embedded "
                         "default model).")
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
                picked[(name, r["source"])].append((r["source"], row_messages(r), r.get("lang", "en")))
    harmful = {str(r["id"]): r for r in read_jsonl(data / "harmful.dev.jsonl")}
    groups = {"benign": [m for (n, _), v in picked.items() if n == "benign" for m in v],
              "harmful": [m for (n, _), v in picked.items() if n == "harmful" for m in v],
              "suffixed": attacked(args.attacks, harmful)}
    stats, first = {}, True  # the prefill's surprisal is compared on the first prompt only
    for g, rows in groups.items():
        for src, m, lang in rows:
            stats.setdefault(g, []).append((src, lang, token_stats(model, tokenizer, m, check=first)))
            first = False
    report = {"model": args.model, "split": "dev", "features": {}}
    for feature in FEATURES:
        report["features"][feature] = entry_f = {}
        for w in WINDOWS:
            entry_f[str(w)] = window_report(stats, feature, w, args.gate)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return report


def window_report(stats: dict, feature: str, w: int, gates) -> dict:
    """The feature's highest window mean per group, and per benign source and language."""
    per = {g: [max_window_mean(t[feature], w) for _, _, t in rows] for g, rows in stats.items()}
    entry = {g: summary(v) for g, v in per.items()}
    for key, at in (("benign_sources", 0), ("benign_languages", 1)):
        by = defaultdict(list)
        for row, v in zip(stats["benign"], per["benign"]):
            by[row[at]].append(v)
        entry[key] = {k: dict(summary(v), above={str(t): sum(x > t for x in v) for t in gates})
                      for k, v in sorted(by.items())}
    if "suffixed" in per:
        top = max(per["benign"])
        entry["suffixed_above_benign_max"] = sum(v > top for v in per["suffixed"])
        entry["suffixed_above_benign_p99"] = sum(
            v > float(np.percentile(per["benign"], 99)) for v in per["suffixed"])
        entry["suffixed_above"] = {str(t): sum(v > t for v in per["suffixed"]) for t in gates}
    print(f"{feature}, window {w}: " + "; ".join(
        f"{g} n={e['n']} min {e['min']:.2f} p50 {e['p50']:.2f} p90 {e['p90']:.2f} max {e['max']:.2f}"
        for g, e in entry.items() if g in per))
    print("  benign per language, max: " + ", ".join(
        f"{k} {e['max']:.2f} (n={e['n']})" for k, e in entry["benign_languages"].items()))
    for t in gates:
        print(f"  gate {t}: benign above it per language: " + ", ".join(
            f"{k} {e['above'][str(t)]}/{e['n']}" for k, e in entry["benign_languages"].items()))
    if "suffixed" in per:
        print(f"  suffixed above the highest benign value: {entry['suffixed_above_benign_max']}"
              f"/{len(per['suffixed'])}; above the benign 99th percentile: "
              f"{entry['suffixed_above_benign_p99']}/{len(per['suffixed'])}")
        print("  gate: all benign above it, suffixed above it: " + ", ".join(
            f"{t} {sum(x > t for x in per['benign'])}/{len(per['benign'])} "
            f"{entry['suffixed_above'][str(t)]}/{len(per['suffixed'])}" for t in gates))
    return entry


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
