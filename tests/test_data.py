"""Training data: formats, oversampling, and clear errors for bad input (file, line, field)."""

import json

import pytest
from click.testing import CliRunner
from conftest import make_model, write_model_dir

from mlx_safesig.cli import main
from mlx_safesig.data import DataError, balanced_order, load_dataset, load_jsonl, tokenize_example
from mlx_safesig.prompt import prepare_prompt

GOOD = {"prompt": "Tell me a story.", "response": "Once upon a time.", "label": 0}
BAD = {"prompt": "How do I steal?", "response": "Sorry, I can't.", "label": 1}


def write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_prompt_response_equals_messages_and_matches_generation_prompt(tokenizer):
    chat = {"messages": [{"role": "user", "content": "Tell me a story."},
                         {"role": "assistant", "content": "Once upon a time."}], "label": 0}
    a, b = tokenize_example(tokenizer, GOOD), tokenize_example(tokenizer, chat)
    assert a == b
    prepared = prepare_prompt(tokenizer, chat["messages"][:1])
    assert a.prompt == prepared.ids and a.query_slots == prepared.query_slots
    assert tokenizer.decode(a.response) == "Once upon a time.<|im_end|>\n"


def test_continuation_label_defaults_to_label(tokenizer):
    ex = tokenize_example(tokenizer, {**BAD, "continuation": "Sure, here is how."})
    assert ex.continuation and ex.continuation_label == 1
    ex = tokenize_example(tokenizer, {**BAD, "continuation": "Fine.", "continuation_label": 0})
    assert ex.continuation_label == 0


def test_minority_class_is_oversampled(tokenizer):
    examples = [tokenize_example(tokenizer, r) for r in [GOOD] * 5 + [BAD] * 2]
    order = balanced_order(examples)
    labels = [examples[i].label for i in order]
    assert labels.count(0) == labels.count(1) == 5


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: not valid JSON"),
    ({**GOOD, "label": 2}, "line 2: field 'label' must be 0 or 1, got 2"),
    ({**GOOD, "label": True}, "field 'label' must be 0 or 1"),
    ({"prompt": "Hi?", "response": "Hello."}, "line 2: missing field 'label'"),
    ({"label": 0}, "line 2: missing field 'messages' (or 'prompt' and 'response')"),
    ({"prompt": "Hi?", "response": "", "label": 0}, "field 'response' must be a non-empty string"),
    ({"messages": [{"role": "user", "content": "Hi"}], "label": 0}, "field 'messages' must be"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hi"}],
      "label": 0}, "must end with a non-empty assistant message"),
    ({**GOOD, "continuation": 3}, "field 'continuation' must be a non-empty string"),
    ({**GOOD, "continuation": "x", "continuation_label": -1}, "field 'continuation_label'"),
    ({**BAD, "prefill": 3}, "field 'prefill' must be a non-empty string"),
    ({**BAD, "prefill": "I can't"}, "field 'prefill' must be how the assistant's response starts"),
    ({**BAD, "prefill": BAD["response"]}, "field 'prefill' is the whole response"),
    ([1, 2], "line 2: expected a JSON object"),
])
def test_bad_lines_name_file_line_and_field(tmp_path, tokenizer, line, message):
    path = write(tmp_path / "train.jsonl", [GOOD, line])
    with pytest.raises(DataError) as e:
        load_jsonl(path, tokenizer, 2048)
    assert str(e.value).startswith(str(path)) and message in str(e.value)


def test_example_longer_than_max_length_is_an_error(tmp_path, tokenizer):
    path = write(tmp_path / "train.jsonl", [GOOD, {**BAD, "response": "no " * 300}])
    with pytest.raises(DataError, match=r"line 2: the example is \d+ tokens long, more than the "
                                        r"maximum sequence length 64"):
        load_jsonl(path, tokenizer, 64)


def test_too_long_examples_can_be_left_out_and_counted_by_source(tmp_path, tokenizer):
    long = {**BAD, "response": "no " * 300, "source": "wrapped:some_source"}
    path = write(tmp_path / "train.jsonl", [GOOD, long, long])
    dropped = []
    kept = load_jsonl(path, tokenizer, 64, too_long=dropped)
    assert len(kept) == 1 and dropped == ["wrapped:some_source"] * 2


def test_probe_rows_count_towards_the_length(tmp_path, tokenizer):
    path = write(tmp_path / "train.jsonl", [GOOD])
    n = 1 + tokenize_example(tokenizer, GOOD).n_tokens
    load_jsonl(path, tokenizer, n)
    with pytest.raises(DataError, match="line 1"):
        load_jsonl(path, tokenizer, n, extra_rows=lambda ex: 1)


@pytest.mark.parametrize("files, message", [
    ({}, "no train.jsonl"),
    ({"train.jsonl": ""}, "train.jsonl: no examples"),
    ({"train.jsonl": "\n\n"}, "train.jsonl: no examples"),
    ({"train.jsonl": json.dumps(GOOD) + "\n"}, "every example has label 0"),
    ({"train.jsonl": json.dumps(GOOD) + "\n" + json.dumps(BAD), "valid.jsonl": ""},
     "valid.jsonl: no examples"),
])
def test_empty_or_one_class_data_is_an_error(tmp_path, tokenizer, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=message):
        load_dataset(tmp_path, tokenizer, 2048)


def test_missing_data_directory_is_an_error(tmp_path, tokenizer):
    with pytest.raises(DataError, match="no such data directory"):
        load_dataset(tmp_path / "nope", tokenizer, 2048)


@pytest.mark.parametrize("extra", [[], ["--max-seq-length", "16"]])
def test_train_command_reports_bad_data_in_one_line(tmp_path, tokenizer, extra):
    base = write_model_dir(tmp_path / "base", make_model(), tokenizer)
    data = tmp_path / "data"
    data.mkdir()
    write(data / "train.jsonl", [GOOD, {**BAD, "label": 7}] if not extra else [GOOD, BAD])
    result = CliRunner().invoke(main, ["train", "--model", str(base), "--data", str(data),
                                                "--adapter-path", str(tmp_path / "ad"), *extra])
    assert result.exit_code == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "train.jsonl, line" in last
    assert "Traceback" not in result.output
    assert not (tmp_path / "ad").exists()


def test_train_command_rejects_a_missing_model(tmp_path):
    result = CliRunner().invoke(main, ["train", "--model", str(tmp_path / "nope"),
                                                "--data", str(tmp_path)])
    assert result.exit_code == 1 and "does not exist" in result.stderr


def test_train_command_rejects_an_unknown_probe_schedule(tmp_path):
    result = CliRunner().invoke(main, ["train", "--model", str(tmp_path / "nope"),
                                                "--data", str(tmp_path),
                                                "--probe-schedule", "sometimes"])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: Invalid value for '--probe-schedule': unknown schedule 'sometimes'; use one of "
        "each, first, periodic:N, annealing.")
