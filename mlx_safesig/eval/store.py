"""Evaluation rows kept on disk as they finish, so a long run killed part way continues with
``--resume``: ``RowStore`` (a fingerprint header, then one row per unit of work) and, on it,
``VerdictCache`` (the query verdicts of a detection run, keyed by what the model reads)."""

import hashlib
import json
from pathlib import Path
from typing import Optional

from ..model import SafesigError
from .report import atomic_write

_LOCKS: dict = {}  # row files this process writes: their lock files, held until it ends


def lock_rows(path: Path):
    """Take ``path``'s lock (``<path>.lock``, an exclusive ``flock``) for this process, or fail
    with one line when another process holds it: two runs appending to one file interleave."""
    import fcntl

    key = str(Path(path).resolve())
    if key in _LOCKS:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    f = open(f"{path}.lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise SafesigError(f"another run is writing {path}; wait for it to end or use "
                           "another --out.") from None
    _LOCKS[key] = f


class RowStore:
    """A JSONL file: a header with the run's fingerprint, then one row per finished unit of work
    keyed by ``(kind, key, id)``; ``resume`` keeps the rows of a run with the same fingerprint
    (another fingerprint is an error naming the settings that differ), otherwise the file starts
    over. One process at a time writes it (``lock_rows``)."""

    def __init__(self, path: Path, fingerprint: dict, resume: bool):
        self.path, self.rows = path, {}
        lock_rows(path)
        if resume and path.is_file():
            text = path.read_text()
            if text and not text.endswith("\n"):  # a line torn by a killed run: cut it off
                text = text[: text.rfind("\n") + 1]
            lines = [json.loads(x) for x in text.splitlines() if x.strip()]
            old = dict(lines[0].get("fingerprint") or {}) if lines else {}
            old.pop("universal", None)  # adaptive files before the universal rows carried a count
            if lines and old != fingerprint:
                diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
                raise SafesigError(f"{path} was made with other settings ({', '.join(diff)}); "
                                   "use another --out or run without --resume.")
            self.rows = {(r["kind"], r["key"], r["id"]): r for r in lines[1:]}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps({"fingerprint": fingerprint}) + "\n" + "".join(
            json.dumps(r) + "\n" for r in self.rows.values()))

    def get(self, kind: str, key: str, rid: str) -> Optional[dict]:
        return self.rows.get((kind, key, str(rid)))

    def put(self, row: dict) -> dict:
        row = dict(row, id=str(row["id"]))
        self.rows[(row["kind"], row["key"], row["id"])] = row
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        return row


def model_key(model) -> str:
    """sha256 (16 hex digits) of a loaded model's config and every parameter (names, shapes,
    bytes): the same weights give the same key whatever folder or hub id they came from."""
    import numpy as np
    from mlx.utils import tree_flatten

    h = hashlib.sha256(json.dumps(vars(model.args), sort_keys=True, default=str).encode())
    for name, w in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        h.update(f"{name}:{w.dtype}:{tuple(w.shape)}".encode())
        h.update(np.array(w.view(_uint8())).tobytes())
    return h.hexdigest()[:16]


def _uint8():
    import mlx.core as mx

    return mx.uint8


VERDICT_SCHEME = 1  # what a cached verdict's key covers (generate.verdict_key); bump if that changes


class VerdictCache:
    """The query verdicts (p) a detection run has computed, on disk in a ``RowStore``: keyed by
    the model (``model_key``) and each verdict input (``generate.verdict_key``: the token ids and
    query slots the ``[CLS]`` reads), so a p is reused only for the same weights reading the same
    tokens. Passed to ``score_many`` (or ``score_and_peaks``, whose surprisal peaks it keeps
    beside the verdicts) as its ``cache``; ``reused`` counts the verdicts it gave back."""

    KIND = "verdict"

    def __init__(self, path: Path, model, resume: bool):
        self.store = RowStore(path, {"model": model_key(model), "verdict": VERDICT_SCHEME}, resume)
        self.reused = 0

    def __contains__(self, key: str) -> bool:
        return self.store.get(self.KIND, key, "") is not None

    def __getitem__(self, key: str) -> float:
        self.reused += "|peak" not in key  # a verdict, not the surprisal peak kept beside it
        return self.store.get(self.KIND, key, "")["p"]

    def __setitem__(self, key: str, p: float):
        self.store.put({"kind": self.KIND, "key": key, "id": "", "p": p})
