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
    """Prompt token ids and the query span [start, end) within them (SPEC §3: the tokens the
    ``[CLS]`` judges: no BOS, no template)."""

    ids: List[int]
    query_span: tuple

    @property
    def query_slots(self) -> List[int]:
        """Prompt slots the ``[CLS]`` verdict attends to (besides itself)."""
        return list(range(*self.query_span))


def wrap_tokenizer(tokenizer) -> TokenizerWrapper:
    return tokenizer if isinstance(tokenizer, TokenizerWrapper) else TokenizerWrapper(tokenizer)


def special_ids(tokenizer) -> set:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            ids.add(value)
    return ids


def content_span(tokenizer, messages) -> tuple[str, int, int]:
    """Render the chat template and locate the last user message's content in it (chars).

    The content is found by rendering the template a second time with a marker in its place, so
    any template works and nothing depends on token counts."""
    if not getattr(tokenizer, "chat_template", None):
        raise SafesigError(
            "the tokenizer has no chat template; pass the prompt as a string or token ids."
        )
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        raise SafesigError("the chat messages contain no user message to judge.")
    last = users[-1]
    content = messages[last].get("content") or ""
    marker = "\u2063SAFESIG_QUERY\u2063"
    marked = [dict(m, content=marker) if i == last else m for i, m in enumerate(messages)]

    def render(msgs):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    text, template = render(messages), render(marked)
    start = template.find(marker)
    end_in_template = len(template) - (start + len(marker))
    if start >= 0 and text[:start] == template[:start]:
        return text, start, len(text) - end_in_template
    start = text.rfind(content.strip())  # the template rewrote the content (e.g. strip())
    return text, max(start, 0), max(start, 0) + len(content.strip())


def _token_span(tokenizer, text: str, start: int, end: int) -> tuple[List[int], int, int]:
    """Tokenize ``text`` (template already rendered: no extra special tokens) and return the ids and
    the token span covering chars [start, end)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    head = tokenizer.encode(text[:start], add_special_tokens=False)
    upto = tokenizer.encode(text[:end], add_special_tokens=False)
    # shared prefix lengths are robust to merges at the boundaries
    q0 = _common_prefix(ids, head)
    q1 = _common_prefix(ids, upto)
    if q1 < len(upto):  # the last query token merged with what follows: keep it in the span
        q1 += 1
    return ids, q0, max(q1, q0)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _strip_special(ids: Sequence[int], special: set, start: int, end: int) -> tuple[int, int]:
    while start < end and ids[start] in special:
        start += 1
    while end > start and ids[end - 1] in special:
        end -= 1
    return start, end


def prepare_prompt(tokenizer, prompt: Prompt) -> PreparedPrompt:
    """Prompt (string, token ids or chat messages) -> ids and query span.

    A string is raw text (no chat template; BOS if the tokenizer adds one); token ids are used as
    given; chat messages go through the tokenizer's chat template and the query span is the last
    user message's content."""
    tokenizer = wrap_tokenizer(tokenizer)
    special = special_ids(tokenizer)
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
        span = (0, len(ids))
    elif len(prompt) and isinstance(prompt[0], dict):
        text, start, end = content_span(tokenizer, list(prompt))
        ids, q0, q1 = _token_span(tokenizer, text, start, end)
        span = (q0, q1)
    else:
        ids = [int(t) for t in prompt]
        span = (0, len(ids))
    span = _strip_special(ids, special, *span)
    if span[0] == span[1]:
        raise SafesigError("the prompt is empty: there is no text for the model to judge.")
    return PreparedPrompt(ids, span)


def check_context(model: Model, n: int):
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
    prefill_ids = (
        tokenizer.encode(prefill_response, add_special_tokens=False) if prefill_response else []
    )
    check_context(model, len(prepared.ids) + len(prefill_ids))
    return prepared, prefill_ids
