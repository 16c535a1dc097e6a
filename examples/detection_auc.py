"""Threshold-free view of an `eval --suite detection` run: the ROC AUC of the query verdict
between harmful and benign sources, read from the run's saved verdicts (no forward pass).

Counts at p >= 0.5 (`compare_detection.py`) mix two things when models are compared: how well
the verdict separates harmful from benign, and where its scores sit. A model flagging more of a
left-out harmful source may just flag more of everything. The AUC of one harmful source against
one benign source (or against all plain English benign sources) is the separation alone. Scores
come from `detection.verdicts.jsonl` of the run (the same rows, the same model: every verdict is
found there or the script stops). Counts only; no prompt text is printed.

    python examples/detection_auc.py --model runs/s31/smollm135-lr5e-5-model \\
        --data runs/v19/data --run runs/s31/dev-det-smollm135-lr5e-5 --limit 30 \\
        --harmful donotanswer,donotanswer_es,donotanswer_fr --benign rho_benign
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx_safesig  # noqa: F401  (before mlx: the OpenBLAS preload on Linux)
from mlx_safesig import load
from mlx_safesig.eval.detection import VERDICTS_FILE, detection_plan, row_messages
from mlx_safesig.eval.store import VerdictCache
from mlx_safesig.generate import score_many
from mlx_safesig.model import SafesigError


def auc(pos: list, neg: list) -> float:
    """P(a harmful row scores above a benign one), ties counted half (Mann-Whitney)."""
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


class CachedOnly(VerdictCache):
    """The run's verdicts; a verdict not in them is an error, never computed."""

    def __contains__(self, key):
        if not super().__contains__(key):
            raise SystemExit("error: a row's verdict is not in the run's verdicts: a different "
                             "--data, --split, --limit or model than the run's.")
        return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="The model the detection run scored.")
    ap.add_argument("--data", required=True, help="The data folder of the run.")
    ap.add_argument("--run", required=True, help="The run's --out folder (its verdicts file).")
    ap.add_argument("--split", default="dev", help="The run's --split (default: dev).")
    ap.add_argument("--limit", type=int, default=None, help="The run's --limit.")
    ap.add_argument("--suite", default="plain", help="Detection suite (default: plain).")
    ap.add_argument("--harmful", required=True, help="Comma-separated harmful sources, each "
                    "reported on its own.")
    ap.add_argument("--benign", required=True, help="Comma-separated benign sources, each the "
                    "negative set on its own; all plain English benign sources are added as one.")
    args = ap.parse_args(argv)
    verdicts = Path(args.run) / VERDICTS_FILE
    if not verdicts.is_file():
        raise SystemExit(f"error: {verdicts} does not exist.")
    rows = detection_plan(args.data, args.split, args.limit).get(args.suite)
    if rows is None:
        raise SystemExit(f"error: the run has no {args.suite!r} suite.")
    model, tokenizer = load(args.model)
    try:
        cache = CachedOnly(verdicts, model, resume=True)
    except SafesigError as e:  # e.g. the verdicts of another model
        raise SystemExit(f"error: {e}") from None
    scores = score_many(model, tokenizer, [row_messages(r) for r in rows], cache=cache)
    by_source = {}
    for row, p in zip(rows, scores):
        by_source.setdefault((row["source"], row["label"]), []).append(p)
    english_benign = [p for row, p in zip(rows, scores)
                      if row["label"] == 0 and row.get("lang", "en") == "en"]
    negatives = {b: by_source.get((b, 0)) for b in args.benign.split(",")}
    negatives["all English benign"] = english_benign
    for h in args.harmful.split(","):
        pos = by_source.get((h, 1))
        if not pos:
            raise SystemExit(f"error: no harmful rows of source {h!r} in the run.")
        for name, neg in negatives.items():
            if not neg:
                raise SystemExit(f"error: no benign rows of source {name!r} in the run.")
            print(f"{args.suite}  {h} ({len(pos)}) vs {name} ({len(neg)}): AUC {auc(pos, neg):.3f}")


if __name__ == "__main__":
    sys.exit(main())
