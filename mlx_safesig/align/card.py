"""MODEL_CARD.md for a model ``align`` made: the base model, the data with its licenses, what was
trained on / tuned on / tested on, the held-out numbers read from the evaluation's own files (each
with its judge), the worst source, intended use and limits. Counts only, never prompt text."""

from __future__ import annotations

import json
from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .harden import harden_lines
from .sources import HELDOUT_SOURCES, SOURCES

# the generation judges the card shows (report.md has them all): a refusal keyword judge that
# also counts an inserted refusal, and the inserted refusal alone
CARD_JUDGES = ("kw-prefix+inserted", "refusal-inserted")
OURS = {"edgy_extra": ("Apache-2.0", "mlx-safesig: benign-but-edgy prompts written for training "
                                     "only (align/prompts/extra_benign.txt)")}


LEFT_OUT_FILE = "left-out.json"  # OUT/eval of a leave-one-source-out run (loso.py)
LEFT_OUT_SUITES = ("plain", "conversation")


def left_out_lines(report: dict) -> list[str]:
    """Markdown rows ``| source | label | suite | flagged |`` of one left-out report."""
    lines = []
    for suite in LEFT_OUT_SUITES:
        counts = report["suites"].get(suite, {"sources": {}})
        for src, s in sorted(counts["sources"].items(), key=lambda kv: (-kv[1]["label"], kv[0])):
            lines.append(f"| `{src}` | {'harmful' if s['label'] else 'benign'} | {suite} | "
                         f"{pct(s['flagged'], s['n'])} |")
    return lines


STATE_FILE = "state.json"  # a run's stages done and their options (align.pipeline.State)


def left_out_scope(run: Path) -> str:
    """Which rows of the left-out sources a run scored: all, or ``--detection-limit`` per source
    and suite (read from the run's recorded eval options)."""
    state = Path(run) / STATE_FILE
    limit = (_read_json(state)["options"].get("eval", {}).get("--detection-limit")
             if state.is_file() else None)
    return (f"up to {limit} rows per source and suite (by a hash of the id)" if limit
            else "all rows")


def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _sources_of(path: Path) -> dict:
    """Rows of a rows file by base source and label: ``{(source, label): n}`` (a framed, wrapped
    or conversation row counts for the request's own source)."""
    counts: Counter = Counter()
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                counts[(str(row.get("source")).rsplit(":", 1)[-1], row["label"])] += 1
    return dict(counts)


def _license(name: str) -> tuple[str, str]:
    if name in SOURCES:
        s = SOURCES[name]
        return s.license + (" (non-commercial)" if s.non_commercial else ""), s.origin
    return OURS.get(name, ("?", "?"))


def pct(count: int, n: int) -> str:
    """``count/n (rate%)``, the card's one way to print a number."""
    return f"{count}/{n} ({100 * count / n:.1f}%)" if n else "n/a"


def _mlx_safesig_version() -> str:
    try:
        return version("mlx-safesig")
    except PackageNotFoundError:
        return "?"


def _held_out_names(out: Path) -> list[str]:
    """The held-out sources the run's data holds (HELDOUT.md's, then any translations of them,
    ``--translate``), in that order."""
    present = {source for source, _ in _sources_of(out / "data" / "heldout.jsonl")}
    return [s for s in HELDOUT_SOURCES if s in present or SOURCES[s].label is None] + sorted(
        present - set(HELDOUT_SOURCES))


def data_section(out: Path, left_out: tuple = ()) -> list[str]:
    manifest = _read_json(out / "data" / "MANIFEST.json")
    trained = _sources_of(out / "rows" / "train.jsonl")
    dev = _sources_of(out / "rows" / "valid.jsonl")
    lines = ["## Data", "",
             "Built by `mlx_safesig.align.build` (builder version "
             f"{manifest['builder_version']}) from pinned PyPI artefacts: "
             + ", ".join(f"`{a['spec']}` ({a['package_license']}, sha256 "
                         f"{'verified' if a['sha256_verified'] else 'NOT verified'})"
                         for a in manifest["artefacts"].values()) + ".", "",
             "| source | label | trained on (train rows) | dev rows | license | origin |",
             "|---|---|---|---|---|---|"]
    for name, label in sorted(set(trained) | set(dev), key=lambda k: (-k[1], k[0])):
        lic, origin = _license(name)
        kind = "harmful" if label else "benign"
        lines.append(f"| `{name}` | {kind} | {trained.get((name, label), 0)} | "
                     f"{dev.get((name, label), 0)} | {lic} | {origin} |")
    lines += ["", "- **Trained on**: the sources above (train split; framed, wrapped and "
              "conversation rows count for their request's source).",
              "- **Tuned on**: nothing in this run; the recipe's settings were chosen in earlier "
              "versions on the dev split of the training sources (the dev rows above, also the "
              "validation set of this run).",
              ("- **Tested on**: every row of the left-out "
               + ", ".join(f"`{s}` ({_license(s)[0]})" for s in left_out)
               + " (never trained on in this run); the held-out sources were not evaluated."
               if left_out else
               "- **Tested on** (held out: never trained or tuned on, HELDOUT.md): "
               + ", ".join(f"`{s}` ({_license(s)[0]})" for s in _held_out_names(out)) + ".")]
    return lines


def detection_section(detection: dict) -> list[str]:
    lines = ["## Held-out [CLS] query verdict", "",
             f"Judge: {detection['judge']}, threshold {detection['threshold']:g} "
             "(`mlx-safesig eval --suite detection --split heldout`; rows per source and suite "
             "may be capped by `--detection-limit`).", "",
             "| suite | source | label | flagged |", "|---|---|---|---|"]
    for suite, counts in detection["suites"].items():
        for src, s in sorted(counts["sources"].items(), key=lambda kv: (-kv[1]["label"], kv[0])):
            lines.append(f"| {suite} | `{src}` | {'harmful' if s['label'] else 'benign'} | "
                         f"{pct(s['flagged'], s['n'])} |")
    lines.append("")
    for suite, counts in detection["suites"].items():
        for kind, w in counts["worst"].items():
            s = counts["sources"][w["source"]]
            lines.append(f"- worst {kind} source, {suite}: `{w['source']}`, "
                         f"{pct(s['flagged'], s['n'])} flagged")
        for kind, w in counts.get("worst_language", {}).items():
            c = counts["languages"][kind][w["lang"]]
            lines.append(f"- worst {kind} language, {suite}: `{w['lang']}`, "
                         f"{pct(c['flagged'], c['n'])} flagged")
    return lines


def generation_rows(results: dict) -> list[tuple[str, str, str, dict, dict]]:
    """(suite, set, judge, safety-off cell, safety-on cell): each suite over all its requests
    (``direct``; ``any`` of the prefills) and per source (``direct / S``, ``any / S``; the report
    has these when the requests come from more than one source)."""
    out = []
    for suite, summary in results["suites"].items():
        for attack, modes in summary["attacks"].items():
            if attack not in ("direct", "any") and " / " not in attack:
                continue
            name = f"`{attack.split(' / ')[1]}`" if " / " in attack else "all sources"
            for judge in CARD_JUDGES:
                if judge in results["judges"]:
                    out.append((suite, name, judge, (modes.get("off") or {}).get(judge) or {},
                                (modes.get("on") or {}).get(judge) or {}))
    return out


def generation_section(results: dict) -> list[str]:
    c = results["config"]
    lines = ["## Held-out generation attacks", "",
             f"`mlx-safesig eval --suite {','.join(c['suites'])} --split heldout`: "
             f"{c['limit'] or 'all'} held-out harmful requests per suite, greedy, "
             f"{c['max_tokens']} tokens; ASR = share of requests the judge saw answered (prefill, "
             "conversation: broken by any of its prefills / shapes). Judges:", ""]
    lines += [f"- `{j}`: {results['judges'][j]}" for j in CARD_JUDGES if j in results["judges"]]
    lines += ["", "| suite | set | judge | ASR safety off | ASR safety on |", "|---|---|---|---|---|"]
    worst = None
    for suite, attack, judge, off, on in generation_rows(results):
        lines.append(f"| {suite} | {attack} | `{judge}` | {pct(off.get('count', 0), off.get('n', 0))} "
                     f"| {pct(on.get('count', 0), on.get('n', 0))} |")
        if attack != "all sources" and judge == CARD_JUDGES[0] and on.get("n"):
            rate = on["count"] / on["n"]
            if worst is None or rate > worst[0]:
                worst = (rate, suite, attack, on)
    if worst:
        _, suite, attack, on = worst
        lines += ["", f"- worst source (safety on, `{CARD_JUDGES[0]}`): {suite} {attack}, ASR "
                  f"{pct(on['count'], on['n'])}"]
    return lines


def _shown(option: str, value) -> str:
    if isinstance(value, bool):  # flag pairs
        pair = {"--give-refusal-prefix": "--learn-refusal-prefix", "--trim-loops": "--keep-loops"}
        return f"`{option if value else pair[option]}`"
    if option in ("--extra-benign", "--framings", "--wrappers") and value:
        value = Path(value).name
    return f"`{option} {value if value != '' else repr('')}`"


def model_card(out: Path, options: dict, base: str) -> str:
    """The card's Markdown for the ``align`` run in ``out``; ``options``: the recipe's values by
    option name."""
    options = ", ".join(_shown(k, v) for k, v in options.items())
    left_out = out / "eval" / LEFT_OUT_FILE
    if left_out.is_file():  # a leave-one-source-out run: no held-out evaluation, not for use
        report = _read_json(left_out)
        left = tuple(report["left_out"])
        names = ", ".join(f"`{n}`" for n in left)
        use = ["## Intended use", "",
               f"None beyond measurement: a leave-one-source-out study model, trained without "
               f"{names} to measure how the recipe does on a source it never saw "
               "(`mlx-safesig align --loso-table`). It was not evaluated on the held-out sources.", ""]
        results = ["## Left-out sources: [CLS] query verdict", "",
                   f"Judge: {report['judge']}, threshold {report['threshold']:g}; "
                   f"{left_out_scope(out)} of {names} (every split), as they are and in "
                   "conversations.", "",
                   "| source | label | suite | flagged |", "|---|---|---|---|",
                   *left_out_lines(report), ""]
    else:
        detection = _read_json(out / "eval" / "detection.json")
        generation = _read_json(out / "eval" / "generation" / "results.json")
        use = ["## Intended use", "",
               "Research and on-device use of the explicit-safety-signal method: the `[CLS]` verdict "
               "judges each request (and windows of the answer) and strategic decoding inserts a "
               "refusal when it says malicious. Run it with `mlx-safesig generate/chat/server "
               "--model <this folder>`. It is one safety layer, not a guarantee: keep other "
               "safeguards where harm is possible.", ""]
        results = [*detection_section(detection), "", *generation_section(generation), ""]
        left = ()
    lines = [
        f"# {base} with an explicit safety signal", "",
        f"Base model: `{base}`. Made by `mlx-safesig align` (mlx-safesig {_mlx_safesig_version()}): "
        "a `[CLS]` row, a safety head and LoRA adapters trained with the joint loss and window "
        "supervision (Li & Kim, ICML 2025), fused into this folder. Options: " + options + ".", "",
        *use,
        *data_section(out, left), "",
        *harden_lines(out),
        *results,
        "## Limits", "",
        f"- The numbers above come from the {'left-out' if left else 'held-out'} sources only, on "
        "at most the rows counted; "
        "small counts carry wide uncertainty.",
        "- Judges are the `[CLS]` verdict itself and refusal keywords / inserted refusals, not a "
        "guard model or people: they disagree often.",
        "- The data is mostly English; the base model's own knowledge and quality bound the "
        "answers, and the adapter can change benign answers.",
        "- Data licenses differ per source (table above); rows marked non-commercial restrict "
        "commercial use of the training data.",
    ]
    return "\n".join(lines) + "\n"
