"""Training data for the explicit safety signal: JSONL files, one example per line.

Each line is an object with

* ``messages`` (chat: the last message is the assistant's response, the last user message is the
  query the ``[CLS]`` judges) or ``prompt`` + ``response`` (one user turn and its answer);
* ``label``: 0 (benign) or 1 (malicious), the verdict on the query;
* optionally ``continuation``: generated text whose windows ``[CLS]`` probes must judge (window
  supervision, SPEC §5), e.g. a harmful answer the model must learn to catch mid-generation. It is
  never a language-modelling target. ``continuation_label`` (0/1) defaults to ``label``;
* optionally ``prefill``: the start of the assistant's response that is given, not learned -- e.g.
  the refusal prefix that strategic decoding inserts, so the model learns to justify a refusal it
  did not choose, without learning to start refusals on its own. Its tokens are in the sequence
  (the rest attends to them) but are not language-modelling targets. It must be how the response
  starts.

A data directory holds ``train.jsonl`` and optionally ``valid.jsonl`` (mlx-lm's names). Every error
names the file, the line and the field.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .model import SafesigError
from .prompt import prepare_prompt, render_chat, special_ids, wrap_tokenizer


class DataError(SafesigError):
    """A problem with a training file; the message names the file and line."""


@dataclass
class Example:
    """One tokenized example.

    ``prompt``: prompt ids (BOS, template, query, template: what generation starts from);
    ``query_slots``: indices in ``prompt`` of the tokens the ``[CLS]`` judges (the content of
    every message before the response, SPEC §3b); ``response``: the assistant's
    tokens, end-of-turn included (the LM targets); ``continuation``: ids judged by window probes
    only, never LM targets; ``lm_start``: the first response token that is an LM target (the
    ones before it are the row's ``prefill``)."""

    prompt: List[int]
    query_slots: List[int]
    response: List[int]
    label: int
    continuation: List[int]
    continuation_label: int
    lm_start: int = 0

    @property
    def n_tokens(self) -> int:
        """Sequence tokens (no ``[CLS]`` rows): prompt, response, continuation."""
        return len(self.prompt) + len(self.response) + len(self.continuation)


def _label(record: dict, field: str, where: str, default: Optional[int] = None) -> int:
    value = record.get(field, default)
    if value is None:
        raise DataError(f"{where}: missing field '{field}' (0 benign, 1 malicious).")
    if isinstance(value, bool) or value not in (0, 1):
        raise DataError(f"{where}: field '{field}' must be 0 or 1, got {value!r}.")
    return int(value)


def _text(record: dict, field: str, where: str) -> str:
    value = record.get(field)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field '{field}' must be a non-empty string.")
    return value


def _messages(record: dict, where: str) -> List[dict]:
    if "messages" in record:
        messages = record["messages"]
        ok = isinstance(messages, list) and len(messages) >= 2 and all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages
        )
        if not ok:
            raise DataError(
                f"{where}: field 'messages' must be a list of at least two "
                "{\"role\": ..., \"content\": ...} objects."
            )
        if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
            raise DataError(f"{where}: field 'messages' must end with a non-empty assistant message.")
        if not any(m["role"] == "user" for m in messages[:-1]):
            raise DataError(f"{where}: field 'messages' has no user message before the response.")
        return messages
    if "prompt" not in record and "response" not in record:
        raise DataError(f"{where}: missing field 'messages' (or 'prompt' and 'response').")
    return [
        {"role": "user", "content": _text(record, "prompt", where)},
        {"role": "assistant", "content": _text(record, "response", where)},
    ]


def tokenize_example(tokenizer, record: dict, where: str = "example") -> Example:
    """A parsed JSONL record -> ``Example``. The prompt is tokenized exactly as generation does
    (``prepare_prompt``); the response is the rest of the rendered conversation, so its tokens
    are the ones generation would produce after that prompt."""
    tokenizer = wrap_tokenizer(tokenizer)
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object.")
    label = _label(record, "label", where)
    messages = _messages(record, where)
    if getattr(tokenizer, "chat_template", None):
        prepared = prepare_prompt(tokenizer, messages[:-1])
        prompt_text, _ = render_chat(tokenizer, messages[:-1])
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt_text):
            raise DataError(f"{where}: the chat template renders the prompt differently "
                            "with the response appended; cannot locate the response.")
        rendered = full[len(prompt_text):]
    else:  # raw text: prompt as generation encodes a string, response + EOS
        query = [m for m in messages[:-1] if m["role"] == "user"][-1]["content"]
        prepared = prepare_prompt(tokenizer, query)
        rendered = messages[-1]["content"]
    given, rendered = _split_prefill(record, messages[-1]["content"], rendered, where)
    given_ids = tokenizer.encode(given, add_special_tokens=False) if given else []
    response = given_ids + tokenizer.encode(rendered, add_special_tokens=False)
    lm_start = len(given_ids)
    if not getattr(tokenizer, "chat_template", None):
        response.append(tokenizer.eos_token_id)
    continuation, continuation_label = [], label
    if "continuation" in record:
        continuation = tokenizer.encode(
            _text(record, "continuation", where), add_special_tokens=False
        )
        continuation_label = _label(record, "continuation_label", where, default=label)
    return Example(prepared.ids, prepared.query_slots, response, label, continuation,
                   continuation_label, lm_start)


def _split_prefill(record: dict, content: str, rendered: str, where: str) -> Tuple[str, str]:
    """The rendered response (template tokens included) -> (the given part, up to the end of
    ``prefill``; the rest, the LM targets). Tokenized apart, as generation inserts a prefix."""
    if "prefill" not in record:
        return "", rendered
    prefill = _text(record, "prefill", where)
    at = rendered.find(content)  # where the template put the content (after its own tokens)
    if not content.startswith(prefill) or at < 0:
        raise DataError(f"{where}: field 'prefill' must be how the assistant's response starts.")
    if len(prefill) == len(content):
        raise DataError(f"{where}: field 'prefill' is the whole response; nothing is left to learn.")
    return rendered[: at + len(prefill)], rendered[at + len(prefill):]


def load_jsonl(path: Path, tokenizer, max_length: int, extra_rows=lambda ex: 0,
               too_long: Optional[list] = None) -> List[Example]:
    """Read and tokenize a JSONL file. ``max_length`` bounds a training row: ``[CLS]`` + tokens
    + ``extra_rows(example)`` (the probe rows the trainer appends); a longer one is an error, or,
    given a ``too_long`` list, left out and recorded there as its record's ``source``. Empty lines
    are skipped."""
    path = Path(path)
    examples = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text.") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg}).") from None
        try:
            ex = tokenize_example(tokenizer, record, where)
        except DataError:
            raise
        except SafesigError as e:  # prepare_prompt: empty query, no template ...
            raise DataError(f"{where}: {e}") from None
        length = 1 + ex.n_tokens + extra_rows(ex)
        if length > max_length and too_long is not None:
            too_long.append(str(record.get("source")))
            continue
        if length > max_length:
            raise DataError(
                f"{where}: the example is {length} tokens long, more than the maximum sequence "
                f"length {max_length}."
            )
        examples.append(ex)
    if not examples:
        raise DataError(f"{path}: no examples.")
    return examples


def load_dataset(data_dir, tokenizer, max_length: int, extra_rows=lambda ex: 0,
                 too_long: Optional[list] = None):
    """``data_dir/train.jsonl`` (required) and ``data_dir/valid.jsonl`` (optional) -> (train,
    valid or None). Training data must contain both labels. ``too_long``: see ``load_jsonl``."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such data directory.")
    train_file = data_dir / "train.jsonl"
    if not train_file.is_file():
        raise DataError(f"{data_dir}: no train.jsonl in the data directory.")
    train = load_jsonl(train_file, tokenizer, max_length, extra_rows, too_long)
    labels = {ex.label for ex in train}
    if len(labels) < 2:
        raise DataError(
            f"{train_file}: every example has label {labels.pop()}; the [CLS] head needs both "
            "benign (0) and malicious (1) examples."
        )
    valid_file = data_dir / "valid.jsonl"
    valid = (load_jsonl(valid_file, tokenizer, max_length, extra_rows, too_long)
             if valid_file.is_file() else None)
    return train, valid


def balanced_order(examples: Sequence[Example]) -> List[int]:
    """Indices with the minority class oversampled (cycled) to the majority's count."""
    by_label = {0: [], 1: []}
    for i, ex in enumerate(examples):
        by_label[ex.label].append(i)
    small, large = sorted(by_label.values(), key=len)
    if not small:
        return list(range(len(examples)))
    extra = [small[i % len(small)] for i in range(len(large) - len(small))]
    return sorted(large + small + extra)


def special_token_ids(tokenizer) -> set:
    """Ids that generation keeps out of probe windows (rule 4)."""
    return special_ids(wrap_tokenizer(tokenizer))
