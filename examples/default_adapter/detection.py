"""[CLS] query-verdict detection on a data split: the share of harmful prompts flagged and of benign
prompts wrongly flagged, `score(model, tok, [{"role": "user", "content": prompt}]) >= threshold`.

    python examples/default_adapter/detection.py --data data --split dev [--model DIR]

Harmful rows of the Do-Not-Answer categories the default adapter is not trained on
(mlx_safesig.align.rows --drop-categories) are counted apart, as "harmful_other": they are
mostly questions a safe assistant answers with care. Counts are also given per source (and
Do-Not-Answer category).
Prints counts and rates only (never prompt text); --json for one JSON object.
--benign-file adds a group of benign prompts from a prompt file (one per line, '#' lines
ignored), counted per '#' category: examples/default_adapter/fresh_benign_dev.txt (held out, never
trained on, written apart from the other prompt files), or extra_benign.txt for a model that was not
trained on it (v11 and v12 were).
--sweep T1,T2,... also counts each group at those thresholds (the same scores, no extra model
calls): the operating points the head reaches, for reading only -- the shipped threshold is 0.5.
"""

import argparse
import json
import sys
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data", help="output folder of examples/data/build_data.py")
    ap.add_argument("--split", default="dev", help="train, dev or test")
    ap.add_argument("--model", default=None, help="safety model (default: the embedded one)")
    ap.add_argument("--adapter-path", default=None, help="adapters from `mlx-safesig train`")
    ap.add_argument("--threshold", type=float, default=None, help="default: the model's")
    ap.add_argument("--drop-categories", default=None,
                    help="harmful categories counted apart (default: mlx_safesig.align.rows's)")
    ap.add_argument("--benign-file", default=None,
                    help="also score the benign prompts of this file (group benign_file)")
    ap.add_argument("--sweep", default=None,
                    help="comma-separated thresholds to count each group at as well, e.g. 0.3,0.7")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    try:
        sweep = [float(t) for t in args.sweep.split(",")] if args.sweep else []
    except ValueError:
        ap.error(f"--sweep: not a comma-separated list of numbers: {args.sweep}")
    if any(not 0 < t < 1 for t in sweep):
        ap.error(f"--sweep: thresholds must be between 0 and 1: {args.sweep}")
    if args.benign_file and not Path(args.benign_file).is_file():
        ap.error(f"--benign-file: no such file: {args.benign_file}")
    from mlx_safesig.align.rows import DROP_CATEGORIES, read_prompt_rows

    drop = set(filter(None, (args.drop_categories if args.drop_categories is not None
                             else DROP_CATEGORIES).split(",")))

    from mlx_safesig import load, score

    model, tok = load(args.model, adapter_path=args.adapter_path)
    threshold = args.threshold or model.args.safesig["threshold"]
    result = {"split": args.split, "threshold": threshold}
    groups = {"harmful": [], "harmful_other": [], "benign": []}
    for kind in ("harmful", "benign"):
        for line in open(Path(args.data) / f"{kind}.{args.split}.jsonl"):
            r = json.loads(line)
            other = kind == "harmful" and r.get("category") in drop
            groups["harmful_other" if other else kind].append(r)
    if args.benign_file:
        groups["benign_file"] = [dict(r, source=Path(args.benign_file).name)
                                 for r in read_prompt_rows(args.benign_file)]
    for name, rows in groups.items():
        if not rows:
            continue
        by_source, scores = {}, []
        for r in rows:
            p = score(model, tok, [{"role": "user", "content": r["text"]}])
            scores.append(p)
            by_category = r["source"] in ("donotanswer", "edgy_benign") or name == "benign_file"
            key = r["source"] + ("/" + r["category"] if by_category and r.get("category") else "")
            n, k = by_source.get(key, (0, 0))
            by_source[key] = (n + 1, k + int(p >= threshold))
        flagged = sum(k for _, k in by_source.values())
        result[name] = {"n": len(rows), "flagged": flagged, "rate": round(flagged / len(rows), 4),
                        "by_source": {s: {"n": n, "flagged": k} for s, (n, k) in by_source.items()}}
        print(f"{name}: {flagged}/{len(rows)} flagged ({flagged / len(rows):.1%})", file=sys.stderr)
        if sweep:
            result[name]["sweep"] = {str(t): sum(p >= t for p in scores) for t in sweep}
            print(f"  {name} flagged at " + ", ".join(f"{t}: {k}" for t, k in
                                                    result[name]["sweep"].items()), file=sys.stderr)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
