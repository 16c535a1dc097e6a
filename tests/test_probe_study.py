"""examples/probe_study.py on the tiny model: its features are the model's own hidden states, a
leave-one-source-out fold never fits on the source it scores, the frozen held-out set is never
read, and the feature cache resumes."""

import builtins
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import load_example, make_model, make_tokenizer, write_model_dir

ps = load_example("probe_study")

WORDS = ["bread", "sea", "robot", "story", "capital", "poem", "fox", "dog", "flour", "water"]


def write_data(path: Path, n_per_source=6, heldout_files=True) -> Path:
    """A builder-like data dir: two harmful and two benign sources (one with a translated copy),
    and heldout files that must never be opened."""
    path.mkdir(parents=True, exist_ok=True)
    sources = {"harmful": ["advbench", "donotanswer", "donotanswer_es"],
               "benign": ["alpaca_gpt4_demo", "everyday_tasks"]}
    for kind, names in sources.items():
        with open(path / f"{kind}.jsonl", "w") as f:
            for s in names:
                for i in range(n_per_source):
                    text = " ".join(WORDS[(i + j + len(s)) % len(WORDS)] for j in range(2 + i % 5))
                    row = {"id": f"{s}-{i}", "text": f"Tell me a {text}.", "source": s,
                           "label": int(kind == "harmful"), "split": ["train", "dev", "test"][i % 3]}
                    f.write(json.dumps(row) + "\n")
    if heldout_files:
        for name in ("heldout.jsonl", "harmful.heldout.jsonl", "benign.heldout.jsonl"):
            (path / name).write_text("not json: must never be read\n")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model_dir = write_model_dir(tmp_path_factory.mktemp("m") / "base", make_model(),
                                make_tokenizer(), safety=False)
    from mlx_lm import load

    model, tok = load(str(model_dir))
    return model_dir, model, tok


def test_features_are_the_models_own_hidden_states(tiny):
    """L{last}/last is the residual stream after the final block at the last prompt token: the
    model's own final norm of it is the model's own output there. A row's features do not depend
    on the longer row it is padded with in a batch."""
    _, model, tok = tiny
    msgs = lambda t: [{"role": "user", "content": t}]  # noqa: E731
    short = ps.prepare_prompt(ps.wrap_tokenizer(tok), msgs("Tell me a story."))
    long = ps.prepare_prompt(ps.wrap_tokenizer(tok), msgs("Write a poem about the sea and a fox."))
    n = len(model.model.layers)
    alone = ps.extract_batch(model, [short], [0, 1, n])
    padded = ps.extract_batch(model, [short, long], [0, 1, n])
    ids = mx.array([short.ids])
    final = model.model(ids)[0, -1]  # mlx-lm's own forward: final-norm hidden states
    assert np.allclose(np.array(model.model.norm(mx.array(alone[f"L{n}/last"][0]))),
                       np.array(final), atol=1e-4)
    h1 = model.model.layers[0](model.model.embed_tokens(ids), "causal", None)[0]
    assert np.allclose(alone["L1/mean"][0], np.array(h1[mx.array(short.query_slots)].mean(0)),
                       atol=1e-5)
    emb = np.array(model.model.embed_tokens(ids)[0])
    assert np.allclose(alone["L0/last"][0], emb[-1])
    for k in alone:
        assert np.allclose(alone[k][0], padded[k][0], atol=1e-4), k
    assert short.query_slots and short.query_slots[-1] < len(short.ids) - 1  # template after it


def test_a_fold_never_fits_on_its_left_out_source():
    """src_a's harmful rows look benign on the shared direction and are separable only by a
    feature no other source has: seen in training they are flagged, left out they are not."""
    rng = np.random.default_rng(0)
    rows, X = [], []
    for g, label, shared, own in (("src_a", 1, -1.0, 5.0), ("src_b", 1, 1.0, 0.0),
                                  ("ben_c", 0, -1.0, 0.0), ("ben_d", 0, -1.0, 0.0)):
        for i in range(25):
            rows.append({"id": f"{g}{i}", "group": g, "label": label, "split": "train"})
            X.append([shared + 0.1 * rng.normal(), own and own + 0.1 * rng.normal(), rng.normal()])
    X = np.array(X)
    y = np.array([r["label"] for r in rows], float)
    groups = np.array([r["group"] for r in rows])
    seen = []

    def spy(Xf, yf, c):
        seen.append(Xf)
        return ps.fit_probe(Xf, yf, c)

    report = ps.study(rows, {"f": X}, c=1.0, min_rows=20, fit=spy)
    folds = report["results"]["f"]["folds"]
    assert folds["src_a"]["harmful"]["rate"] == 0.0  # never saw the feature that marks src_a
    assert folds["src_b"]["harmful"]["n"] == 25
    assert report["results"]["f"]["worst_harmful"] == {"rate": 0.0, "source": "src_a"}
    # each fold's training matrix holds none of its left-out source's rows
    for g, Xf in zip(report["reported"], seen):
        held = {tuple(x) for x in X[groups == g]}
        assert not held & {tuple(x) for x in Xf}, g
    probe = ps.fit_probe(X, y, 1.0)  # with src_a in the fit, its rows are flagged
    assert ps.predict(probe, X[groups == "src_a"]).all()

    # a relative of src_a (one family: same package) carries its marking feature: without
    # families the fold would fit on it and flag src_a; with them it does not
    relatives = [dict(r, id="rel" + r["id"], group="src_a_twin", family="fam")
                 for r in rows if r["group"] == "src_a"]
    rows2 = [dict(r, family="fam" if r["group"] == "src_a" else r["group"]) for r in rows] + relatives
    X2 = np.concatenate([X, X[groups == "src_a"]])
    folds = ps.study(rows2, {"f": X2}, c=1.0, min_rows=20)["results"]["f"]["folds"]
    assert folds["src_a"]["harmful"]["rate"] == 0.0


def test_sources_of_one_package_are_one_family():
    assert ps.family("harmactions_obfuscated") == ps.family("harmactions_safe") == ps.family(
        "harmactions")
    assert ps.family("rho_benign") == ps.family("rho_refusal")
    assert ps.family("advbench") == "advbench" and ps.family("harmbench") != ps.family("donotanswer")


def test_the_heldout_split_and_files_are_never_read(tmp_path, monkeypatch):
    data = write_data(tmp_path / "data")
    opened = []
    real_open = builtins.open

    def spy_open(file, *a, **k):
        opened.append(str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", spy_open)
    rows = ps.read_rows(data)
    assert len(rows) == 30 and opened and not any("heldout" in Path(p).name for p in opened)
    assert {r["group"] for r in rows} == {"advbench", "donotanswer", "alpaca_gpt4_demo",
                                          "everyday_tasks"}  # donotanswer_es -> donotanswer
    with pytest.raises(SystemExit, match="heldout"):
        ps.read_rows(data, splits=("train", "heldout"))
    with pytest.raises(SystemExit, match="heldout"):
        ps.main(["--data", str(data), "--splits", "heldout", "--out", str(tmp_path / "o.json")])
    with open(data / "benign.jsonl", "a") as f:
        f.write(json.dumps({"id": "x", "text": "hi", "source": "everyday_tasks", "label": 0,
                            "split": "heldout"}) + "\n")
    with pytest.raises(SystemExit, match="held-out row"):
        ps.read_rows(data)


def test_the_feature_cache_resumes(tmp_path, tiny, monkeypatch):
    model_dir = tiny[0]
    data = write_data(tmp_path / "data")
    out = tmp_path / "study.json"
    calls = []
    real = ps.extract_batch
    monkeypatch.setattr(ps, "extract_batch", lambda m, b, layers: calls.append(len(b)) or
                        real(m, b, layers))
    args = ["--data", str(data), "--model", str(model_dir), "--out", str(out), "--min-rows", "5",
            "--layers", "1,last", "--save-every", "4"]
    first = ps.main(args + ["--limit-per-source", "5"])
    assert sum(calls) == 20 and first["rows_computed"] == 20
    calls.clear()
    again = ps.main(args + ["--limit-per-source", "5"])
    assert calls == [] and again["rows_computed"] == 0
    assert json.loads(out.read_text())["results"] == first["results"]
    more = ps.main(args)  # all 30 rows: only the 10 new ones are computed
    assert sum(calls) == 10 and more["rows_computed"] == 10
    assert sorted(more["reported"]) == ["advbench", "alpaca_gpt4_demo", "donotanswer",
                                        "everyday_tasks"]
    text = out.read_text()
    assert "Tell me" not in text and not any(w in text for w in WORDS)


def test_a_k_quant_gguf_model_is_converted_directly_and_once(tmp_path, monkeypatch):
    """A Q4_K_M-like GGUF `--model` goes straight through the converter (no F32 GGUF step)."""
    from test_convert_gguf import KQ_SIZES, q4_k_m, write_tiny_gguf
    from test_convert_support import tiny_model, tiny_tokenizer

    src = tmp_path / "tiny-q4_k_m.gguf"
    write_tiny_gguf(src, tiny_model("llama", tie=False, **KQ_SIZES), tiny_tokenizer(), q4_k_m())
    target = ps.prepare_model_dir(str(src), tmp_path / "work")
    assert (target / "config.json").is_file()
    assert [p.name for p in (tmp_path / "work").iterdir()] == [target.name]
    calls = []
    monkeypatch.setattr("mlx_safesig.convert.convert", lambda *a, **k: calls.append(a))
    assert ps.prepare_model_dir(str(src), tmp_path / "work") == target and not calls
