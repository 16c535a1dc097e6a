"""[CLS] query-verdict detection on a data split: the share of harmful prompts flagged and of benign
prompts wrongly flagged, `score(model, tok, [{"role": "user", "content": prompt}]) >= threshold`.

    python examples/default_adapter/detection.py --data data --split dev [--model DIR]

Prints counts and rates only (never prompt text); --json for one JSON object.
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
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    from mlx_safesig import load, score

    model, tok = load(args.model, adapter_path=args.adapter_path)
    threshold = args.threshold or model.args.safesig["threshold"]
    result = {"split": args.split, "threshold": threshold}
    for name in ("harmful", "benign"):
        rows = [json.loads(x) for x in open(Path(args.data) / f"{name}.{args.split}.jsonl")]
        by_source = {}
        for r in rows:
            p = score(model, tok, [{"role": "user", "content": r["text"]}])
            n, k = by_source.get(r["source"], (0, 0))
            by_source[r["source"]] = (n + 1, k + int(p >= threshold))
        flagged = sum(k for _, k in by_source.values())
        result[name] = {"n": len(rows), "flagged": flagged, "rate": round(flagged / len(rows), 4),
                        "by_source": {s: {"n": n, "flagged": k} for s, (n, k) in by_source.items()}}
        print(f"{name}: {flagged}/{len(rows)} flagged ({flagged / len(rows):.1%})", file=sys.stderr)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
