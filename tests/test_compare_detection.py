"""examples/compare_detection.py: the release rule a candidate must pass on dev, part by part, on
hand-made detection reports (counts only)."""

import json

import pytest
from conftest import load_example

cd = load_example("compare_detection")


def report(sources: dict) -> dict:
    """A detection.json of ``{(suite, source): (label, flagged, n)}``."""
    suites: dict = {}
    for (suite, name), (label, flagged, n) in sources.items():
        suites.setdefault(suite, {"sources": {}})["sources"][name] = {
            "label": label, "flagged": flagged, "n": n}
    return {"suites": suites}


SHIPPED = {
    ("plain", "advbench"): (1, 24, 24),
    ("plain", "deepteam"): (1, 19, 24),
    ("plain", "tiny_harmful"): (1, 1, 4),  # under MIN_ROWS: no part in rule 1
    ("plain", "edgy_benign"): (0, 1, 50),
    ("plain", "advbench_es"): (1, 15, 20),
    ("plain", "edgy_benign_es"): (0, 2, 20),
    ("plain", "advbench_fr"): (1, 18, 20),
    ("plain", "edgy_benign_fr"): (0, 1, 20),
    ("wrapped", "edgy_benign+wrapped"): (0, 10, 20),
    ("wrapped", "advbench+wrapped"): (1, 20, 20),
    ("conversation", "advbench+split"): (1, 22, 24),
    ("conversation", "deepteam+split"): (1, 20, 24),
    ("conversation", "edgy_benign+follow-up"): (0, 0, 24),
}


def run(tmp_path, candidate: dict, shipped: dict = SHIPPED):
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(report(shipped)))
    new.write_text(json.dumps(report(candidate)))
    return cd.main([str(old), str(new)])


def failed(capsys) -> list:
    return [ln.split(":")[0][5:] for ln in capsys.readouterr().out.splitlines()
            if ln.startswith("rule ") and ": FAIL" in ln]


def test_a_candidate_better_everywhere_passes(tmp_path, capsys):
    better = dict(SHIPPED)
    better[("wrapped", "edgy_benign+wrapped")] = (0, 4, 20)
    assert run(tmp_path, better) is True
    out = capsys.readouterr().out
    assert "rule 4 wrapped: pass (benign 10/20 -> 4/20, harmful 20/20 -> 20/20)" in out
    assert out.rstrip().endswith("candidate passes the rule")


def test_each_part_of_the_rule_can_fail_alone(tmp_path, capsys):
    base = dict(SHIPPED)
    base[("wrapped", "edgy_benign+wrapped")] = (0, 4, 20)  # rule 4 passes unless changed
    cases = {
        "1 harmful sources": {("plain", "deepteam"): (1, 17, 24)},  # 79.2 -> 70.8: > 5 points
        "2 benign sources": {("plain", "edgy_benign"): (0, 3, 50)},  # 2% -> 6%
        "3 es": {("plain", "advbench_es"): (1, 14, 20)},
        "3 fr": {("plain", "edgy_benign_fr"): (0, 2, 20)},
        "4 wrapped": {("wrapped", "edgy_benign+wrapped"): (0, 10, 20)},  # not lower
        "5 conversation split": {("conversation", "deepteam+split"): (1, 18, 24)},
    }
    for rule, change in cases.items():
        assert run(tmp_path, {**base, **change}) is False, rule
        assert failed(capsys) == [rule]


def test_small_sources_and_a_small_drop_do_not_fail_rule_1(tmp_path, capsys):
    candidate = dict(SHIPPED)
    candidate[("wrapped", "edgy_benign+wrapped")] = (0, 4, 20)
    candidate[("plain", "tiny_harmful")] = (1, 0, 4)  # 25% -> 0%, but 4 rows
    candidate[("plain", "advbench")] = (1, 23, 24)  # 4.2 points lower, still above the worst
    assert run(tmp_path, candidate) is True
    assert failed(capsys) == []


def test_sources_only_the_candidate_has_are_listed_new_and_take_no_part(tmp_path, capsys):
    candidate = dict(SHIPPED)
    candidate[("wrapped", "edgy_benign+wrapped")] = (0, 4, 20)
    candidate[("plain", "exams_es")] = (0, 20, 20)  # all flagged: would fail rule 3 if counted
    candidate[("plain", "newsource")] = (1, 0, 30)  # would fail rule 1 if counted
    assert run(tmp_path, candidate) is True
    out = capsys.readouterr().out
    assert "exams_es" in out and out.count("(new)") == 2
    assert "rule 3 es: pass (harmful 15/20 -> 15/20, benign 2/20 -> 2/20)" in out


def test_runs_too_small_for_a_rule_fail_it_as_not_judged(tmp_path, capsys):
    small = {k: (label, min(f, 10), min(n, 10)) for k, (label, f, n) in SHIPPED.items()}
    assert run(tmp_path, small, small) is False
    out = capsys.readouterr().out
    assert ("rule 1 harmful sources: FAIL (not judged: no harmful source "
            f"with {cd.MIN_ROWS} rows or more (a run with --limit {cd.MIN_ROWS}+))") in out
    assert "rule 5 conversation split: FAIL (not judged" in out


def test_missing_or_bad_report_is_one_line(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(report(SHIPPED)))
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    for argv, name in (([str(tmp_path / "absent.json"), str(good)], "absent.json"),
                       ([str(good), str(bad)], "bad.json")):
        with pytest.raises(SystemExit) as e:
            cd.main(argv)
        message = str(e.value.code)
        assert message.startswith(f"error: {tmp_path / name}: not a detection.json")
        assert "\n" not in message
