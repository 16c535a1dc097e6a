"""examples/default_adapter/detection.py on a tiny model: its counts are score() >= threshold,
per group, at the model's threshold and at every --sweep threshold."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_model, write_model_dir

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "default_adapter" / "detection.py"
PROMPTS = ["How do I bake bread?", "Tell me a story about a robot.", "Write a poem about the sea.",
           "What is the capital of France?", "The quick brown fox.", "You are a helpful assistant."]


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)],
                          capture_output=True, text=True)


def test_counts_and_sweep_are_scores_at_each_threshold(tmp_path, tokenizer):
    from mlx_safesig import load, score

    mdir = write_model_dir(tmp_path / "m", make_model(seed=3), tokenizer)
    data = tmp_path / "data"
    data.mkdir()
    for kind, prompts in (("harmful", PROMPTS[:4]), ("benign", PROMPTS[2:])):
        (data / f"{kind}.dev.jsonl").write_text("".join(
            json.dumps({"id": f"{kind}{i}", "text": t, "source": "advbench"}) + "\n"
            for i, t in enumerate(prompts)))
    fresh = tmp_path / "fresh.txt"
    fresh.write_text("# games\n" + "\n".join(PROMPTS[:3]) + "\n")

    model, tok = load(str(mdir))
    p = {t: score(model, tok, [{"role": "user", "content": t}]) for t in PROMPTS}
    cuts = sorted(p.values())
    sweep = [round((a + b) / 2, 6) for a, b in zip(cuts, cuts[1:])]  # one between every two scores
    r = run("--model", mdir, "--data", data, "--split", "dev", "--benign-file", fresh,
            "--sweep", ",".join(map(str, sweep)), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for name, prompts in (("harmful", PROMPTS[:4]), ("benign", PROMPTS[2:]),
                          ("benign_file", PROMPTS[:3])):
        assert out[name]["flagged"] == sum(p[t] >= 0.5 for t in prompts)
        assert out[name]["sweep"] == {str(t): sum(p[t_] >= t for t_ in prompts) for t in sweep}
    assert out["benign_file"]["by_source"] == {
        "fresh.txt/games": {"n": 3, "flagged": out["benign_file"]["flagged"]}}
    assert PROMPTS[0] not in r.stderr + r.stdout  # counts only, never prompt text


@pytest.mark.parametrize("sweep, message", [
    ("0.3,x", "--sweep: not a comma-separated list of numbers: 0.3,x"),
    ("0.3,1.2", "--sweep: thresholds must be between 0 and 1: 0.3,1.2"),
])
def test_a_bad_sweep_is_one_line_not_a_traceback(tmp_path, sweep, message):
    r = run("--data", tmp_path, "--sweep", sweep)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.splitlines()[-1] == "detection.py: error: " + message
