"""examples/verdict_only_rows.py: verdict-only training rows from a built data folder (the same
short answer for every prompt), left-out sources with their translations, and rows `train` reads."""

import hashlib
import json

import pytest
from conftest import load_example, write_jsonl

from mlx_safesig.data import load_dataset

vor = load_example("verdict_only_rows")


@pytest.fixture
def data(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    for split in ("train", "dev"):
        write_jsonl(d / f"harmful.{split}.jsonl", [
            {"id": f"h1{split}", "text": f"request a {split}", "source": "advbench"},
            {"id": f"h2{split}", "text": f"request b {split}", "source": "advbench_es"},
            {"id": f"h3{split}", "source": "deepteam", "messages": [
                {"role": "user", "content": "first part"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": f"second part {split}"}]}])
        write_jsonl(d / f"benign.{split}.jsonl", [
            {"id": f"b1{split}", "text": f"question {split}", "source": "exams_es"}])
    (d / "heldout.jsonl").write_text("not json: never opened\n")
    return d


def test_rows_give_every_prompt_the_same_answer_and_train_reads_them(data, tmp_path, tokenizer,
                                                                     capsys):
    out = tmp_path / "rows"
    report = vor.main(["--data", str(data), "--out", str(out), "--response", "Fine."])
    assert report["counts"] == {"train": {"harmful": 3, "benign": 1},
                                "dev": {"harmful": 3, "benign": 1}}
    lines = (out / "train.jsonl").read_text().splitlines()
    assert lines == sorted(lines, key=lambda x: hashlib.sha256(x.encode()).hexdigest())  # mixed
    rows = [json.loads(x) for x in lines]
    assert sorted(r["label"] for r in rows) == [0, 1, 1, 1]
    rows = sorted(rows, key=lambda r: (-r["label"], r["source"]))
    assert all(r["messages"][-1] == {"role": "assistant", "content": "Fine."} for r in rows)
    assert rows[0]["messages"][0] == {"role": "user", "content": "request a train"}
    assert [m["content"] for m in rows[2]["messages"][:3]] == ["first part", "ok", "second part train"]
    train, valid = load_dataset(out, tokenizer, 512)
    assert sorted(ex.label for ex in train) == [0, 1, 1, 1] and len(valid) == 4
    assert "request" not in capsys.readouterr().out  # counts only, never prompt text
    report = vor.main(["--data", str(data), "--out", str(out), "--max-chars", "16"])
    assert report["counts"]["train"] == {"harmful": 2, "benign": 1}  # "second part train": 27 + 2


def test_leave_out_drops_a_source_and_its_translations(data, tmp_path):
    """``advbench_es`` is a translation of ``advbench`` (it goes with it); ``exams_es`` is a source
    of its own, natively Spanish, not a translation of an ``exams``."""
    out = tmp_path / "rows"
    report = vor.main(["--data", str(data), "--out", str(out), "--leave-out", "advbench"])
    assert report["counts"]["train"] == {"harmful": 1, "benign": 1}
    assert report["left_out"] == ["advbench"] and report["trained_sources"] == 2
    sources = {json.loads(x)["source"] for x in (out / "train.jsonl").read_text().splitlines()}
    assert sources == {"deepteam", "exams_es"}
    with pytest.raises(SystemExit, match="no training source named exams"):
        vor.main(["--data", str(data), "--out", str(tmp_path / "x"), "--leave-out", "exams"])
    with pytest.raises(SystemExit, match="no training source named zz"):
        vor.main(["--data", str(data), "--out", str(tmp_path / "x"), "--leave-out", "zz"])
    (data / "benign.dev.jsonl").unlink()
    with pytest.raises(SystemExit, match="benign.dev.jsonl does not exist"):
        vor.main(["--data", str(data), "--out", str(tmp_path / "y")])
    assert not (tmp_path / "y").exists()
