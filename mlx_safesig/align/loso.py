"""Leave-one-source-out: an ``align --leave-out S`` run trains on every training source but ``S``
and scores all of ``S``'s rows (every split: it trained on none of them) with its query verdict;
``loso_table`` gathers such runs into one table with the worst left-out source of each label.

This measures how the recipe generalizes to a source it did not see without touching the frozen
held-out sources (HELDOUT.md): a left-out run evaluates only what it left out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from ..model import SafesigError
from .card import LEFT_OUT_FILE, LEFT_OUT_SUITES, left_out_lines, left_out_scope, pct
from .rows import EXTRA_SOURCE, read_prompt_rows
from .sources import HELDOUT_SOURCES, SOURCES, prompt_sources


def training_sources() -> tuple[str, ...]:
    """The sources a run can leave out: the builder's training sources (the optional ones too)
    and --extra-benign's."""
    every = tuple(SOURCES)
    return prompt_sources(1, "train", every) + prompt_sources(0, "train", every) + (EXTRA_SOURCE,)


def parse_leave_out(value: str) -> tuple[str, ...]:
    """``--leave-out``'s comma-separated names, checked; one sentence for a bad one."""
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    for name in names:
        if name in HELDOUT_SOURCES:
            raise SafesigError(f"--leave-out: {name} is a held-out source (HELDOUT.md): it is never "
                               "trained on, so there is nothing to leave out.")
        if name not in training_sources():
            raise SafesigError(f"--leave-out: unknown source {name!r}; choose from "
                               f"{', '.join(training_sources())}.")
    return names


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def left_out_rows(data_dir, names: Sequence[str], extra_benign: Optional[Path] = None) -> list[dict]:
    """Every row of the sources ``names`` in the builder's output ``data_dir`` (all splits), and
    the prompts of ``extra_benign`` not already a row of the data when ``EXTRA_SOURCE`` is named."""
    data = Path(data_dir)
    rows, known = [], set()
    for kind, label in (("harmful", 1), ("benign", 0)):
        for r in _read_jsonl(data / f"{kind}.jsonl"):
            known.add(r["id"])
            if r["source"] in names:
                rows.append(dict(r, label=label))
    if EXTRA_SOURCE in names and extra_benign:
        rows += [dict(r, source=EXTRA_SOURCE, label=0) for r in read_prompt_rows(extra_benign)
                 if r["id"] not in known]
    return rows


def detect_left_out(model, tokenizer, data_dir, names: Sequence[str], out_dir,
                    extra_benign: Optional[Path] = None, limit: Optional[int] = None) -> dict:
    """The query verdict on the left-out sources' rows, as they are and in conversations
    (``detection.run_detection``); written to ``out_dir/left-out.json`` and returned."""

    from ..eval.detection import SWEEP, VERDICTS_FILE, held_out_rows, run_detection
    from ..eval.report import atomic_write
    from ..eval.store import VerdictCache
    from ..progress import progress_bar

    rows = left_out_rows(data_dir, names, extra_benign)
    if not rows:
        raise SafesigError(f"{data_dir} has no rows of {', '.join(names)} to score.")
    plan = {suite: held_out_rows(rows, [], [suite], limit) for suite in LEFT_OUT_SUITES}
    cache = VerdictCache(Path(out_dir) / VERDICTS_FILE, model, resume=True)  # a killed stage reruns
    with progress_bar(sum(map(len, plan.values())), "verdicts", "row") as bar:
        report = run_detection(model, tokenizer, plan, "left-out", sweep=SWEEP, progress=bar.update,
                               cache=cache)
    report["left_out"] = list(names)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    atomic_write(Path(out_dir) / LEFT_OUT_FILE, json.dumps(report, indent=1))
    return report


def loso_table(root) -> list[str]:
    """Markdown: each left-out run under ``root`` (a folder of ``align --leave-out`` runs), its
    left-out sources' flagged rates per suite, then the worst left-out source of each label
    (harmful: fewest flagged; benign: most), plain rows."""
    from ..eval.detection import NO_NEAR_TRAINING

    root = Path(root)
    runs = sorted(p for p in root.iterdir() if (p / "eval" / LEFT_OUT_FILE).is_file()) \
        if root.is_dir() else []
    if not runs:
        raise SafesigError(f"{root} holds no leave-one-source-out run (no */eval/{LEFT_OUT_FILE}); "
                           f"make them with `mlx-safesig align --leave-out SOURCE --out "
                           f"{root}/SOURCE`.")
    reports = {p.name: json.loads((p / "eval" / LEFT_OUT_FILE).read_text()) for p in runs}
    first = next(iter(reports.values()))
    scopes = sorted({left_out_scope(p) for p in runs})
    lines = [f"Judge: {first['judge']}, threshold {first['threshold']:g}. Each run trained on "
             "every training source but the one(s) it left out (same recipe otherwise), was tuned "
             f"on nothing, and is tested on {' or '.join(scopes)} of what it left out (every "
             "split).", "",
             "| run | left-out source | label | suite | flagged |", "|---|---|---|---|---|"]
    worst: dict = {}
    for run, report in reports.items():
        lines += [f"| {run} {line}" for line in left_out_lines(report)]
        for src, s in report["suites"]["plain"]["sources"].items():
            if src.endswith(NO_NEAR_TRAINING):
                continue
            kind, rate = ("harmful" if s["label"] else "benign"), s["flagged"] / max(s["n"], 1)
            better = (lambda a, b: a < b) if s["label"] else (lambda a, b: a > b)
            if kind not in worst or better(rate, worst[kind][0]):
                worst[kind] = (rate, src, run, s)
    lines.append("")
    for kind, (_, src, run, s) in sorted(worst.items(), reverse=True):
        lines.append(f"- worst left-out {kind} source (plain rows): `{src}` (run {run}), "
                     f"{pct(s['flagged'], s['n'])} flagged")
    return lines
