"""What a user sees from `generate` and `chat`: where text and markers go, bad input, Ctrl-C,
chat commands, option names. Most tests drive the CLI in-process with a scripted
``stream_generate``, so the expected output is exact; a few use the tiny random model."""

import importlib
import json
import os
import pty
import re
import select
import termios
import time

import pytest
from click.testing import CliRunner
from conftest import make_model, write_model_dir

from mlx_safesig import loading, prefill
from mlx_safesig.cli import main
from mlx_safesig.decoding import REFUSAL_PREFIX, SafetyEvent
from mlx_safesig.generate import GenerationResult, SafetySignal
from mlx_safesig.terminal import keys_held_back

# the package's `generate` is the function, not the module
generate_module = importlib.import_module("mlx_safesig.generate")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return write_model_dir(tmp_path_factory.mktemp("ui") / "tiny", make_model(), tokenizer)


def step(text, n, events=(), p=0.1, inserted=False, finish=None):
    return GenerationResult(
        text=text, token=None if not text else n, logprobs=None,
        safety=SafetySignal(p=p, query_p=0.1, inserted=inserted, events=list(events)),
        prompt_tokens=3, prompt_tps=100.0, generation_tokens=n, generation_tps=10.0,
        peak_memory=0.0, finish_reason=finish)


@pytest.fixture
def scripted(monkeypatch):
    """``stream_generate`` replaced by a script; ``calls`` holds the messages of every call."""
    calls, scripts = [], []

    def stream(model, tokenizer, messages, *args, **kwargs):
        calls.append([dict(m) for m in messages])
        yield from scripts.pop(0)() if scripts else iter([step("Hi.", 1, finish="stop")])

    monkeypatch.setattr(generate_module, "stream_generate", stream)
    monkeypatch.setattr(loading, "load", lambda *a, **k: (None, None))
    monkeypatch.setattr(prefill, "make_prompt_cache", lambda model: None)
    return calls, scripts


def run(*args, stdin=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=stdin)


ROLLED_BACK = [
    step("Sure", 1), step(" here", 2, [SafetyEvent("flip", 2, 0.7)], p=0.7),
    step("", 2, [SafetyEvent("refusal-inserted", 1, 0.9), SafetyEvent("retracted", 1, 0.9, " here")],
         p=0.9, inserted=True),
    step(" Sorry.", 3, p=0.9, inserted=True, finish="stop"),
]


def test_rollback_never_shows_the_withdrawn_text(scripted):
    scripted[1].append(lambda: iter(ROLLED_BACK))
    r = run("generate", "-p", "hi", "--rollback")
    assert r.exit_code == 0, r.output
    assert r.stdout == "Sure Sorry.\n"  # what --json calls the text
    assert r.stderr.startswith("[refusal inserted, p=0.90][retracted 5 chars]")


def test_markers_and_speed_go_to_stderr_the_text_to_stdout(model_dir):
    from mlx_safesig import SafetyConfig, generate, load

    net, tok = load(model_dir)
    text = generate(net, tok, [{"role": "user", "content": "Tell me a story"}], max_tokens=6,
                    safety=SafetyConfig(threshold=0.01))
    r = run("generate", "--model", model_dir, "-p", "Tell me a story", "-m", "6",
            "--threshold", "0.01")
    assert r.exit_code == 0, r.output
    assert r.stdout == text + "\n" and REFUSAL_PREFIX[:8] in text
    assert r.stderr.startswith("[refusal inserted, p=")
    assert re.search(r"\]\[6 tokens, [\d.]+ tok/s; query p\(malicious\)=\d\.\d\d\]\n$", r.stderr)


def test_one_token_has_no_rate(model_dir):
    r = run("generate", "--model", model_dir, "-p", "Tell me a story", "-m", "1")
    assert r.exit_code == 0, r.output
    assert re.fullmatch(r"\[1 token; query p\(malicious\)=\d\.\d\d\]", r.stderr.splitlines()[-1])


@pytest.mark.parametrize("args, bad", [
    (["generate", "-p", "hi", "--seed", "-1"], "-1"),
    (["generate", "-p", "hi", "--seed", "123456789012345678901"], "123456789012345678901"),
    (["chat", "--seed", "-1"], "-1"),
])
def test_a_seed_out_of_range_is_one_line_naming_it(args, bad):
    r = run(*args)
    assert r.exit_code == 1
    assert r.stderr.splitlines()[-1] == (
        f"Error: Invalid value for '--seed': {bad} is not in the range 0<=x<=18446744073709551615.")
    assert "Traceback" not in r.output


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_an_empty_or_blank_prompt_is_refused_before_loading(prompt, scripted):
    r = run("generate", "-p", prompt)
    assert r.exit_code == 1
    assert r.stderr.splitlines()[-1] == (
        "Error: the prompt is empty: there is no text for the model to judge.")
    assert scripted[0] == []


def test_ctrl_c_exits_130(monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loading, "load", interrupted)
    r = run("generate", "-p", "hi")
    assert r.exit_code == 130
    assert r.stderr.splitlines()[-1] == "Aborted."


def test_chat_help_and_unknown_commands_never_reach_the_model(scripted):
    calls, _ = scripted
    r = run("chat", stdin="/help\n/frobnicate\nhello\n/quit\n")
    assert r.exit_code == 0, r.output
    assert (">> /help shows this, /reset clears the conversation, /quit (or Ctrl-D) leaves; "
            "Ctrl-C stops the current reply.\n") in r.stdout
    assert ">> unknown command /frobnicate; /help lists the commands.\n" in r.stdout
    assert calls == [[{"role": "user", "content": "hello"}]]


def test_chat_forgets_a_reply_stopped_with_ctrl_c(scripted):
    calls, scripts = scripted

    def stopped():
        yield step("Par", 1)
        raise KeyboardInterrupt

    scripts.append(stopped)
    r = run("chat", stdin="first\nsecond\n/quit\n")
    assert r.exit_code == 0, r.output
    assert calls[1] == [{"role": "user", "content": "second"}]
    assert "[stopped]" in r.stderr


def test_chat_help_says_when_the_safety_signal_is_shown():
    help_text = " ".join(run("chat", "--help").stdout.split())
    assert "live" not in help_text
    assert "Each reply is followed by its safety signal" in help_text
    assert "an inserted refusal is marked where it happens" in help_text


def test_keys_typed_during_a_reply_are_not_echoed_nor_kept():
    master, slave = pty.openpty()
    with os.fdopen(slave, "r") as stream:
        echo_before = termios.tcgetattr(slave)[3] & termios.ECHO
        with keys_held_back(stream):
            assert termios.tcgetattr(slave)[3] & termios.ECHO == 0
            os.write(master, b"typed ahead\n")
            time.sleep(0.2)
        assert termios.tcgetattr(slave)[3] & termios.ECHO == echo_before != 0
        assert select.select([slave], [], [], 0.2)[0] == []  # the typed line was dropped
    os.close(master)


@pytest.mark.parametrize("new, old", [("--system-prompt", "--system"),
                                      ("--ignore-chat-template", "--raw")])
def test_mlx_lm_option_names_with_the_old_spelling_hidden(model_dir, new, old):
    value = ["Be brief."] if new == "--system-prompt" else []
    outputs = [json.loads(run("generate", "--model", model_dir, "-p", "Tell me a story", "-m", "4",
                              "--no-safety", "--json", flag, *value).stdout)["text"]
               for flag in (new, old)]
    assert outputs[0] == outputs[1]
    help_text = run("generate", "--help").stdout
    assert new in help_text and not re.search(re.escape(old) + r"\b(?!-)", help_text)


def test_generate_and_chat_take_an_adapter_path(tmp_path, tokenizer):
    from mlx_safesig import SafetyConfig, generate, load
    from mlx_safesig.adapters import save_adapters
    from mlx_safesig.train import TrainConfig, prepare_model

    plain = write_model_dir(tmp_path / "plain", make_model(), tokenizer, safety=False)
    model = make_model(seed=3)
    config = TrainConfig(num_layers=1)
    save_adapters(model, tmp_path / "ad", config, prepare_model(model, config))
    net, tok = load(plain, adapter_path=tmp_path / "ad")
    messages = [{"role": "user", "content": "Tell me a story"}]
    expected = generate(net, tok, messages, max_tokens=6, safety=SafetyConfig(schedule="each"))
    r = run("generate", "--model", plain, "--adapter-path", tmp_path / "ad", "-p",
            messages[0]["content"], "-m", "6", "--schedule", "each", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["text"] == expected
    assert "untrained" not in r.stderr
    r = run("chat", "--model", plain, "--adapter-path", tmp_path / "ad", "-m", "2",
            stdin="hello\n")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("command, hint", [
    (["train", "--data", "."], "pass --add-safety to start from a fresh [CLS] row and head."),
    (["generate", "-p", "hi"], "pass --adapter-path with adapters trained for it "
                               "(`mlx-safesig train --add-safety`)."),
])
def test_a_model_without_safety_parts_points_to_the_right_option(tmp_path, tokenizer, command,
                                                                 hint):
    plain = write_model_dir(tmp_path / "plain", make_model(), tokenizer, safety=False)
    r = run(command[0], "--model", plain, *command[1:])
    assert r.exit_code == 1
    assert r.stderr.splitlines()[-1] == f"Error: {plain} has no safety parts; {hint}"
