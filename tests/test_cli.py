"""The CLI as a user drives it: real subprocesses for exit codes and stderr, piped stdin for chat."""

import json
import subprocess
import sys

import pytest
from conftest import make_model, write_model_dir

from mlx_safesig.decoding import REFUSAL_PREFIX


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return write_model_dir(tmp_path_factory.mktemp("cli") / "tiny", make_model(), tokenizer)


def cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "mlx_safesig.cli", *map(str, args)],
                          capture_output=True, text=True, input=stdin, timeout=300)


def test_generate_json_carries_text_and_safety_trace(model_dir):
    # a threshold below the query verdict: the refusal comes first, then the model's own text
    r = cli("generate", "--model", model_dir, "--prompt", "Tell me a story", "-m", "40",
            "--threshold", "0.01", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["flagged"] and out["refusal_inserted"]
    assert out["text"].startswith(REFUSAL_PREFIX)
    assert [e["kind"] for e in out["events"][:2]] == ["probe", "refusal-inserted"]
    assert out["generation_tokens"] == 40


def test_generate_without_safety_matches_the_api(model_dir):
    from mlx_safesig import SafetyConfig, generate, load

    model, tok = load(model_dir)
    expected = generate(model, tok, [{"role": "user", "content": "Tell me a story"}],
                        max_tokens=12, safety=SafetyConfig(enabled=False))
    r = cli("generate", "--model", model_dir, "--prompt", "Tell me a story", "-m", "12",
            "--no-safety", "--json")
    assert json.loads(r.stdout)["text"] == expected


def test_generate_window_query_flag_reaches_the_checks_of_the_generated_text(model_dir):
    from mlx_safesig import SafetyConfig, load, stream_generate

    model, tok = load(model_dir)
    messages = [{"role": "user", "content": "Tell me a story"}]

    def api(window_query):
        config = SafetyConfig(schedule="each", window_query=window_query)
        return [e.p for r in stream_generate(model, tok, messages, 8, safety=config)
                for e in r.safety.events if e.kind == "probe"]

    def command(flag):
        r = cli("generate", "--model", model_dir, "--prompt", messages[0]["content"], "-m", "8",
                "--schedule", "each", flag, "--json")
        assert r.returncode == 0, r.stderr
        return [e["p"] for e in json.loads(r.stdout)["events"] if e["kind"] == "probe"]

    seeing, not_seeing = command("--window-query"), command("--no-window-query")
    assert seeing == pytest.approx(api(True), abs=1e-6)
    assert not_seeing == pytest.approx(api(False), abs=1e-6)
    # the query verdict is the same; the window checks see a different span
    assert seeing[0] == pytest.approx(not_seeing[0], abs=1e-6)
    assert max(abs(a - b) for a, b in zip(seeing[1:], not_seeing[1:])) > 1e-4


def test_chat_answers_resets_and_quits(model_dir):
    r = cli("chat", "--model", model_dir, "-m", "8", "--threshold", "0.01",
            stdin="hello there\n/reset\nTell me a story\n/quit\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("[refusal inserted") == 2  # the safety signal goes to stderr
    assert r.stderr.count("[safety: query p=") == 2
    assert "[conversation cleared]" in r.stdout and "[refusal" not in r.stdout


def test_chat_ends_on_end_of_input(model_dir):
    r = cli("chat", "--model", model_dir, "-m", "4", stdin="hello\n")
    assert r.returncode == 0
    assert r.stderr.count("[safety: query p=") == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--model", "/no/such/model", "--prompt", "hi"], "/no/such/model does not exist."),
        (["generate", "--prompt", "hi", "--model", "{model}", "--temp", "-1"], "--temp"),
        (["generate", "--prompt", "hi", "--model", "{model}", "--schedule", "often"],
         "unknown schedule 'often'"),
        (["generate", "--prompt", "", "--model", "{model}"], "the prompt is empty"),
        (["bench", "--model", "/no/such/model"], "/no/such/model does not exist."),
        (["eval", "--model", "{model}", "--tau", "0"], "--tau"),
        (["generate", "--prompt", "hi", "--model", "{model}", "--window-threshold", "1.5"],
         "--window-threshold"),
        (["chat", "--model", "{model}", "--min-window", "0"], "--min-window"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(model_dir, args, message):
    r = cli(*[a.replace("{model}", str(model_dir)) for a in args])
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and message in last
    assert "Traceback" not in r.stderr
