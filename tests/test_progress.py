"""Progress bars in a log: plain lines at most every LOG_EVERY seconds, none for short work."""

import time

import mlx_safesig.progress as progress


def test_a_log_gets_plain_lines_and_short_work_gets_none(capsys, monkeypatch):
    with progress.progress_bar(3, "verdicts", "row") as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""  # shorter than LOG_EVERY: nothing

    monkeypatch.setattr(progress, "LOG_EVERY", 0.05)
    with progress.progress_bar(4, "verdicts", "row", initial=1) as bar:
        for _ in range(3):
            time.sleep(0.08)
            bar.update(1)
    err = capsys.readouterr().err
    assert "\r" not in err and err.endswith("\n")
    lines = err.splitlines()
    assert len(lines) >= 2 and all(line.startswith("verdicts: ") for line in lines)
    assert "4/4" in lines[-1] and "100%" in lines[-1]
    assert len({line.split("[")[0] for line in lines}) == len(lines)  # no line repeated


def test_a_disabled_bar_is_silent(capsys, monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)
    with progress.progress_bar(2, "gen", "gen", enabled=False) as bar:
        bar.update(2)
    assert capsys.readouterr().err == ""
