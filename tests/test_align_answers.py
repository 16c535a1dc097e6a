"""The base model's answers for the rows stage: worker processes give the same answers."""

import json

import pytest
from conftest import make_model, write_model_dir

from mlx_safesig.align import answers
from mlx_safesig.align import rows as md


@pytest.fixture(scope="module")
def plain_model_dir(tmp_path_factory, tokenizer):
    """A tiny plain mlx-lm model folder (no safety weights), as mlx_lm.load reads it."""
    return str(write_model_dir(tmp_path_factory.mktemp("base"), make_model(), tokenizer,
                               safety=False))


def prompt_rows(n):
    return [{"id": f"r{i}", "text": "word " * (1 + i % 5) + str(i)} for i in range(n)]


def test_workers_give_the_answers_of_one_process(tmp_path, plain_model_dir):
    """Two spawned workers generate whole batches: the same batches as one process, so the same
    answers, written to the cache in the same order."""
    rows = prompt_rows(7)
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    a, fa = answers.generate_missing(rows, one, plain_model_dir, 6, 2, "m", log=lambda m: None)
    b, fb = answers.generate_missing(rows, two, plain_model_dir, 6, 2, "m", log=lambda m: None,
                                workers=2)
    assert a == b and fa == fb and set(a) == {r["id"] for r in rows}
    assert one.read_text() == two.read_text()
    assert any(a.values())  # a random tiny model still says something


def test_progress_counts_rows_in_order(tmp_path, plain_model_dir):
    said = []
    answers.generate_missing(prompt_rows(5), tmp_path / "g.jsonl", plain_model_dir, 3, 2, "m",
                        log=said.append, workers=2)
    assert said == ["generating 5 answers of the base model in 2 processes", "generated 2/5",
                    "generated 4/5", "generated 5/5"]
    assert [json.loads(ln)["max_tokens"] for ln in (tmp_path / "g.jsonl").open()] == [3] * 5


def test_workers_get_one_blas_thread_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    with answers._one_blas_thread():
        assert answers.os.environ["OPENBLAS_NUM_THREADS"] == "1"
    assert "OPENBLAS_NUM_THREADS" not in answers.os.environ
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    with answers._one_blas_thread():
        assert answers.os.environ["OPENBLAS_NUM_THREADS"] == "2"


def test_default_workers_one_per_core_up_to_four_on_cpu(monkeypatch):
    import mlx.core as mx

    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    monkeypatch.setattr(answers.os, "cpu_count", lambda: 2)
    assert answers.default_workers() == 2
    monkeypatch.setattr(answers.os, "cpu_count", lambda: 64)
    assert answers.default_workers() == 4
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    assert answers.default_workers() == 1


def test_rows_refuses_zero_workers():
    assert md.option_error(md.RowsOptions(workers=0)) == "--workers must be at least 1, got 0"
