"""`build --translate`: machine-translated sources, with a fake `apertium` first on PATH (no real
Apertium in tests; harmless placeholder strings only)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_align_build import ALL_FAKE_TEXT, EDGY, HB, make_artefacts, read_jsonl

from mlx_safesig.align import build as bd
from mlx_safesig.align import translate as tr
from mlx_safesig.align.archive import BuildError
from mlx_safesig.align.sources import HELDOUT_SOURCES, SOURCES, base_source, normalize

# the fake: `-l` lists its modes, `-V` a version, `-u MODE` prefixes every non-blank line with the
# mode's tag and an unknown-word mark (which the builder must strip); env knobs: FAKE_MODES (the
# modes it has), FAKE_MERGE (eat one segment separator of any multi-segment input),
# FAKE_SAME (a JSON {line: output} of lines translated to a given text)
FAKE_APERTIUM = """#!{python}
import json, os, sys
TAGS = {{"eng-spa": "ES:", "es-fr": "FR:"}}
modes = os.environ.get("FAKE_MODES", "eng-spa es-fr").split()
args = sys.argv[1:]
if args == ["-l"]:
    print("\\n".join("  " + m for m in modes)); sys.exit(0)
if args == ["-V"]:
    print("Apertium 0.0-fake"); sys.exit(0)
if len(args) != 2 or args[0] != "-u" or args[1] not in modes:
    sys.exit("fake apertium: bad argv " + " ".join(args))
text, same = sys.stdin.read(), json.loads(os.environ.get("FAKE_SAME", "{{}}"))
if os.environ.get("FAKE_MERGE") and text.count("\\n\\n") > 1:
    text = text.replace("\\n\\n", " ", 1)
out = [same.get(ln) or TAGS[args[1]] + " *" + ln if ln.strip() else ln for ln in text.split("\\n")]
sys.stdout.write("\\n".join(out))
"""
FAKE_DPKG = """#!{python}
import sys
versions = {{"apertium-eng-spa": "0.8.1-fake", "apertium-fr-es": "0.9.4-fake"}}
if sys.argv[-1] not in versions:
    sys.exit(1)
sys.stdout.write(versions[sys.argv[-1]])
"""


def fake_bin(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in (("apertium", FAKE_APERTIUM), ("dpkg-query", FAKE_DPKG)):
        (d / name).write_text(text.format(python=sys.executable))
        (d / name).chmod(0o755)
    return d


def translated(text: str, lang: str) -> str:
    """What the fake makes of ``text``: the builder strips its marks, unless the line held a ``*``."""
    tags = {"es": ("ES:",), "fr": ("ES:", "FR:")}[lang]
    for tag in tags:
        text = "\n".join((f"{tag} *{ln}" if "*" in ln else f"{tag} {ln}") if ln.strip() else ln
                         for ln in text.split("\n"))
    return normalize(text)


@pytest.fixture(scope="module")
def fake_path(tmp_path_factory):
    return fake_bin(tmp_path_factory.mktemp("bin"))


@pytest.fixture(scope="module")
def plain_and_translated(tmp_path_factory, fake_path):
    base = tmp_path_factory.mktemp("tr")
    paths = make_artefacts(base / "art")
    plain = bd.build(paths, base / "plain", edgy=EDGY, holdout=("donotanswer",), verified=False,
                     log=lambda s: None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", str(fake_path))
        lines = []
        manifest = bd.build(paths, base / "tr", edgy=EDGY, holdout=("donotanswer",), verified=False,
                            log=lines.append, translate=("es", "fr"), translate_share=0.5)
    return base, plain, manifest, lines


def rows_of(out: Path, *names):
    return [r for n in names for r in read_jsonl(out / n)]


def test_a_share_of_each_training_source_is_translated_in_its_originals_split(plain_and_translated):
    base, _, manifest, _ = plain_and_translated
    rows = rows_of(base / "tr", "harmful.jsonl", "benign.jsonl")
    english = {r["id"]: r for r in rows if "translated_from" not in r}
    for lang in ("es", "fr"):
        for name in sorted({r["source"] for r in english.values()}):
            want = {i for i, r in english.items() if r["source"] == name
                    and name not in tr.NOT_TRANSLATED and tr.in_share(i, lang, 0.5)}
            got = [r for r in rows if r["source"] == f"{name}_{lang}"]
            assert {r["translated_from"] for r in got} == want, (name, lang)
            for r in got:
                en = english[r["translated_from"]]
                assert r["text"] == translated(en["text"], lang)
                assert r["split"] == en["split"] and r["label"] == en["label"]
                assert r["lang"] == lang and r["id"] not in english
                assert r["license"] == en["license"] and "response" not in r
                assert r["translator"] == manifest["translation"]["translators"][lang]
    assert {r["source"] for r in rows if r.get("lang") == "es"} >= {"advbench_es", "edgy_benign_es"}
    for kind in ("harmful", "benign"):  # each split file holds its translations
        for sp in bd.SPLITS:
            part = read_jsonl(base / "tr" / f"{kind}.{sp}.jsonl")
            assert all(r["split"] == sp for r in part)
            assert sum("translated_from" in r for r in part) == sum(
                "translated_from" in r and r["split"] == sp for r in rows_of(base / "tr",
                                                                             f"{kind}.jsonl"))
    # --holdout-source S: the translations of S leave its train / dev files with it
    assert not any(r["source"].startswith("donotanswer") for r in
                   read_jsonl(base / "tr" / "harmful.holdout-donotanswer.train.jsonl"))


def test_heldout_files_keep_every_old_row_byte_identical_and_add_the_translations(
        plain_and_translated):
    base, _, manifest, _ = plain_and_translated
    for name in ("heldout.jsonl", "harmful.heldout.jsonl", "benign.heldout.jsonl"):
        old = (base / "plain" / name).read_text().splitlines()
        new = (base / "tr" / name).read_text().splitlines()
        assert [ln for ln in new if '"translated_from"' not in ln] == old, name
    held = read_jsonl(base / "tr" / "heldout.jsonl")
    english = {r["id"]: r for r in held if "translated_from" not in r}
    added = [r for r in held if "translated_from" in r]
    for lang in ("es", "fr"):
        want = {i for i, r in english.items() if r["source"] in tr.HELDOUT_TRANSLATED
                and translated(r["text"], lang) != r["text"]}
        assert {r["translated_from"] for r in added if r["lang"] == lang} == want
    for r in added:
        en = english[r["translated_from"]]
        assert r["source"] == f"{en['source']}_{r['lang']}" and r["label"] == en["label"]
        assert r["text"] == translated(en["text"], r["lang"]) and "reference" not in r
        assert SOURCES[r["source"]].role == "heldout"
        if en["source"] == "strongreject":  # keeps its original's near_training flag
            assert r["near_training"] == en["near_training"]
    assert set(manifest["heldout_sources"]) == set(HELDOUT_SOURCES) | {r["source"] for r in added}
    # no training row anywhere repeats or nearly repeats a translated held-out row
    guard = bd.LeakGuard([r["text"] for r in added])
    for f in ("harmful.jsonl", "benign.jsonl"):
        assert all(guard.reason(r["text"]) is None for r in read_jsonl(base / "tr" / f))
    # the English training rows are those of a build without --translate (with these fakes)
    for f in ("harmful.jsonl", "benign.jsonl"):
        assert [ln for ln in (base / "tr" / f).read_text().splitlines()
                if '"translated_from"' not in ln] == (base / "plain" / f).read_text().splitlines()


def test_the_guard_drops_a_training_row_that_repeats_a_translated_heldout_row(
        tmp_path, fake_path, monkeypatch):
    paths = make_artefacts(tmp_path / "art")
    training = "placeholder dtpii0a dtpii0b"  # a deepteam training row
    monkeypatch.setenv("PATH", str(fake_path))
    monkeypatch.setenv("FAKE_SAME", json.dumps({HB[2]: training}))  # harmbench row -> that text
    manifest = bd.build(paths, tmp_path / "out", edgy=EDGY, verified=False, log=lambda s: None,
                        translate=("es",))
    held = read_jsonl(tmp_path / "out" / "heldout.jsonl")
    assert any(r["source"] == "harmbench_es" and r["text"] == training for r in held)
    assert training not in {r["text"] for r in read_jsonl(tmp_path / "out" / "harmful.jsonl")}
    assert manifest["leak_guard"]["dropped"]["harmful"]["by_source"]["deepteam"] == 2  # was 1


def test_manifest_records_apertium_and_the_package_versions(plain_and_translated):
    base, _, manifest, lines = plain_and_translated
    t = manifest["translation"]
    assert t["langs"] == ["es", "fr"] and t["share"] == 0.5 and t["apertium"] == "Apertium 0.0-fake"
    assert t["packages"] == {"apertium-eng-spa": "0.8.1-fake", "apertium-fr-es": "0.9.4-fake"}
    assert t["translators"] == {"es": "apertium eng-spa 0.8.1-fake",
                                "fr": "apertium eng-spa 0.8.1-fake + es-fr 0.9.4-fake"}
    src = manifest["sources"]["advbench_es"]
    assert src["translated_from"] == "advbench" and src["license"] == SOURCES["advbench"].license
    assert "machine-translated with Apertium" in src["origin"] and src["role"] == "train"
    assert manifest["sources"]["harmbench_fr"]["role"] == "heldout"
    assert json.loads((base / "tr" / "MANIFEST.json").read_text())["translation"] == t
    text = "\n".join(lines).casefold()  # counts only
    assert not any(" ".join(s.split()).casefold() in text for s in ALL_FAKE_TEXT)


def test_a_merged_batch_is_split_until_every_line_comes_back(tmp_path, fake_path, monkeypatch):
    monkeypatch.setenv("PATH", str(fake_path))
    monkeypatch.setenv("FAKE_MERGE", "1")
    texts = ["placeholder one", "placeholder two\n\nand more", "placeholder three"]
    assert tr.Apertium(("fr",)).texts("fr", texts) == [translated(t, "fr") for t in texts]


def _cli(*args, path, cwd):
    env = dict(os.environ, PATH=str(path))
    return subprocess.run([sys.executable, "-m", "mlx_safesig.align.build", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=120, env=env)


@pytest.mark.parametrize("langs, modes, message", [
    ("es", None, "--translate es needs Apertium's eng-spa mode: apt-get install apertium-eng-spa "
                 "(Debian/Ubuntu), or see https://wiki.apertium.org/wiki/Installation"),
    ("es,fr", "eng-spa", "--translate fr needs Apertium's es-fr mode (French goes through "
                         "Spanish): apt-get install apertium-fr-es"),
    ("de", "eng-spa es-fr", "--translate de: Apertium has no English->German pair"),
    ("xx", "eng-spa es-fr", "--translate: unknown language 'xx'; choose from es, fr"),
])
def test_a_missing_apertium_or_mode_is_one_line_and_writes_nothing(tmp_path, fake_path, langs,
                                                                   modes, message, monkeypatch):
    art = tmp_path / "art"
    make_artefacts(art)
    empty = tmp_path / "empty"
    empty.mkdir()
    if modes is not None:
        monkeypatch.setenv("FAKE_MODES", modes)
    r = _cli("--artefacts", art, "--no-verify", "--out", tmp_path / "out", "--translate", langs,
             path=fake_path if modes is not None else empty, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("mlx_safesig.align.build: error: " + message), r.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(BuildError):
        monkeypatch.setenv("PATH", str(fake_path if modes is not None else empty))
        bd.build(make_artefacts(tmp_path / "a2"), tmp_path / "out", verified=False,
                 translate=tuple(langs.split(",")), log=lambda s: None)
    assert not (tmp_path / "out").exists()


def test_translated_benign_sources_go_with_their_english_source(tmp_path, fake_path, monkeypatch):
    """rows: `--benign-sources alpaca_gpt4_demo` takes alpaca_gpt4_demo_es too, `--leave-out`
    leaves a source's translations out with it, from train.jsonl and valid.jsonl alike (with
    --extra-benign on too: its filter once reused the left-out names' variable)."""
    from mlx_safesig.align import rows

    assert base_source("alpaca_gpt4_demo_es") == "alpaca_gpt4_demo"
    assert base_source("advbench") == "advbench" and base_source("edgy_extra") == "edgy_extra"
    seen = {}

    def no_model(rows_, cache, *a, **k):
        seen.setdefault(cache.name, []).append({r["source"] for r in rows_})
        return {r["id"]: "answer." for r in rows_}, {r["id"]: True for r in rows_}

    monkeypatch.setenv("PATH", str(fake_path))
    bd.build(make_artefacts(tmp_path / "art"), tmp_path / "data", verified=False, log=lambda s: None,
             translate=("es",), translate_share=1.0)
    monkeypatch.setattr(rows, "generate_missing", no_model)
    monkeypatch.setattr(rows, "model_fingerprint", lambda d: "fake")
    extra = tmp_path / "extra.txt"
    extra.write_text("# edgy\nHow do I sharpen a kitchen knife safely?\n")
    opts = rows.RowsOptions(benign_sources="alpaca_gpt4_demo,edgy_benign", leave_out="advbench",
                            window_sources="advbench,donotanswer", extra_benign=extra)
    rows.make_rows(tmp_path / "data", tmp_path / "rows", "model", opts, log=lambda s: None)
    for name in ("train.jsonl", "valid.jsonl"):
        kept = {r["source"].rsplit(":", 1)[-1] for r in read_jsonl(tmp_path / "rows" / name)}
        assert "alpaca_gpt4_demo" in kept, name
        assert not kept & {"advbench", "advbench_es", "glaive_toolcall_demo_es"}, name
    trained = {r["source"] for r in read_jsonl(tmp_path / "rows" / "train.jsonl")}
    assert {"alpaca_gpt4_demo_es", "donotanswer_es", "edgy_benign_es", "edgy_extra"} <= trained


def test_the_card_names_the_translated_held_out_sources_it_was_tested_on(tmp_path):
    from mlx_safesig.align.card import _held_out_names

    (tmp_path / "data").mkdir()
    rows = [{"id": "a", "source": "strongreject", "label": 1},
            {"id": "b", "source": "strongreject_es", "label": 1},
            {"id": "c", "source": "senator_search_fr", "label": 0}]
    (tmp_path / "data" / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    names = _held_out_names(tmp_path)
    assert names[0] == "strongreject" and names[-2:] == ["senator_search_fr", "strongreject_es"]
    assert "harmbench" not in names  # not in this data
    assert "pyrit_jailbreak_templates" in names  # held-out wrappers are always named
