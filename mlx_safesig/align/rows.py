"""Training data for the default model's safety adapter, from the pinned data builder's output.

    python -m mlx_safesig.align.build --out data
    python -m mlx_safesig.align.rows --data data --out data/adapter

Rows (the JSONL format of `mlx_safesig.data`):
* harmful prompts (train split, label 1): the response is the refusal prefix plus a short
  justification, both language-modelling targets (the shipped v7); with ``--give-refusal-prefix``
  the prefix is the row's ``prefill`` instead (given, not learned: strategic decoding inserts it,
  the model only learns to justify it; v8, measured in CHANGELOG.md: the model no longer starts
  that refusal on benign prompts by itself, but its query verdict is weaker under jailbreak
  templates); the ``continuation`` is the base model's OWN answer to the prompt (it answers
  harmful requests on its own), so window probes learn to catch harmful text mid-generation --
  only for the sources in ``--window-sources`` (``source`` or ``source:category``; by default
  AdvBench, HarmBench and Do-Not-Answer ``malicious_uses``: instructions whose compliant answer
  is itself harmful). The other Do-Not-Answer categories are questions (opinions, stereotypes,
  private facts) that the base model mostly answers with ordinary explanatory text: labelling
  those windows malicious taught the probe to flag ordinary answers (benign windows flagged 15%);
* Do-Not-Answer rows of the categories in ``--drop-categories`` are left out (by default
  ``human_chatbox`` and ``misinformation_harms``: mostly health, emotional-support and "should I
  believe this?" questions a safe assistant answers with care, not harmful requests; labelling them
  malicious teaches the [CLS] to flag ordinary questions);
* benign prompts (train split, label 0): Alpaca rows keep their reference answer; our own prompts
  (``mlx_safesig/align/prompts/``) get the base model's own answer, up to
  ``--benign-max-tokens``: an answer cut by that limit is trimmed back to its last full sentence
  (the trainer ends every response with the end of turn, so a mid-sentence cut would teach the
  model to stop mid-sentence), and dropped if it has none (window probes over benign responses are
  built by the trainer itself); rows longer than MAX_BENIGN_CHARS are left out.
The base model's generations are cached in ``--out`` (``generations.jsonl`` for the harmful
continuations, ``generations-benign.jsonl`` for the benign answers, keyed by row id, token limit
and a fingerprint of the base model's files) so a re-run only generates what is missing.
``valid.jsonl`` is built the same way from the dev split.
``--extra-benign FILE`` adds prompts written for training only (``extra_benign.txt``, v11): they
join the train split with the base model's answers like ours above; a prompt that is already a row
of the data (any split), or whose words mostly repeat a dev or test prompt's or a held-out one's
(``heldout.jsonl``), is left out, so the dev, test and held-out sets stay as the builder made them and
nothing of them leaks into training.
``--framings FILE`` (``framings.txt``, v12) wraps a share of the train split's harmful prompts
(``--framed-harmful``) and of its benign ones (``--framed-benign``) in framings written for this
project in the styles of jailbreak prompts (role-play, fiction, fake system messages, refusal
suppression, noise suffixes, ...), as extra rows next to the plain ones: a framed harmful prompt
keeps its label and gets a refusal (no continuation), a framed benign one keeps its label and the
plain prompt's answer, so the [CLS] has to read the request, not the framing. A framing whose words
mostly repeat one of the data's jailbreak templates (PyRIT, AutoDAN, DAN, GCG: what the templates
suite uses) is left out, so the templates suite still measures framings the adapter never saw.
A machine-translated source (``build --translate``: ``<source>_<lang>``) goes with its English one:
every harmful one is trained on, a benign one when its English source is in ``--benign-sources``,
and ``--leave-out`` leaves it out with it; it has no English reference answer (the base model answers).
Nothing here prints prompt or response text: counts only.
"""

import argparse
import hashlib
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .answers import generate_missing, model_fingerprint
from .archive import BuildError
from .build import BENIGN_SOURCES as BENIGN_TRAIN_SOURCES
from .build import near_copy, words
from .conversations import BENIGN_SHAPES, HARMFUL_SHAPES, conversation_prompts
from .records import row_messages
from .sources import base_source, read_prompts, text_id

PROG = "mlx_safesig.align.rows"

DROP_CATEGORIES = "human_chatbox,misinformation_harms"
# the shipped adapter's (v7; v8's too); v6 had no everyday_tasks (see CHANGELOG.md)
BENIGN_SOURCES = "alpaca_gpt4_demo,edgy_benign,everyday_tasks"
# not the training sources added for breadth (sources_more.py): their rows train the verdict; window
# supervision from them would be a recipe change of its own (more base-model answers, measured apart)
WINDOW_SOURCES = "advbench,harmbench,donotanswer:malicious_uses"
MAX_BENIGN_CHARS = 1500  # longer Alpaca rows would pass --max-seq-length 512: left out
JUSTIFICATIONS = [
    " it asks for help with something that could seriously harm people.",
    " it could be used to hurt someone or to break the law.",
    " helping with it would put people's safety at risk.",
    " it is a request for harmful content, which I do not provide.",
    " it could cause real harm. I am happy to help with something else.",
]


def read_jsonl(path: Path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def pick(row_id: str, options):
    return options[int(hashlib.sha256(row_id.encode()).hexdigest(), 16) % len(options)]


def in_share(row_id: str, salt: str, share: float) -> bool:
    """Is ``row_id`` among about ``share`` of all ids (by a hash with ``salt``: the same rows on
    every run, a different choice per salt)?"""
    return int(hashlib.sha256(f"{row_id}:{salt}".encode()).hexdigest(), 16) % 1000 < 1000 * share


def full_sentences(text: str) -> str:
    """``text`` up to its last sentence end (. ! ? or a line break), or "" if it has none."""
    ends = [m.end() for m in re.finditer(r"(?<![0-9])[.!?](?=\s|$)|\n", text)]
    return text[: ends[-1]].rstrip() if ends else ""


def fail(message: str):
    """End the script with one line, ``<prog>: error: message`` (exit code 1)."""
    raise SystemExit(f"{PROG}: error: {message}")


def extra_benign_rows(path: Path, known_ids, held_out_texts, overlap: float = 0.6):
    """Benign rows (label 0, source ``edgy_extra``) from a prompt file written for training only
    (one prompt per line, '#' lines and blank lines ignored), with the data builder's ids. Left out,
    and counted: prompts whose id is in ``known_ids`` (already a row of the data, in any split)
    and near-copies of ``held_out_texts`` (the dev and test prompts): word-set Jaccard >= overlap.
    Returns (rows, {"duplicate": n, "near_held_out": n})."""
    held = [words(t) for t in held_out_texts]
    rows, left_out, seen = [], Counter(), set(known_ids)
    for text in read_prompt_file(path):
        row_id, w = text_id(text), words(text)
        if row_id in seen:
            left_out["duplicate"] += 1
        elif near_copy(w, held, overlap):
            left_out["near_held_out"] += 1
        else:
            seen.add(row_id)
            rows.append({"id": row_id, "text": text, "source": EXTRA_SOURCE, "label": 0})
    return rows, dict(left_out)


def read_prompt_rows(path) -> list:
    """The prompts of a file like extra_benign.txt as the data builder's rows (``text``, ``id``, and
    ``category``: the '#' header above the prompt), read and normalized by its reader of our prompt
    files (one per line, '#' lines and blank lines ignored); a file it cannot use ends the script
    with its one-line message."""
    try:
        return read_prompts(path, "edgy_benign")
    except BuildError as e:
        fail(str(e))


def read_prompt_file(path) -> list:
    """The prompt texts of ``read_prompt_rows(path)``."""
    return [r["text"] for r in read_prompt_rows(path)]


SLOT = "{prompt}"


def read_framings(path) -> list:
    """The framings of a file like framings.txt: blocks separated by lines that are exactly '%%',
    '#' lines are comments; each framing has the slot ``{prompt}`` exactly once and no other
    braces. A file that breaks these rules ends the script with one line naming the framing."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read {path}: {getattr(e, 'strerror', None) or e}")
    blocks, cur = [], []
    for ln in text.splitlines() + ["%%"]:
        if ln.strip() == "%%":
            if "\n".join(cur).strip():
                blocks.append("\n".join(cur).strip())
            cur = []
        elif not ln.lstrip().startswith("#"):
            cur.append(ln.rstrip())
    for i, b in enumerate(blocks, 1):
        if b.count(SLOT) != 1 or b.replace(SLOT, "").count("{") or b.replace(SLOT, "").count("}"):
            fail(f"{path}: framing {i} must have {SLOT} exactly once and no other braces")
    if not blocks:
        fail(f"{path} has no framings")
    return blocks


def usable_framings(framings, attack_texts, overlap: float = 0.6):
    """``framings`` without those whose word set (slot left out) mostly repeats one of
    ``attack_texts`` (word-set Jaccard >= overlap). Returns (kept, number left out)."""
    attacks = [words(t) for t in attack_texts]
    kept = [f for f in framings if not near_copy(words(f.replace(SLOT, " ")), attacks, overlap)]
    return kept, len(framings) - len(kept)


def framed_rows(rows, framings, share: float, salt: str = "framed"):
    """Extra rows: about ``share`` of ``rows`` (chosen by id, so the same rows on every run), each
    wrapped in one framing (also chosen by id). A framed row has the plain row's label and
    category, ``source`` "<salt>:<source>", the id of its own text, ``answer_of`` the plain
    row's id (benign rows reuse its answer) and ``framing_chars``, the characters the framing
    added (``build`` sizes a row by its plain prompt). ``salt`` picks rows and framings apart."""
    key = "framing" if salt == "framed" else salt  # the framed rows of v12-v15 keep their framings
    out = []
    for r in rows:
        if not in_share(r["id"], salt, share):
            continue
        text = pick(f"{r['id']}:{key}", framings).replace(SLOT, r["text"])
        row = {k: v for k, v in r.items() if k not in ("id", "text", "source")}
        out.append(dict(row, id=text_id(text), text=text, source=f"{salt}:{r.get('source')}",
                        answer_of=r.get("answer_of", r["id"]),
                        framing_chars=len(text) - len(r["text"])))
    return out


def read_wrappers(path, max_chars: int) -> list:
    """Training wrappers (the builder's ``train_wrappers.jsonl``: ``plain`` with a ``{{ prompt }}``
    slot) no longer than ``max_chars``, as framings with the ``{prompt}`` slot; the dev wrappers
    (``eval.detection.is_dev_wrapper``, scored by the dev detection suite) are never used."""
    from ..eval.detection import is_dev_wrapper

    rows = read_jsonl(path)
    out = [r["plain"].replace("{{ prompt }}", SLOT) for r in rows
           if r.get("plain") and r["plain"].count("{{ prompt }}") == 1 and len(r["plain"]) <= max_chars
           and not (r.get("id") and is_dev_wrapper(r))]
    if not out:
        fail(f"{path} has no wrapper with one {{{{ prompt }}}} slot of at most {max_chars} characters")
    return out


def conversation_rows(harmful, benign, share: float, answers: dict, refusal: str):
    """About ``share`` of the harmful and of the benign rows (by id), each turned into one
    conversation of a shape picked by id (``conversations.py``). ``answers``: plain answer texts by
    id, for earlier assistant turns."""
    out = []
    for rows, shapes in ((harmful, HARMFUL_SHAPES), (benign, BENIGN_SHAPES)):
        for shape in shapes:
            chosen = [r for r in rows if in_share(r["id"], "conversation", share)
                      and pick(f"{r['id']}:shape", shapes) == shape]
            out += conversation_prompts(chosen, shape, answers, harmful, refusal)
    return out


def window_source(row, sources) -> bool:
    """Is ``row``'s continuation used for window supervision? ``sources``: set of ``source`` or
    ``source:category`` names."""
    return row.get("source") in sources or f"{row.get('source')}:{row.get('category')}" in sources


def without_loop(answer: str) -> str:
    """``answer`` cut before it starts to loop (a word 4-gram's second of three occurrences, the
    utility suite's loop rule) and back to its last full sentence; unchanged if it does not loop."""
    from ..eval.utility import loop_cut

    cut = loop_cut(answer)
    return answer if cut is None else full_sentences(answer[:cut])


def build(rows_h, rows_b, gen, answers, refusal_prefix, learn_prefix=True, mismatched=0.0,
          trim_loops=False, log=None):
    """``gen``: harmful continuations by id (rows without one get no window supervision);
    ``answers``: (text, finished) of benign rows without a reference answer, by id;
    ``learn_prefix``: the refusal prefix is an LM target (v7), else the row's ``prefill``, the
    exact text generation inserts (v8); ``mismatched``: the share of benign rows that also get
    one of those harmful continuations (label 1) after their benign question, so that window
    probes which see the question (``train --window-query``) must still read the window;
    ``trim_loops``: benign answers are cut before they loop (``without_loop``): the base model's
    greedy answers often repeat themselves, and learning them teaches the adapter to loop."""
    harmful_texts = [gen[k] for k in sorted(gen)]
    out, looped = [], []  # looped: a trimmed answer, did anything survive?
    for r in rows_h:
        prefix = refusal_prefix.lstrip("\n") if learn_prefix else refusal_prefix
        row = {
            "messages": row_messages(r) + [
                {"role": "assistant", "content": prefix + pick(r["id"], JUSTIFICATIONS)}],
            "label": 1, "source": r.get("source"),
        }
        if not learn_prefix:
            row["prefill"] = prefix
        if gen.get(r["id"], "").strip():  # a blank one (the model stopped) is no window to learn
            row.update(continuation=gen[r["id"]], continuation_label=1)
        out.append(row)
    for r in rows_b:
        answer = r.get("response")
        plain_id = r["answer_of"] if "answer_of" in r and r["answer_of"] else r["id"]
        if not answer and plain_id in answers:
            text, finished = answers[plain_id]
            answer = text if finished else full_sentences(text)
        answer = answer or ""
        if trim_loops and (trimmed := without_loop(answer)) != answer:
            looped.append(bool(trimmed.strip()))
            answer = trimmed
        # sized without its framing or wrapper: a benign row is kept exactly when its plain row
        # is, else long wrappers would survive only around harmful requests and the verdict
        # would learn the wrapper's length as a label (v17: 54 of 290 wrapped benign rows kept)
        asked = sum(len(m["content"]) for m in row_messages(r)) - r.get("framing_chars", 0)
        if not answer.strip() or asked + len(answer) > MAX_BENIGN_CHARS:
            continue
        row = {
            "messages": row_messages(r) + [{"role": "assistant", "content": answer}],
            "label": 0, "source": r.get("source"),
        }
        if harmful_texts and in_share(r["id"], "mismatched", mismatched):
            row.update(continuation=pick(r["id"], harmful_texts), continuation_label=1)
        out.append(row)
    out.sort(key=lambda x: hashlib.sha256(json.dumps(x).encode()).hexdigest())
    if looped and log:
        log(f"--trim-loops: {len(looped)} benign answers looped; {sum(looped)} cut before the "
            f"loop, {len(looped) - sum(looped)} left out (nothing before it)")
    return out


def summary(rows) -> str:
    """Counts of the written rows per label and source, and of the continuations (window
    supervision), for the log and the model card."""
    counts = {0: Counter(), 1: Counter()}
    for row in rows:
        counts[row["label"]][row.get("source") or "?"] += 1
    conts = Counter(row.get("source") or "?" for row in rows if "continuation" in row)

    def part(c):
        return ", ".join(f"{k} {n}" for k, n in sorted(c.items()))
    return (f"{len(rows)} rows ({sum(counts[1].values())} malicious: {part(counts[1])}; "
            f"{sum(counts[0].values())} benign: {part(counts[0])}); "
            f"{sum(conts.values())} with a continuation: {part(conts)}")


@dataclass
class RowsOptions:
    """The recipe knobs of the rows (the command line's options; the same defaults)."""

    max_tokens: int = 48  # tokens per harmful continuation of the base model
    benign_max_tokens: int = 192  # tokens per base-model answer to a benign prompt
    batch: int = 16  # prompts generated together
    benign_sources: str = BENIGN_SOURCES
    drop_categories: str = DROP_CATEGORIES
    window_sources: str = WINDOW_SOURCES
    give_refusal_prefix: bool = False
    mismatched_continuations: float = 0.0
    limit_harmful: Optional[int] = None
    extra_benign: Optional[Path] = None
    framings: Optional[Path] = None
    framed_harmful: float = 0.3
    framed_benign: float = 0.15
    wrappers: Optional[Path] = None
    wrapped_harmful: float = 0.1
    wrapped_benign: float = 0.1
    max_wrapper_chars: int = 1800
    conversations: float = 0.0
    leave_out: str = ""  # comma-separated sources whose rows are not trained on (loso.py)
    trim_loops: bool = False  # benign answers cut before they loop (``without_loop``)
    workers: int = 1  # processes generating the base model's answers (the same answers)


EXTRA_SOURCE = "edgy_extra"  # the source of --extra-benign's rows
CACHE_FILES = ("generations.jsonl", "generations-benign.jsonl")  # harmful, benign answers
HARMFUL_CACHE, BENIGN_CACHE = CACHE_FILES

SHARES = ("framed_harmful", "framed_benign", "wrapped_harmful", "wrapped_benign", "conversations")


def option_error(opts: RowsOptions) -> Optional[str]:
    """The first thing wrong with ``opts`` (a missing file, a share outside 0..1), or None."""
    for opt in ("extra_benign", "framings", "wrappers"):
        if getattr(opts, opt) and not Path(getattr(opts, opt)).is_file():
            return f"--{opt.replace('_', '-')}: no such file: {getattr(opts, opt)}"
    if opts.workers < 1:
        return f"--workers must be at least 1, got {opts.workers}"
    for opt in SHARES:
        if not 0 <= getattr(opts, opt) <= 1:
            return f"--{opt.replace('_', '-')} must be between 0 and 1, got {getattr(opts, opt)}"
    return None


def share_options(ap, what: str, needs: str):
    """``--<what>-harmful`` / ``--<what>-benign``: the shares of train prompts also ``what``."""
    for label in ("harmful", "benign"):
        default = getattr(RowsOptions, f"{what}_{label}")
        ap.add_argument(f"--{what}-{label}", type=float, default=default,
                        help=f"with {needs}: share of {label} train prompts also {what} "
                             f"(default {default})")


def _log(message: str):
    print(message, file=sys.stderr, flush=True)


def write_rows(path: Path, rows):
    """``rows`` as JSONL at ``path``, through a temporary file and a rename."""
    from ..eval.report import atomic_write

    atomic_write(path, "".join(json.dumps(row) + "\n" for row in rows))


def make_rows(data: Path, out: Path, model_dir: str, opts: RowsOptions, log=_log):
    """``train.jsonl`` (train split) and ``valid.jsonl`` (dev split) in ``out`` from the builder's
    output folder ``data``, with base model ``model_dir``'s own answers (cached in ``out``)."""
    framings = read_framings(opts.framings) if opts.framings else None
    wrappers = read_wrappers(opts.wrappers, opts.max_wrapper_chars) if opts.wrappers else None

    from mlx_safesig.decoding import REFUSAL_PREFIX

    data, out = Path(data), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_key = model_fingerprint(model_dir)
    benign_source = {r["id"]: r for r in read_jsonl(data / "benign.jsonl")}
    left_out = set(filter(None, opts.leave_out.split(",")))
    if left_out:
        log(f"left out of training: {', '.join(sorted(left_out))}")
    for split, name in (("train", "train"), ("dev", "valid")):
        drop = set(filter(None, opts.drop_categories.split(",")))
        # a translated source (build --translate) goes with its English one: trained on when
        # that is (every harmful source; a benign one named in --benign-sources), left out with it
        harmful = [r for r in read_jsonl(data / f"harmful.{split}.jsonl")
                   if r.get("category") not in drop and base_source(r.get("source")) not in left_out]
        if opts.limit_harmful and split == "train":
            harmful = sorted(harmful, key=lambda r: r["id"])[: opts.limit_harmful]
        keep = set(filter(None, opts.benign_sources.split(",")))
        benign = [dict(benign_source.get(r["id"], r), **r) for r in
                  read_jsonl(data / f"benign.{split}.jsonl")
                  if base_source(r.get("source")) in keep
                  and base_source(r.get("source")) not in left_out]
        if opts.extra_benign and split == "train" and EXTRA_SOURCE not in left_out:
            heldout = read_jsonl(data / "heldout.jsonl")
            held_out = [r["text"] for kind in ("benign", "harmful") for sp in ("dev", "test")
                        for r in read_jsonl(data / f"{kind}.{sp}.jsonl")] + [r["text"] for r in heldout]
            known = (set(benign_source) | {r["id"] for r in read_jsonl(data / "harmful.jsonl")}
                     | {r["id"] for r in heldout})
            extra, dropped = extra_benign_rows(opts.extra_benign, known, held_out)
            log(f"{opts.extra_benign}: {len(extra)} prompts kept, left out: "
                f"{dropped or 'none'}")
            benign += extra
        sources = set(filter(None, opts.window_sources.split(",")))
        gen, _ = generate_missing([r for r in harmful if window_source(r, sources)],
                                  out / HARMFUL_CACHE, model_dir, opts.max_tokens, opts.batch,
                                  model_key, log, opts.workers)
        gen = {r["id"]: gen[r["id"]] for r in harmful if window_source(r, sources)}
        texts, finished = generate_missing([r for r in benign if not r.get("response")],
                                           out / BENIGN_CACHE, model_dir,
                                           opts.benign_max_tokens, opts.batch, model_key, log,
                                           opts.workers)
        answers = {k: (t, finished[k]) for k, t in texts.items()}
        if framings and split == "train":
            attack_texts = [r["text"] for f in ("templates", "autodan", "dan", "gcg")
                            for r in read_jsonl(data / f"{f}.jsonl")]
            usable, near = usable_framings(framings, attack_texts)
            if not usable:
                fail(f"every framing in {opts.framings} is near a jailbreak template of the data")
            known = {r["id"] for r in harmful + benign}
            framed_h = [r for r in framed_rows(harmful, usable, opts.framed_harmful)
                        if r["id"] not in known]
            framed_b = [r for r in framed_rows(benign, usable, opts.framed_benign)
                        if r["id"] not in known]
            log(f"{opts.framings}: {len(usable)} framings used ({near} left out as near a "
                f"jailbreak template); {len(framed_h)} harmful and {len(framed_b)} benign "
                "prompts framed")
            harmful, benign = harmful + framed_h, benign + framed_b
        if wrappers and split == "train":
            known = {r["id"] for r in harmful + benign}
            plain_h = [r for r in harmful if ":" not in str(r.get("source"))]
            plain_b = [r for r in benign if ":" not in str(r.get("source"))]
            wrapped = [r for r in framed_rows(plain_h, wrappers, opts.wrapped_harmful, "wrapped")
                       + framed_rows(plain_b, wrappers, opts.wrapped_benign, "wrapped")
                       if r["id"] not in known]
            log(f"{opts.wrappers}: {len(wrappers)} wrappers used; "
                f"{sum(r['label'] == 1 for r in wrapped)} harmful and "
                f"{sum(r['label'] == 0 for r in wrapped)} benign prompts wrapped")
            harmful += [r for r in wrapped if r["label"] == 1]
            benign += [r for r in wrapped if r["label"] == 0]
        if opts.conversations:
            plain_h = [dict(r, label=1) for r in harmful if ":" not in str(r.get("source"))]
            plain_b = [dict(r, label=0) for r in benign if ":" not in str(r.get("source"))]
            said = {k: t if finished.get(k) else full_sentences(t) for k, t in texts.items()}
            said.update({r["id"]: r["response"] for r in plain_b if r.get("response")})
            refusal = REFUSAL_PREFIX.lstrip("\n") + JUSTIFICATIONS[0]
            convs = conversation_rows(plain_h, plain_b, opts.conversations, said, refusal)
            references = {r["id"]: r["response"] for r in plain_b if r.get("response")}
            convs = [dict(c, response=references[c["answer_of"]]) if c["answer_of"] in references
                     else c for c in convs]
            own = [r for r in convs if r["label"] == 0 and r["answer_of"] is None]
            more, more_finished = generate_missing(own, out / BENIGN_CACHE, model_dir,
                                                   opts.benign_max_tokens, opts.batch, model_key,
                                                   log, opts.workers)
            answers.update({k: (t, more_finished[k]) for k, t in more.items()})
            log(f"conversations: {sum(r['label'] == 1 for r in convs)} harmful and "
                f"{sum(r['label'] == 0 for r in convs)} benign")
            harmful += [r for r in convs if r["label"] == 1]
            benign += [r for r in convs if r["label"] == 0]
        rows = build(harmful, benign, gen, answers, REFUSAL_PREFIX, not opts.give_refusal_prefix,
                     opts.mismatched_continuations, opts.trim_loops, log)
        write_rows(out / f"{name}.jsonl", rows)
        log(f"{name}.jsonl: {summary(rows)}")


def main():
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data",
                    help="output folder of `python -m mlx_safesig.align.build`")
    ap.add_argument("--out", default="data/adapter", help="folder for train.jsonl / valid.jsonl")
    ap.add_argument("--model", default=None, help="base mlx-lm model (default: the embedded one)")
    ap.add_argument("--max-tokens", type=int, default=48,
                    help="tokens per harmful continuation of the base model")
    ap.add_argument("--benign-max-tokens", type=int, default=192,
                    help="tokens per base-model answer to a benign prompt")
    ap.add_argument("--batch", type=int, default=16, help="prompts generated together")
    ap.add_argument("--workers", type=int, default=None,
                    help="processes generating the base model's answers, each a whole batch (the "
                         "same answers; default: one per CPU core up to 4, one with Metal)")
    ap.add_argument("--benign-sources", default=BENIGN_SOURCES,
                    help="comma-separated benign sources to train on (the builder's train sources: "
                         + ", ".join(sorted(BENIGN_TRAIN_SOURCES)) + ")")
    ap.add_argument("--drop-categories", default=DROP_CATEGORIES,
                    help="comma-separated harmful-row categories to leave out ('' keeps all)")
    ap.add_argument("--window-sources", default=WINDOW_SOURCES,
                    help="comma-separated harmful sources (or source:category) whose base-model "
                         "continuations train the window probes ('' for none)")
    ap.add_argument("--give-refusal-prefix", action="store_true",
                    help="give the refusal prefix as the harmful rows' prefill (not learned; v8) "
                         "instead of training the language model to write it (v7, the default)")
    ap.add_argument("--mismatched-continuations", type=float, default=0.0,
                    help="share of benign rows that also get a harmful continuation (label 1) "
                         "after their own question, for `train --window-query` (default 0)")
    ap.add_argument("--limit-harmful", type=int, default=None,
                    help="use at most this many harmful training prompts")
    ap.add_argument("--extra-benign", type=Path, default=None,
                    help="prompt file written for training only (e.g. mlx_safesig/align/prompts/"
                         "extra_benign.txt, v11): train rows with the base model's answers; "
                         "duplicates and near-copies of dev/test prompts are left out")
    ap.add_argument("--framings", type=Path, default=None,
                    help="framings file (e.g. mlx_safesig/align/prompts/framings.txt, v12): wrap "
                         "shares of the train prompts in them as extra rows")
    share_options(ap, "framed", "--framings")
    ap.add_argument("--wrappers", type=Path, default=None,
                    help="training wrappers (the builder's train_wrappers.jsonl): wrap shares of "
                         "the train prompts in real-world jailbreak templates as extra rows")
    share_options(ap, "wrapped", "--wrappers")
    ap.add_argument("--max-wrapper-chars", type=int, default=1800,
                    help="with --wrappers: leave out longer wrappers (default 1800, to fit "
                         "train --max-seq-length 768)")
    ap.add_argument("--conversations", type=float, default=0.0,
                    help="share of harmful and of benign prompts also turned into a multi-turn "
                         "row (split, continue, system prompt, follow-up; default 0)")
    ap.add_argument("--trim-loops", action="store_true",
                    help="cut benign answers before they loop (a word 4-gram a third time), back "
                         "to their last full sentence")
    args = vars(ap.parse_args())
    data, out, model = Path(args.pop("data")), Path(args.pop("out")), args.pop("model")
    if args["workers"] is None:
        from .answers import default_workers

        args["workers"] = default_workers()
    opts = RowsOptions(**args)
    if message := option_error(opts):
        ap.error(message)
    from mlx_safesig.default_model import default_base_model

    model_dir = model or str(default_base_model(progress=_log))
    make_rows(data, out, model_dir, opts)


if __name__ == "__main__":
    main()
