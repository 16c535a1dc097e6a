"""Capacity study: can a base model's frozen representation separate harmful from benign requests
in a way that generalizes to sources it never saw? A leave-one-source-out (LOSO) linear probe.

Rows: ``harmful.jsonl`` and ``benign.jsonl`` of a data dir built by ``python -m
mlx_safesig.align.build`` -- never ``*.heldout.jsonl`` / ``heldout.jsonl`` (the frozen test set,
align/HELDOUT.md); a ``heldout`` split is refused. Sources are grouped by ``base_source`` (a
translated copy belongs to its source), and sources cut from one package's dataset form a family
(``family``): a fold fits on no row of its source's family.

Features: each row's prompt as the product builds it (``prepare_prompt`` on one user message),
run through the base model (plain mlx-lm folder, no safety adapter). At each layer ``l`` of
``--layers`` (0 = the embeddings, ``l`` = the residual stream after block ``l``, ``last`` = after
the final block, before the final norm): ``last`` = the state of the last prompt token,
``mean`` = the mean over the query slots (the user content's tokens).

Probe: standardized features, L2 logistic regression (Newton, class-balanced, ``--c`` as in
scikit-learn), threshold 0.5. Fold S: fit on every row whose source is not S, score S's rows
(harmful: share flagged = recall; benign: share flagged = false positives); S's family is left
out of the fit too. Reference: fit on the train split, score the dev split (all sources). Only
counts and source names are written.

    python examples/probe_study.py --data /work/runs/v17/data --out probe_study.json

``--model`` takes a plain base model: an mlx-lm / HF folder, or a GGUF file (k-quants such as
Q4_K_M included) that the converter turns into an fp32 MLX folder once, under ``probe_models``
beside ``--out``.
"""

# ruff: noqa: I001  (import order: mlx_safesig before mlx)
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

import mlx_safesig  # noqa: F401  (preloads OpenBLAS on Linux: must come before mlx)
import mlx.core as mx
from mlx_lm.models.base import create_attention_mask
from mlx_safesig.align.sources import HELDOUT_SOURCES, SOURCES, base_source
from mlx_safesig.align.sources_more import MORE_BENIGN, MORE_HARMFUL
from mlx_safesig.prompt import prepare_prompt, wrap_tokenizer

DATA_FILES = ("harmful.jsonl", "benign.jsonl")  # the only files read
KINDS = ("last", "mean")
FEATURE_VERSION = "probe-features-v1"  # bump when the feature definition changes


class ProbeError(SystemExit):
    """One sentence for the user (exit status 1)."""

    def __init__(self, message: str):
        super().__init__(f"probe_study: {message}")


def say(message: str):
    print(message, file=sys.stderr, flush=True)



def check_splits(splits) -> tuple[str, ...]:
    splits = tuple(s.strip() for s in splits if s.strip())
    if any("heldout" in s.lower() for s in splits):
        raise ProbeError("the heldout split is the frozen test set (HELDOUT.md): never probed.")
    return splits


def family(source: str) -> str:
    """Sources cut from one package's dataset (e.g. its harmful, benign and obfuscated rows) are
    one family: a fold leaves out its source's whole family, so no relative is fitted on."""
    spec = SOURCES.get(base_source(source))
    related = {d["artefact"] for d in MORE_HARMFUL + MORE_BENIGN}
    return spec.artefact if spec is not None and spec.artefact in related else base_source(source)


def read_rows(data_dir, splits=("train", "dev", "test"), limit_per_source=None) -> list[dict]:
    """Rows of ``harmful.jsonl`` and ``benign.jsonl`` in ``splits``, each with ``group`` (its base
    source); with ``limit_per_source`` the first N of each group by a hash of the id."""
    splits = check_splits(splits)
    rows = []
    for name in DATA_FILES:
        with open(Path(data_dir) / name, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                r = json.loads(line)
                group = base_source(r["source"])
                if "heldout" in str(r.get("split", "")).lower() or group in HELDOUT_SOURCES:
                    raise ProbeError(f"{name} line {n} is a held-out row (source {group}); "
                                     "the study never reads the frozen test set.")
                if r.get("split") in splits:
                    rows.append({"id": str(r["id"]), "text": r["text"], "label": int(r["label"]),
                                 "source": r["source"], "group": group, "family": family(group),
                                 "split": r["split"]})
    if limit_per_source:
        by_group: dict[str, list] = {}
        for r in sorted(rows, key=lambda r: hashlib.sha256(r["id"].encode()).digest()):
            by_group.setdefault(r["group"], []).append(r)
        rows = [r for g in sorted(by_group) for r in by_group[g][:limit_per_source]]
    if len({r["id"] for r in rows}) != len(rows):
        raise ProbeError("row ids are not unique across harmful.jsonl and benign.jsonl.")
    return rows


def row_key(row) -> str:
    """Cache key of a row: its id and a hash of its text (a rebuilt row is recomputed)."""
    return f"{row['id']}:{hashlib.sha256(row['text'].encode()).hexdigest()[:16]}"



def file_fingerprint(path: Path, h) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        for at in (0, max(0, size // 2 - (1 << 19)), max(0, size - (1 << 20))):
            f.seek(at)
            h.update(f.read(1 << 20))


def model_fingerprint(path: Path) -> str:
    """Config, tokenizer files and a sample (size, start, middle, end) of every weight file."""
    h = hashlib.sha256(FEATURE_VERSION.encode())
    for p in sorted(path.iterdir()):
        if p.suffix in (".json", ".safetensors", ".model", ".txt", ".jinja", ".gguf") and p.is_file():
            file_fingerprint(p, h)
    return h.hexdigest()[:16]


def prepare_model_dir(model: str | None, work: Path) -> Path:
    """An mlx-lm folder for ``model``: the embedded default base, an mlx-lm / HF safetensors
    folder as is, or a GGUF file / folder without safetensors converted once under ``work``
    (any GGUF the converter reads, k-quants such as Q4_K_M included: it dequantizes them)."""
    if model is None:
        from mlx_safesig.default_model import default_base_model

        return default_base_model(progress=say)
    src = Path(model).expanduser()
    if not src.exists():
        raise ProbeError(f"{src} does not exist (the study never downloads a model).")
    if (src / "safety.safetensors").exists() or (src / "adapters.safetensors").exists():
        raise ProbeError(f"{src} holds safety parts or an adapter; give the plain base model.")
    if src.is_dir() and any(src.glob("*.safetensors")):
        return src
    h = hashlib.sha256()
    for p in [src] if src.is_file() else sorted(x for x in src.iterdir() if x.is_file()):
        file_fingerprint(p, h)
    target = work / f"{src.stem}-{h.hexdigest()[:12]}"
    if (target / "config.json").is_file():
        return target
    from mlx_safesig.convert import ConvertError, convert

    target.parent.mkdir(parents=True, exist_ok=True)
    say(f"converting {src} to an MLX folder in {target} ...")
    try:
        convert(str(src), str(target), dtype="float32", progress=False)
    except ConvertError as e:
        raise ProbeError(f"cannot convert {src}: {e}") from None
    return target


def parse_layers(spec: str | None, n_layers: int) -> list[int]:
    if not spec:
        return sorted({n_layers // 4, n_layers // 2, (3 * n_layers) // 4, n_layers})
    out = []
    for part in spec.split(","):
        part = part.strip()
        value = n_layers if part == "last" else int(part) if part.lstrip("-").isdigit() else None
        if value is not None and value < 0:
            value += n_layers + 1
        if value is None or not 0 <= value <= n_layers:
            raise ProbeError(f"--layers: {part!r} is not 0..{n_layers} or 'last'.")
        out.append(value)
    return sorted(set(out))


def feature_names(layers) -> list[str]:
    return [f"L{layer}/{kind}" for layer in layers for kind in KINDS]


def extract_batch(model, batch, layers) -> dict[str, np.ndarray]:
    """Features of prepared prompts ``batch`` (each ``.ids``, ``.query_slots``): right-padded, so
    under the causal mask each row's real positions see exactly its own tokens."""
    lengths = [len(p.ids) for p in batch]
    width = max(lengths)
    ids = mx.array([p.ids + [0] * (width - len(p.ids)) for p in batch])
    h = model.model.embed_tokens(ids)
    mask = create_attention_mask(h, None)
    last_idx = mx.array([n - 1 for n in lengths])
    slot_w = np.zeros((len(batch), width), np.float32)
    for b, p in enumerate(batch):
        slot_w[b, p.query_slots] = 1.0 / len(p.query_slots)
    slot_w = mx.array(slot_w)
    out, pending = {}, []
    for i in range(max(layers) + 1):
        if i > 0:
            h = model.model.layers[i - 1](h, mask, None)
        if i in layers:
            hf = h.astype(mx.float32)
            last = mx.take_along_axis(hf, last_idx[:, None, None], axis=1)[:, 0]
            mean = (slot_w[:, :, None] * hf).sum(axis=1)
            pending += [(f"L{i}/last", last), (f"L{i}/mean", mean)]
    mx.eval([a for _, a in pending])
    for name, a in pending:
        out[name] = np.array(a)
    return out


def batches(prepared, order, max_tokens=2048, max_rows=16):
    """Rows grouped by similar length (``order`` is sorted by length), padded area <= budget."""
    group = []
    for i in order:
        if group and (len(group) + 1) * len(prepared[i].ids) > max_tokens or len(group) == max_rows:
            yield group
            group = []
        group.append(i)
    if group:
        yield group


class FeatureCache:
    """Features by row key in ``<dir>/<fingerprint>-NNNN.npz`` chunks (append-only: a crash loses
    at most the rows since the last chunk)."""

    def __init__(self, directory: Path, fingerprint: str, names):
        self.dir, self.fp, self.names = directory, fingerprint, list(names)
        self.features: dict[str, dict[str, np.ndarray]] = {}
        for path in sorted(directory.glob(f"{fingerprint}-*.npz")):
            with np.load(path) as z:
                for n, key in enumerate(z["keys"]):
                    self.features[str(key)] = {name: z[name][n] for name in self.names}

    def save(self, keys, feats: dict[str, np.ndarray]):
        self.dir.mkdir(parents=True, exist_ok=True)
        n = len(list(self.dir.glob(f"{self.fp}-*.npz")))
        path = self.dir / f"{self.fp}-{n:04d}.npz"
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, keys=np.array(keys), **{k: feats[k] for k in self.names})
        os.replace(tmp, path)
        for j, key in enumerate(keys):
            self.features[key] = {name: feats[name][j] for name in self.names}


def compute_features(model, tokenizer, rows, layers, cache: FeatureCache, save_every=256,
                     max_tokens=2048) -> dict:
    """Features of ``rows`` (cached ones reused): {name: [n_rows, D]}, and the timing."""
    todo = [r for r in rows if row_key(r) not in cache.features]
    say(f"features: {len(rows) - len(todo)} cached, {len(todo)} to compute")
    tok = wrap_tokenizer(tokenizer)
    start, done = time.perf_counter(), 0
    if todo:
        prepared = [prepare_prompt(tok, [{"role": "user", "content": r["text"]}]) for r in todo]
        order = sorted(range(len(todo)), key=lambda i: len(prepared[i].ids))
        keys, parts = [], []
        for group in batches(prepared, order, max_tokens):
            parts.append(extract_batch(model, [prepared[i] for i in group], layers))
            keys += [row_key(todo[i]) for i in group]
            shown, done = done // 64, done + len(group)
            if len(keys) >= save_every or done == len(todo):
                cache.save(keys, {k: np.concatenate([p[k] for p in parts]) for k in cache.names})
                keys, parts = [], []
            if done // 64 > shown or done == len(todo):
                rate = (time.perf_counter() - start) / done
                say(f"features: {done}/{len(todo)} rows ({rate:.3f} s/row)")
    seconds = time.perf_counter() - start
    feats = {k: np.stack([cache.features[row_key(r)][k] for r in rows]) for k in cache.names}
    return {"features": feats, "computed": done,
            "seconds_per_row": round(seconds / done, 4) if done else None}



def fit_probe(X, y, c=0.1, iters=50):
    """Standardize, then L2 logistic regression with class-balanced weights by damped Newton.
    Objective: sum_i w_i logloss_i + ||beta||^2 / (2c) (bias unpenalized), as scikit-learn."""
    n1, n0 = int(y.sum()), int(len(y) - y.sum())
    if not n1 or not n0:
        raise ProbeError("a fit needs both harmful and benign rows.")
    mu, sd = X.mean(0), X.std(0)
    sd[sd < 1e-8] = 1.0
    Z = np.hstack([(X - mu) / sd, np.ones((len(X), 1))]).astype(np.float64)
    w = np.where(y == 1, len(y) / (2 * n1), len(y) / (2 * n0))
    reg = np.full(Z.shape[1], 1.0 / c)
    reg[-1] = 0.0
    beta = np.zeros(Z.shape[1])

    def objective(b):
        z = Z @ b
        return w @ (np.logaddexp(0, z) - y * z) + 0.5 * reg @ (b * b)

    f = objective(beta)
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(Z @ beta)))
        g = Z.T @ (w * (p - y)) + reg * beta
        if np.abs(g).max() < 1e-6 * len(y):
            break
        H = (Z.T * (w * p * (1 - p))) @ Z + np.diag(reg + 1e-8)
        step, t = np.linalg.solve(H, g), 1.0
        while t > 1e-6:
            f_new = objective(beta - t * step)
            if f_new <= f - 1e-4 * t * (g @ step):
                break
            t /= 2
        beta, f = beta - t * step, f_new
    return mu, sd, beta


def predict(probe, X) -> np.ndarray:
    mu, sd, beta = probe
    return ((X - mu) / sd) @ beta[:-1] + beta[-1] > 0  # p > 0.5


def counts(flags, y) -> dict:
    out = {}
    for label, name in ((1, "harmful"), (0, "benign")):
        sel = flags[y == label]
        if len(sel):
            out[name] = {"n": int(len(sel)), "flagged": int(sel.sum()),
                         "rate": round(float(sel.mean()), 4)}
    return out


def study(rows, feats: dict, c=0.1, min_rows=20, fit=fit_probe) -> dict:
    """Per feature: LOSO folds over the groups with >= ``min_rows`` rows, their worst harmful and
    benign group, and the train -> dev reference."""
    y = np.array([r["label"] for r in rows], np.float64)
    groups = np.array([r["group"] for r in rows])
    families = np.array([r.get("family", r["group"]) for r in rows])
    split = np.array([r["split"] for r in rows])
    sizes = {g: int((groups == g).sum()) for g in sorted(set(groups))}
    reported = [g for g, n in sizes.items() if n >= min_rows]
    results = {}
    for name, X in feats.items():
        folds = {}
        for g in reported:
            test = groups == g
            fitted = families != families[test][0]  # the left-out source's family is not fitted
            if len(set(y[fitted])) < 2:
                raise ProbeError(f"leaving out {g} leaves a single label to fit on.")
            folds[g] = counts(predict(fit(X[fitted], y[fitted], c), X[test]), y[test])
        harm = [(f["harmful"]["rate"], g) for g, f in folds.items() if "harmful" in f]
        ben = [(f["benign"]["rate"], g) for g, f in folds.items() if "benign" in f]
        train, dev = split == "train", split == "dev"
        ref = {}  # the reference needs both labels in train and some dev rows
        if dev.any() and len(set(y[train])) == 2:
            ref = counts(predict(fit(X[train], y[train], c), X[dev]), y[dev])
        results[name] = {
            "folds": folds,
            "worst_harmful": dict(zip(("rate", "source"), min(harm))) if harm else None,
            "worst_benign": dict(zip(("rate", "source"), max(ben))) if ben else None,
            "mean_harmful_recall": round(float(np.mean([r for r, _ in harm])), 4) if harm else None,
            "mean_benign_fp": round(float(np.mean([r for r, _ in ben])), 4) if ben else None,
            "dev": ref,
        }
    return {"group_sizes": sizes, "reported": reported, "results": results}



def pct(x) -> str:
    return "   -  " if x is None else f"{100 * x:5.1f}%"


def table(report: dict) -> str:
    res = report["results"]
    lines = [f"{'feature':<12} {'dev rec':>7} {'dev FP':>7} {'LOSO rec':>8} {'LOSO FP':>8}  "
             "worst harmful (recall)        worst benign (FP)"]
    for name, r in res.items():
        wh, wb = r["worst_harmful"] or {}, r["worst_benign"] or {}
        dev = r["dev"]
        lines.append(
            f"{name:<12} {pct(dev.get('harmful', {}).get('rate')):>7} "
            f"{pct(dev.get('benign', {}).get('rate')):>7} {pct(r['mean_harmful_recall']):>8} "
            f"{pct(r['mean_benign_fp']):>8}  {wh.get('source', '-'):<20} {pct(wh.get('rate')):>7}"
            f"  {wb.get('source', '-'):<20} {pct(wb.get('rate'))}")
    names = list(res)
    lines += ["", "left-out source: share flagged (harmful: recall, benign: FP)",
              f"{'source':<26} {'label':<7} {'n':>5} " + " ".join(f"{n:>9}" for n in names)]
    for g in report["reported"]:
        for label in ("harmful", "benign"):
            first = res[names[0]]["folds"][g].get(label)
            if first:
                rates = " ".join(f"{pct(res[n]['folds'][g][label]['rate']):>9}" for n in names)
                lines.append(f"{g:<26} {label:<7} {first['n']:>5} {rates}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="data dir of mlx_safesig.align.build")
    p.add_argument("--model", help="plain base model: mlx-lm/HF folder or GGUF (default: "
                                   "the embedded SmolLM2 base)")
    p.add_argument("--out", default="probe_study.json")
    p.add_argument("--layers", help="e.g. 8,16,24,last (default: quarter depths and last)")
    p.add_argument("--splits", default="train,dev,test")
    p.add_argument("--min-rows", type=int, default=20)
    p.add_argument("--limit-per-source", type=int)
    p.add_argument("--c", type=float, default=0.1, help="inverse L2 strength (scikit-learn C)")
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--save-every", type=int, default=256)
    a = p.parse_args(argv)
    splits = check_splits(a.splits.split(","))
    out = Path(a.out)
    rows = read_rows(a.data, splits, a.limit_per_source)
    say(f"{len(rows)} rows in {len({r['group'] for r in rows})} sources")
    path = prepare_model_dir(a.model, out.parent / "probe_models")
    from mlx_lm import load

    model, tokenizer = load(str(path))
    layers = parse_layers(a.layers, len(model.model.layers))
    fp = model_fingerprint(path)
    names = feature_names(layers)
    cache = FeatureCache(out.with_name(out.stem + ".cache"), f"{fp}-" + "_".join(map(str, layers)),
                         names)
    got = compute_features(model, tokenizer, rows, layers, cache, a.save_every, a.max_batch_tokens)
    report = {"model": str(path), "fingerprint": fp, "layers": layers, "splits": list(splits),
              "c": a.c, "min_rows": a.min_rows, "limit_per_source": a.limit_per_source,
              "n_rows": len(rows), "rows_computed": got["computed"],
              "seconds_per_row": got["seconds_per_row"],
              **study(rows, got["features"], a.c, a.min_rows)}
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))
    say(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
