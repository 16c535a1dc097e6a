"""Prompts: string, token ids or chat messages -> token ids and the query span the ``[CLS]`` judges.

SPEC §3 rule 4: the query span holds no BOS, template or special tokens. For chat messages the
template is rendered by the tokenizer and the content located in it, never guessed.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

from mlx_lm.tokenizer_utils import TokenizerWrapper

from .model import Model, SafesigError

Prompt = Union[str, Sequence[int], Sequence[dict]]


@dataclass
class PreparedPrompt:
    """Prompt token ids and the slots the ``[CLS]`` verdict judges (SPEC §3 rule 4 and §3b: the
    content of every message, never BOS, template or special tokens). ``prefill`` is the text of a
    final assistant message the caller supplied: it is response, not query (SPEC §3b)."""

    ids: List[int]
    query_slots: List[int]
    prefill: str = ""


def wrap_tokenizer(tokenizer) -> TokenizerWrapper:
    """mlx-lm's ``TokenizerWrapper`` around ``tokenizer`` (unchanged if it already is one)."""
    return tokenizer if isinstance(tokenizer, TokenizerWrapper) else TokenizerWrapper(tokenizer)


def special_ids(tokenizer) -> set:
    """Ids of special tokens (BOS, EOS, PAD and the tokenizer's special tokens): never judged."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            ids.add(value)
    return ids


def _template_name(tokenizer) -> str:
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return f"the chat template of {name}"


def render_chat(tokenizer, messages: Sequence[dict]) -> tuple[str, List[tuple[int, int]]]:
    """Render ``messages`` with the tokenizer's chat template (generation prompt added) and locate
    the content of every message in the text: returns the text and one [start, end) character span
    per message with content, in order.

    The template is rendered a second time with a marker in place of each content; the text
    between markers is template markup, the rest is content. A template that rewrites content
    other than by stripping whitespace is an error naming the template, never a guess."""
    if not getattr(tokenizer, "chat_template", None):
        raise SafesigError(
            "the tokenizer has no chat template; pass the prompt as a string or token ids."
        )
    if not any(m.get("role") == "user" for m in messages):
        raise SafesigError("the chat messages contain no user message to judge.")

    def render(msgs):
        return tokenizer.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=True)

    markers = [f"\u2063SAFESIG{i}\u2063" for i in range(len(messages))]
    has_content = [bool(m.get("content")) for m in messages]
    marked = [dict(m, content=markers[i]) if has_content[i] else m for i, m in enumerate(messages)]
    text, template = render(messages), render(marked)
    pieces, order, rest = [], [], template
    for i, marker in enumerate(markers):
        if not has_content[i] or marker not in rest:
            continue  # a template may leave a message out (e.g. no system role)
        before, rest = rest.split(marker, 1)
        pieces.append(before)
        order.append(i)
    if any(marker in rest for marker in markers):
        raise SafesigError(f"{_template_name(tokenizer)} renders message content out of order or "
                           "twice, so the [CLS] cannot locate the conversation's content.")
    spans, at = [], 0
    for n, i in enumerate(order):
        glue, after = pieces[n], pieces[n + 1] if n + 1 < len(pieces) else rest
        if not text.startswith(glue, at):
            break
        at += len(glue)
        content = messages[i]["content"]
        for rendered in dict.fromkeys((content, content.strip(), content.rstrip(), content.lstrip())):
            end = at + len(rendered)
            if text.startswith(rendered, at) and text.startswith(after, end):
                spans.append((at, end))
                at = end
                break
        else:
            break
    else:
        if text[at:] == rest and len(spans) == len(order):
            return text, spans
    raise SafesigError(f"{_template_name(tokenizer)} rewrites message content, so the [CLS] cannot "
                       "locate it; pass the prompt as token ids with query_span=(start, end).")


def content_slots(tokenizer, text: str, ids: Sequence[int], spans: Sequence[tuple]) -> List[int]:
    """The token slots of ``ids`` (``text`` tokenized) covering the character ``spans`` (sorted,
    disjoint): every token that overlaps a span. From a fast tokenizer's offsets in one pass when
    it gives them for exactly these ids, else by tokenizing each span's prefixes (``_token_span``:
    the same slots, but a cost that grows with turns x conversation length)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if getattr(backend, "is_fast", False):
        enc = backend(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) == list(ids):
            slots, k = [], 0
            for i, (a, b) in enumerate(enc["offset_mapping"]):
                while k < len(spans) and spans[k][1] <= a:
                    k += 1
                if k < len(spans) and b > spans[k][0] and a < spans[k][1]:
                    slots.append(i)
            return slots
    return [i for a, b in spans for i in _token_span(tokenizer, text, ids, a, b)]


def _token_span(tokenizer, text: str, ids: Sequence[int], start: int, end: int) -> range:
    """The token slots of ``ids`` (``text`` tokenized) covering characters [start, end)."""
    head = tokenizer.encode(text[:start], add_special_tokens=False)
    upto = tokenizer.encode(text[:end], add_special_tokens=False)
    # shared prefix lengths are robust to merges at the boundaries
    q0 = _common_prefix(ids, head)
    q1 = _common_prefix(ids, upto)
    if q1 < len(upto):  # the last content token merged with what follows: keep it
        q1 += 1
    return range(q0, max(q1, q0))


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _is_messages(prompt) -> bool:
    return not isinstance(prompt, str) and len(prompt) > 0 and isinstance(prompt[0], dict)


def prepare_prompt(tokenizer, prompt: Prompt,
                   query_span: Optional[tuple[int, int]] = None) -> PreparedPrompt:
    """Prompt (string, token ids or chat messages) -> ids and the slots the ``[CLS]`` judges.

    A string is raw text (no chat template; BOS if the tokenizer adds one), judged whole. Token
    ids are used as given: ``query_span=(start, end)`` says which of them to judge, else all of
    them. Chat messages go through the tokenizer's chat template and the verdict judges the content
    of every message (system, user, earlier assistant turns; SPEC §3b); a final assistant message
    is the start of the response (``PreparedPrompt.prefill``), not query. Special tokens are never
    judged."""
    tokenizer = wrap_tokenizer(tokenizer)
    special = special_ids(tokenizer)
    prefill = ""
    if query_span is not None and (isinstance(prompt, str) or _is_messages(prompt)):
        raise SafesigError("query_span is only for prompts given as token ids.")
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
        slots = range(len(ids)) if prompt.strip() else range(0)
    elif _is_messages(prompt):
        messages = list(prompt)
        if messages[-1].get("role") == "assistant":
            prefill = messages.pop().get("content") or ""
        text, spans = render_chat(tokenizer, messages)
        ids = tokenizer.encode(text, add_special_tokens=False)
        slots = content_slots(tokenizer, text, ids, [(a, b) for a, b in spans if text[a:b].strip()])
    else:
        ids = [int(t) for t in prompt]
        start, end = query_span if query_span is not None else (0, len(ids))
        if not 0 <= start < end <= len(ids):
            raise SafesigError(f"query_span {query_span} is not a non-empty range of the "
                               f"{len(ids)} prompt tokens.")
        slots = range(start, end)
    slots = sorted({i for i in slots if ids[i] not in special})
    if not slots:
        raise SafesigError("the prompt is empty: there is no text for the model to judge.")
    return PreparedPrompt(ids, slots, prefill)


def check_context(model: Model, n: int):
    """Raise one ``SafesigError`` sentence when ``n`` prompt tokens (+ the ``[CLS]``) exceed the
    model's context."""
    limit = model.args.max_position_embeddings
    if limit and n + 1 >= limit:
        raise SafesigError(
            f"the prompt has {n} tokens but the model's context is {limit} tokens."
        )


def prompt_with_prefill(model: Model, tokenizer, prompt: Prompt,
                        prefill_response: Optional[str] = None) -> tuple[PreparedPrompt, List[int]]:
    """The prepared prompt and the prefilled assistant text's ids, checked against the model's
    context (one ``SafesigError`` sentence if too long). With safety off, mlx-lm is fed
    ``prepared.ids + prefill_ids``."""
    tokenizer = wrap_tokenizer(tokenizer)
    prepared = prepare_prompt(tokenizer, prompt)
    if prepared.prefill and prefill_response:
        raise SafesigError("the messages end with an assistant message and prefill_response is "
                           "given too; give the start of the response one way.")
    prefill_response = prefill_response or prepared.prefill
    prefill_ids = (
        tokenizer.encode(prefill_response, add_special_tokens=False) if prefill_response else []
    )
    check_context(model, len(prepared.ids) + len(prefill_ids))
    return prepared, prefill_ids
