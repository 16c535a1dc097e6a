"""Is randomized smoothing of the query verdict (``mlx_safesig/smoothing.py``) worth its cost on a
model? Three counts, plain verdict against smoothed verdict, before anything wires it into decoding:

1. suffixes an `eval --suite adaptive` run found against the plain verdict (``--run``): how many
   of those requests the smoothed verdict flags again (the non-adaptive test of SmoothLLM; an
   attacker who knows the smoothing is the next step, only if this one is promising);
2. the same requests without a suffix: does the smoothed verdict still flag them?
3. the detection rows of ``--split`` (``detection_plan``, ``--limit`` per source, the suites of
   ``--suites``): harmful and benign rows flagged per source, plain and smoothed.

Counts and source names only; no prompt or suffix text is printed. Writes ``--out`` (JSON).

    python examples/smoothing_study.py --model runs/s31/smollm135-lr5e-5-model \\
        --data runs/v19/data --run runs/s33/adv-base --limit 10 --out runs/s34/smooth.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlx_safesig  # noqa: F401  (before mlx: the OpenBLAS preload on Linux)
from mlx_safesig import load
from mlx_safesig.eval.adaptive_suite import ROWS_FILE, suffixed_messages
from mlx_safesig.eval.detection import detection_plan, row_messages, split_rows
from mlx_safesig.generate import score_many, smoothed_scores
from mlx_safesig.model import SafesigError
from mlx_safesig.progress import progress_bar
from mlx_safesig.prompt import wrap_tokenizer
from mlx_safesig.smoothing import SMOOTH_RATE, Smoother


def group(source: str) -> str:
    return "es/fr" if source.endswith(("_es", "_fr", "_de")) else "en"


def tally(rows, plain, smooth, threshold) -> dict:
    """Flagged counts per source and per language group, plain and smoothed."""
    out: dict = {"sources": {}, "groups": {}}
    for r, p, s in zip(rows, plain, smooth):
        for table, key in ((out["sources"], r["source"]),
                           (out["groups"], f"{'harmful' if r['label'] else 'benign'} "
                                           f"{group(r['source'])}")):
            c = table.setdefault(key, {"n": 0, "plain": 0, "smoothed": 0})
            c["n"] += 1
            c["plain"] += p >= threshold
            c["smoothed"] += s >= threshold
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="The model (folder) to study.")
    ap.add_argument("--data", required=True, help="The data folder (`align` build output).")
    ap.add_argument("--run", default=None, help="An `eval --suite adaptive` --out folder run on "
                    "this model and data: its suffixes are re-scored (optional).")
    ap.add_argument("--split", default="dev", help="Split to read (default: dev).")
    ap.add_argument("--limit", type=int, default=10, help="Detection rows per source (default 10).")
    ap.add_argument("--suites", default="plain,wrapped",
                    help="Detection suites to score (default: plain,wrapped).")
    ap.add_argument("--copies", type=int, default=8, help="Perturbed copies (default 8).")
    ap.add_argument("--rate", type=float, default=SMOOTH_RATE,
                    help=f"Chance each query token is replaced (default {SMOOTH_RATE}).")
    ap.add_argument("--out", required=True, help="JSON file to write.")
    args = ap.parse_args(argv)
    try:
        model, tokenizer = load(args.model)
        tokenizer = wrap_tokenizer(tokenizer)
        threshold = model.args.safesig["threshold"]
        smoother = Smoother(model, tokenizer)

        def smooth(messages, bar) -> list:
            return smoothed_scores(model, tokenizer, messages, args.copies, args.rate,
                                   progress=bar.update, smoother=smoother)

        report = {"model": args.model, "data": args.data, "split": args.split,
                  "copies": args.copies, "rate": args.rate, "threshold": threshold,
                  "judge": "query verdict p >= threshold (plain; mean over copies: smoothed)"}
        if args.run:
            rows = [json.loads(line) for line in open(Path(args.run) / ROWS_FILE)]
            broken = [r for r in rows if r.get("kind") == "attack" and r["steps_to_success"] is not None]
            by_id = {str(r["id"]): r for r in split_rows(args.data, args.split)}
            requests = [row_messages(by_id[r["id"]]) for r in broken]
            attacked = [suffixed_messages(m, r["suffix"]) for m, r in zip(requests, broken)]
            with progress_bar(2 * len(broken), "suffixes", "row") as bar:
                plain = score_many(model, tokenizer, requests + attacked)
                smoothed = smooth(requests + attacked, bar)
            n = len(broken)
            report["suffixes"] = {
                "run": args.run, "broken": n,
                "request_flagged": {"plain": sum(p >= threshold for p in plain[:n]),
                                    "smoothed": sum(p >= threshold for p in smoothed[:n])},
                "with_suffix_flagged": {"plain": sum(p >= threshold for p in plain[n:]),
                                        "smoothed": sum(p >= threshold for p in smoothed[n:])},
                "p_with_suffix": {"plain": [round(p, 4) for p in plain[n:]],
                                  "smoothed": [round(p, 4) for p in smoothed[n:]]}}
        plan = detection_plan(args.data, args.split, args.limit)
        report["detection"] = {}
        for suite in args.suites.split(","):
            if suite not in plan:
                raise SafesigError(f"no {suite!r} suite in {args.data} ({', '.join(plan)}).")
            rows = plan[suite]
            messages = [row_messages(r) for r in rows]
            with progress_bar(len(rows), f"{suite} smoothed", "row") as bar:
                plain = score_many(model, tokenizer, messages)
                smoothed = smooth(messages, bar)
            report["detection"][suite] = tally(rows, plain, smoothed, threshold)
    except (SafesigError, OSError, KeyError) as e:
        sys.exit(f"error: {e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    if "suffixes" in report:
        s = report["suffixes"]
        w = s["with_suffix_flagged"]
        print(f"suffixes found against the plain verdict: {s['broken']}; flagged with the suffix "
              f"plain {w['plain']}, smoothed {w['smoothed']};"
              f" requests alone flagged plain {s['request_flagged']['plain']}, smoothed "
              f"{s['request_flagged']['smoothed']}")
    for suite, t in report["detection"].items():
        for key, c in sorted(t["groups"].items()):
            print(f"{suite:8s} {key:14s} flagged plain {c['plain']:3d}/{c['n']:<3d} "
                  f"smoothed {c['smoothed']:3d}/{c['n']}")


if __name__ == "__main__":
    main()
