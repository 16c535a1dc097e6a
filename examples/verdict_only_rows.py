"""Study data: training rows that teach the query verdict only, for comparing base models.

Issue 22 asks whether a larger base would make the `[CLS]` verdict generalize better. The full
recipe needs the base model's own answers to every prompt (the rows stage: hours on a 2-core
CPU, ~4x that for a 0.5B base), but the verdict does not: these rows give every prompt the same
short answer (``--response``, default "OK."), so `mlx-safesig train` learns the verdict and
little else, on any base, from the built data alone. Compare bases on the same rows and steps,
then score the dev split (`mlx-safesig eval --suite detection --split dev`); sources left out
with ``--leave-out`` show how the verdict does on a source it never saw.

Reads ``harmful.train.jsonl`` / ``benign.train.jsonl`` (train.jsonl) and the ``.dev`` files
(valid.jsonl) of a built data folder (``python -m mlx_safesig.align.build``): the training
sources only; the frozen held-out files are never opened. Prints counts, never text.

    python examples/verdict_only_rows.py --data runs/v19/data --out runs/verdict/rows \\
        --leave-out donotanswer,rho_benign
    mlx-safesig train --model M --add-safety --data runs/verdict/rows --adapter-path A ...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from mlx_safesig.align.records import row_messages
from mlx_safesig.align.rows import read_jsonl
from mlx_safesig.align.sources import base_source

FILES = {"train": "train.jsonl", "dev": "valid.jsonl"}


def verdict_rows(rows: list, label: int, response: str, leave_out: set, max_chars: int) -> list:
    """One training row per prompt: its messages, the fixed ``response``, the label; rows of a
    left-out source (or of its translations) and prompts longer than ``max_chars`` are dropped."""
    out = []
    for r in rows:
        messages = row_messages(r)
        if base_source(r["source"]) in leave_out or sum(len(m["content"]) for m in messages) > max_chars:
            continue
        out.append({"messages": [*messages, {"role": "assistant", "content": response}],
                    "label": label, "source": r["source"]})
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="A built data folder.")
    ap.add_argument("--out", type=Path, required=True, help="Where train.jsonl and valid.jsonl go.")
    ap.add_argument("--response", default="OK.", help="The answer every row gets (default: OK.).")
    ap.add_argument("--leave-out", default="",
                    help="Comma-separated training sources (and their translations) not written.")
    ap.add_argument("--max-chars", type=int, default=1500,
                    help="Leave out prompts longer than this many characters (default 1500: under "
                         "train's --max-seq-length 768 even for code, at 2-3 characters a token).")
    args = ap.parse_args(argv)
    leave_out = {s for s in args.leave_out.split(",") if s}
    files = {(split, kind): args.data / f"{kind}.{split}.jsonl"
             for split in FILES for kind in ("harmful", "benign")}
    for path in files.values():
        if not path.exists():
            raise SystemExit(f"verdict_only_rows: {path} does not exist (build the data first).")
    data = {key: read_jsonl(path) for key, path in files.items()}
    sources = {base_source(r["source"]) for (split, _), rows in data.items() if split == "train"
               for r in rows}
    if leave_out - sources:
        raise SystemExit("verdict_only_rows: no training source named "
                         + ", ".join(sorted(leave_out - sources)) + ".")
    args.out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, name in FILES.items():
        rows = (verdict_rows(data[(split, "harmful")], 1, args.response, leave_out, args.max_chars)
                + verdict_rows(data[(split, "benign")], 0, args.response, leave_out, args.max_chars))
        counts[split] = {"harmful": sum(r["label"] for r in rows),
                         "benign": sum(1 - r["label"] for r in rows)}
        tmp = args.out / (name + ".tmp")
        lines = sorted((json.dumps(r) for r in rows),  # both labels mixed: a partial validation
                       key=lambda x: hashlib.sha256(x.encode()).hexdigest())  # sees both
        tmp.write_text("".join(x + "\n" for x in lines))
        tmp.replace(args.out / name)
    report = {"counts": counts, "left_out": sorted(leave_out),
              "trained_sources": len(sources - leave_out)}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
