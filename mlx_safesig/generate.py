"""Safety-aware generation: prompt preparation, the query verdict, the probe loop, streaming.

Cache layout during generation (slot = index in the KV cache, pos = RoPE position)::

    slots 0 .. n-1   the prompt (BOS, template, query, template)   pos 1 .. n    plain causal
    slot  n          [CLS], attends to the query span and itself  pos 0         kept: the verdict
    slots n+1 ..     response tokens (prefill, generated, refusal) pos = slot    attend all, [CLS] too

This is the strategic prefill mask of SPEC §3 (``attention.sft_mask``) evaluated in three plain
steps: nobody in the prompt attends to ``[CLS]`` so the prompt runs at mlx-lm's causal speed, and the
order of slots in a KV cache does not matter to attention, only masks and positions do. Probes at
generation time are transient: fused with the next decode token as ``[token, [CLS]]`` and their
slot trimmed right after.
"""

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, List, Optional, Sequence, Union

import mlx.core as mx
import mlx_lm
import numpy as np
from mlx_lm.models.cache import trim_prompt_cache
from mlx_lm.sample_utils import make_sampler

from .attention import decode_probe_mask, window_row
from .decoding import SafetyConfig, SafetyEvent, SafetyMonitor
from .model import Model, SafesigError
from .prompt import (
    PreparedPrompt,
    Prompt,
    check_context,
    prepare_prompt,
    prompt_with_prefill,
    special_ids,
    wrap_tokenizer,
)

PREFILL_STEP = 2048


@dataclass
class SafetySignal:
    """What generation knows about safety after a token: ``p`` is the latest p(malicious),
    ``query_p`` the query verdict, ``flagged`` whether the query was judged malicious,
    ``inserted`` whether the refusal was inserted so far, ``events`` what happened at this step."""

    p: Optional[float] = None
    query_p: Optional[float] = None
    flagged: bool = False
    inserted: bool = False
    events: List[SafetyEvent] = field(default_factory=list)


@dataclass
class GenerationResult:
    """One streamed step. ``text`` is the new text (may be empty); ``token`` is None for an event-only
    step (a retraction); ``refusal`` marks tokens of the inserted refusal prefix."""

    text: str
    token: Optional[int]
    logprobs: Optional[mx.array]
    safety: SafetySignal
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    refusal: bool = False
    finish_reason: Optional[str] = None


def prefill_prompt(model: Model, ids: Sequence[int], cache, start_position: int = 1) -> mx.array:
    """Run the prompt causally at positions ``start_position ..`` in chunks; returns the final-norm
    hidden state [D] of its last token."""
    done = 0
    tokens = mx.array(ids)
    while True:
        chunk = tokens[done : done + PREFILL_STEP]
        h = model.hidden(chunk[None], cache, positions=start_position + done)
        done += chunk.size
        if done >= len(ids):
            return h[0, -1]
        mx.eval([c.state for c in cache])


def probe(model: Model, cache, slots: Sequence[int], position: int = 0, keep: bool = False):
    """One ``[CLS]`` row appended after the cache, attending to ``slots`` and itself, at RoPE
    ``position``. Returns p(malicious) (a scalar array). Its keys/values are dropped unless
    ``keep`` (the query verdict is kept: response tokens attend to it)."""
    n = cache[0].offset
    h = model.hidden(
        mx.array([[model.cls_token_id]]), cache,
        mask=window_row(n, slots)[None], positions=mx.array([position]),
    )
    if not keep:
        trim_prompt_cache(cache, 1)
    return model.safety_prob(h[0, -1])


def score(model: Model, tokenizer, text_or_messages: Union[str, Sequence[dict]]) -> float:
    """p(malicious) from the ``[CLS]`` head.

    A string: ``[CLS]`` at position 0, the text's tokens at 1..n (BOS only if the tokenizer adds
    one); ``[CLS]`` attends to all of them and itself; nobody attends to ``[CLS]``.
    Chat messages: the query verdict generation starts from (template rendered, ``[CLS]`` over the
    query span of the last user message)."""
    tokenizer = wrap_tokenizer(tokenizer)
    if isinstance(text_or_messages, str):
        ids = tokenizer.encode(text_or_messages)
        if not ids:
            raise SafesigError("the text to score is empty.")
        slots = range(len(ids))
    else:
        prepared = prepare_prompt(tokenizer, text_or_messages)
        ids, slots = prepared.ids, prepared.query_slots
    check_context(model, len(ids))
    cache = model.make_cache()
    prefill_prompt(model, ids, cache)
    return probe(model, cache, slots, position=0).item()


def _probe_position(model: Model, slot: int) -> int:
    return slot if model.args.safesig["probe_position"] == "current" else 0


def _cls_logits_mask(model: Model, vocab: int) -> Optional[mx.array]:
    if model.cls_token_id < vocab:  # [CLS] is input only: never sample it
        return mx.where(mx.arange(vocab) == model.cls_token_id, -mx.inf, 0.0)
    return None


def _token_table(vocab: int, ids: set) -> mx.array:
    table = np.zeros(vocab, dtype=bool)
    table[[i for i in ids if i < vocab]] = True
    return mx.array(table)


def safe_generate_step(
    model: Model,
    prompt: PreparedPrompt,
    config: SafetyConfig,
    *,
    refusal_ids: Sequence[int],
    special_ids: set,
    eos_ids: set,
    prefill_ids: Sequence[int] = (),
    max_tokens: int = 256,
    sampler: Optional[Callable] = None,
    logits_processors: Optional[List[Callable]] = None,
    fused_probe: bool = True,
) -> Iterator[tuple]:
    """Token-level generator of strategic decoding (SPEC §4).

    Yields ``(kind, payload, monitor, events)``: kind ``"token"`` with payload ``(token, logprobs,
    is_refusal)``, or ``"retract"`` with payload = number of yielded tokens withdrawn. Prefilled
    tokens are not yielded (the caller gave them). Stops after an EOS token or ``max_tokens``.

    Like mlx-lm, the forward of token t+1 is launched before token t is handed out, so building
    the graph overlaps computing it. The probe plan for t+1 depends on the verdict of the probe
    that rode with t; it is planned speculatively and re-launched in the rare case that verdict
    changed the plan (a flip starting or clearing), so the result equals step-by-step decoding.
    Whether the newest token is special (rule 4) is decided inside the graph.
    """
    sampler = sampler or (lambda lp: mx.argmax(lp, axis=-1))
    processors = list(logits_processors or [])
    cache = model.make_cache()
    base = len(prompt.ids) + 1  # slot of response index 0 (the [CLS] verdict sits at slot n)
    response: List[int] = []  # response tokens: prefill, generated, refusal
    special: List[bool] = []
    history = mx.array(prompt.ids)  # what logits processors see
    monitor = SafetyMonitor(config, n_prefill=len(prefill_ids))
    query_slots = prompt.query_slots
    cls = mx.array([model.cls_token_id])

    logits = model.logits(prefill_prompt(model, prompt.ids, cache)[None])
    vocab = logits.shape[-1]
    cls_mask = _cls_logits_mask(model, vocab)
    special_table = _token_table(max(vocab, model.cls_token_id + 1), special_ids)
    p0 = probe(model, cache, query_slots, position=0, keep=True).item()
    decision = monitor.start(p0)
    events = decision.events

    def feed(ids):
        nonlocal history
        h = model.hidden(mx.array(ids)[None], cache)
        response.extend(ids)
        special.extend(t in special_ids for t in ids)
        history = mx.concatenate([history, mx.array(ids)])
        return model.logits(h[:, -1])

    def sample(z):
        if cls_mask is not None:
            z = z + cls_mask
        for proc in processors:
            z = proc(history, z)
        logprobs = z - mx.logsumexp(z, keepdims=True)
        return sampler(logprobs).reshape(1), logprobs[0]

    def plan(t):
        if not monitor.wants_probe(t):
            return None
        include_query, window = monitor.window(t, special[:t] + [False])
        return include_query, tuple(window)

    def launch(y, t, probe_plan):
        """Feed the (lazy) token y at response index t; returns (logits, p or None)."""
        n = cache[0].offset
        if probe_plan is None:
            h = model.hidden(y[None], cache, positions=mx.array([n]), compiled=True)
            return model.logits(h[:, -1]), None
        include_query, window = probe_plan
        slots = (query_slots if include_query else []) + [base + i for i in window if i < t]
        sees_y = mx.logical_not(special_table[y[0]]) if t in window else mx.array(False)
        position = _probe_position(model, n + 1)
        if fused_probe:
            column_n = mx.stack([mx.array(True), sees_y])[:, None]  # rows: [token, probe]
            mask = mx.where(mx.arange(n + 2) == n, column_n, decode_probe_mask(n, slots))
            h = model.hidden(
                mx.concatenate([y, cls])[None], cache, mask=mask,
                positions=mx.array([n, position]), compiled=True,
            )
            trim_prompt_cache(cache, 1)
            return model.logits(h[:, 0]), model.safety_prob(h[0, 1])
        h = model.hidden(y[None], cache, positions=mx.array([n]), compiled=True)
        logits = model.logits(h[:, -1])
        row = mx.where(mx.arange(n + 2) == n, sees_y, window_row(n + 1, slots))
        h = model.hidden(cls[None], cache, mask=row[None], positions=mx.array([position]))
        trim_prompt_cache(cache, 1)
        return logits, model.safety_prob(h[0, -1])

    def evaluate(y, out):
        mx.async_eval(y, *[o for o in out if o is not None])

    if prefill_ids:
        logits = feed(list(prefill_ids))
    refusal_due = decision.insert
    generated = 0
    while True:
        if refusal_due:
            refusal_due = False
            logits = feed(list(refusal_ids))
            for tok in refusal_ids:
                yield "token", (tok, None, True), monitor, events
                events, generated = [], generated + 1
                if generated >= max_tokens:
                    return
        y, logprobs = sample(logits)
        t = len(response)
        history = mx.concatenate([history, y])
        out = launch(y, t, plan(t))
        evaluate(y, out)
        while True:
            token = y.item()
            yield "token", (token, logprobs, False), monitor, events
            events, generated = [], generated + 1
            if token in eos_ids or generated >= max_tokens:
                return
            response.append(token)
            special.append(token in special_ids)
            y_next, logprobs_next = sample(out[0])
            history = mx.concatenate([history, y_next])
            planned = plan(t + 1)
            out_next = launch(y_next, t + 1, planned)
            evaluate(y_next, out_next)
            if out[1] is not None:
                decision = monitor.observe(t, out[1].item())
                events = decision.events
                if decision.insert:
                    trim_prompt_cache(cache, 1)  # the speculative token t+1 is not kept
                    history = history[:-1]
                    keep = decision.rollback_to
                    if keep is not None and keep < len(response):
                        drop = len(response) - keep
                        trim_prompt_cache(cache, drop)
                        del response[keep:], special[keep:]
                        history = history[: history.size - drop]
                        yield "retract", drop, monitor, events
                        events = []
                    refusal_due = True
                    break
                if plan(t + 1) != planned:
                    trim_prompt_cache(cache, 1)
                    out_next = launch(y_next, t + 1, plan(t + 1))
                    evaluate(y_next, out_next)
            out, y, logprobs, t = out_next, y_next, logprobs_next, t + 1


def streamed_text(tokenizer, ids: Sequence[int], finish: str) -> str:
    """The text mlx-lm's ``stream_generate`` yields for ``ids`` (EOS excluded), segment by segment
    with the same streaming detokenizer calls, so batched and sequential responses are equal."""
    detok = tokenizer.detokenizer
    text = ""
    for i, token in enumerate(ids):
        detok.add_token(token)
        if finish == "stop" or i < len(ids) - 1:  # on "length" the last token is read finalized
            text += detok.last_segment
    detok.finalize()
    return text + detok.last_segment


def stream_generate(
    model: Model,
    tokenizer,
    prompt: Prompt,
    max_tokens: int = 256,
    *,
    safety: Optional[SafetyConfig] = None,
    prefill_response: Optional[str] = None,
    sampler: Optional[Callable] = None,
    logits_processors: Optional[List[Callable]] = None,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    **kwargs: Any,
) -> Iterator[GenerationResult]:
    """Stream a response with safety-aware sampling.

    ``prompt``: a string (raw text), token ids, or chat messages (``[{"role": .., "content": ..}]``,
    rendered with the tokenizer's chat template). ``prefill_response``: assistant text placed
    before the model's own (a prefill attack, or an app's prefix); it is not streamed back.
    ``sampler`` / ``logits_processors``: mlx-lm callables (``make_sampler``,
    ``make_logits_processors``); without a sampler, ``temp/top_p/top_k/min_p`` build one.
    ``safety``: a ``SafetyConfig``; ``SafetyConfig(enabled=False)`` is exactly mlx-lm's
    ``stream_generate``. Each result carries ``safety`` (latest p(malicious), query verdict, events).
    On a ``retracted`` event drop ``event.text`` from the end of what you displayed."""
    tokenizer = wrap_tokenizer(tokenizer)
    safety = (safety or SafetyConfig()).resolved(model.args.safesig)
    if max_tokens < 1:
        raise SafesigError(f"max_tokens must be at least 1, got {max_tokens}.")
    prepared, prefill_ids = prompt_with_prefill(model, tokenizer, prompt, prefill_response)
    sampler = sampler or make_sampler(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p)
    if not safety.enabled:
        yield from _plain_stream(
            model, tokenizer, prepared.ids + prefill_ids, max_tokens, sampler,
            logits_processors, **kwargs,
        )
        return
    steps = safe_generate_step(
        model, prepared, safety,
        refusal_ids=tokenizer.encode(safety.refusal_prefix, add_special_tokens=False),
        special_ids=special_ids(tokenizer),
        eos_ids=set(tokenizer.eos_token_ids),
        prefill_ids=prefill_ids,
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=logits_processors,
        **kwargs,
    )
    detok = tokenizer.detokenizer
    detok.reset()
    emitted: List[int] = []
    text_so_far = ""
    tic = time.perf_counter()
    prompt_tps, n = 0.0, 0

    def result(text, token, logprobs, monitor, events, refusal=False, finish=None):
        return GenerationResult(
            text=text, token=token, logprobs=logprobs,
            safety=SafetySignal(
                p=monitor.latest_p, query_p=monitor.query_p, flagged=bool(monitor.query_malicious),
                inserted=monitor.inserted, events=events,
            ),
            prompt_tokens=len(prepared.ids), prompt_tps=prompt_tps,
            generation_tokens=n, generation_tps=n / max(time.perf_counter() - tic, 1e-9),
            peak_memory=mx.get_peak_memory() / 1e9, refusal=refusal, finish_reason=finish,
        )

    last = None
    for kind, payload, monitor, events in steps:
        if n == 0 and prompt_tps == 0.0:
            prompt_tps = len(prepared.ids) / max(time.perf_counter() - tic, 1e-9)
            tic = time.perf_counter()
        if kind == "retract":
            kept = emitted[: len(emitted) - payload]
            detok.reset()
            for tok in kept:
                detok.add_token(tok)
            kept_text = detok.last_segment  # already shown: consumed, not re-sent
            withdrawn = text_so_far[len(kept_text) :]
            events = events + [SafetyEvent("retracted", len(kept), monitor.latest_p, withdrawn)]
            emitted, text_so_far = kept, kept_text
            yield result("", None, None, monitor, events)
            continue
        token, logprobs, refusal = payload
        n += 1
        if token in tokenizer.eos_token_ids:
            last = (token, logprobs, monitor, events, refusal, "stop")
            break
        detok.add_token(token)
        emitted.append(token)
        if n >= max_tokens:
            last = (token, logprobs, monitor, events, refusal, "length")
            break
        segment = detok.last_segment
        text_so_far += segment
        yield result(segment, token, logprobs, monitor, events, refusal)
    detok.finalize()
    if last is None:
        return
    token, logprobs, monitor, events, refusal, finish = last
    segment = detok.last_segment
    yield result(segment, token, logprobs, monitor, events, refusal, finish)


def _plain_stream(model, tokenizer, ids, max_tokens, sampler, logits_processors, **kwargs):
    """Safety off: mlx-lm's own generation loop on the same model (no [CLS] anywhere)."""
    kwargs.pop("fused_probe", None)
    for r in mlx_lm.stream_generate(
        model, tokenizer, mx.array(ids), max_tokens=max_tokens, sampler=sampler,
        logits_processors=logits_processors, **kwargs,
    ):
        yield GenerationResult(
            text=r.text, token=r.token, logprobs=r.logprobs, safety=SafetySignal(),
            prompt_tokens=r.prompt_tokens, prompt_tps=r.prompt_tps,
            generation_tokens=r.generation_tokens, generation_tps=r.generation_tps,
            peak_memory=r.peak_memory, finish_reason=r.finish_reason,
        )


def without_retracted(text: str, events: Sequence[SafetyEvent]) -> str:
    """``text`` shown so far minus what ``retracted`` events among ``events`` withdraw (each event's
    ``text`` is the end of what was shown). The one place streaming callers drop retracted text."""
    for e in events:
        if e.kind == "retracted" and e.text:
            text = text[: len(text) - len(e.text)]
    return text


def generate(
    model: Model, tokenizer, prompt: Prompt, max_tokens: int = 256, *, verbose: bool = False,
    **kwargs: Any,
) -> str:
    """The whole response as a string (retracted text removed); see ``stream_generate``."""
    text = ""
    for r in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs):
        kept = without_retracted(text, r.safety.events)
        if verbose and len(kept) < len(text):
            print(f"\n[retracted {len(text) - len(kept)} chars]", flush=True)
        if verbose:
            print(r.text, end="", flush=True)
        text = kept + r.text
    if verbose:
        print()
    return text
