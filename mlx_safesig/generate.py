"""Safety-aware generation for one prompt: the query verdict (``score``), streaming
(``stream_generate``), the whole text (``generate``). With safety on, the one strategic-decoding
engine runs it as a batch of one row (``engine.SafeBatchGenerator``; cache layout there); with
safety off it is mlx-lm's own loop.
"""

import hashlib
import json
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, List, MutableMapping, Optional, Sequence, Union

import mlx.core as mx
import mlx_lm
import numpy as np
from mlx_lm.sample_utils import make_sampler

from .decoding import SafetyConfig, SafetyEvent
from .engine import SafeBatchGenerator
from .model import Model, SafesigError
from .prefill import (
    PREFILL_STEP,
    PromptCache,
    prefill_batch_with_verdict,
    prefill_query,
    prefill_with_verdict,
)
from .prompt import Prompt, check_context, prepare_prompt, prompt_with_prefill, wrap_tokenizer
from .smoothing import Smoother
from .steps import RetractStep, SafetySignal, Step, TokenStep
from .surprisal import query_peak


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


def _verdict_input(model: Model, tokenizer, text_or_messages) -> tuple:
    """(ids, query slots) the query verdict of ``text_or_messages`` reads (see ``score``)."""
    if isinstance(text_or_messages, str):
        ids = tokenizer.encode(text_or_messages)
        if not ids:
            raise SafesigError("the text to score is empty.")
        slots = range(len(ids))
    else:
        prepared = prepare_prompt(tokenizer, text_or_messages)
        ids, slots = prepared.ids, prepared.query_slots
    check_context(model, len(ids))
    return list(ids), list(slots)


def score(model: Model, tokenizer, text_or_messages: Union[str, Sequence[dict]]) -> float:
    """p(malicious) from the ``[CLS]`` head.

    A string: the text's tokens at RoPE positions 1..n (BOS only if the tokenizer adds one), then
    ``[CLS]`` (at position 0 unless the model's ``probe_position`` is "current"); ``[CLS]``
    attends to all of them and itself; nobody attends to ``[CLS]``.
    Chat messages: the query verdict generation starts from (template rendered, ``[CLS]`` over the
    conversation's query slots, at the RoPE position generation gives it)."""
    ids, slots = _verdict_input(model, wrap_tokenizer(tokenizer), text_or_messages)
    _, p = prefill_with_verdict(model, ids, model.make_cache(), slots)
    return p.item()


def query_surprisal(model: Model, tokenizer,
                    text_or_messages: Union[str, Sequence[dict]]) -> np.ndarray:
    """The surprisal (nats, the model's own) of each query-slot token of what ``score`` reads, in
    slot order, as the prefill computes it for the surprisal gate (``surprisal.py``); a token
    without one before it (slot 0) has none."""
    ids, slots = _verdict_input(model, wrap_tokenizer(tokenizer), text_or_messages)
    nats: dict = {}
    prefill_with_verdict(model, ids, model.make_cache(), slots, nats=nats)
    return np.array([nats[s] for s in slots if s in nats])


SCORE_BATCH_TOKENS = 4096  # padded prompt tokens per batched verdict forward


def verdict_key(ids: Sequence[int], slots: Sequence[int]) -> str:
    """A verdict input's key (sha256, 24 hex digits, of its token ids and query slots): what a
    ``score_many`` cache is keyed by, so a kept p is reused only for the same tokens."""
    return hashlib.sha256(json.dumps([list(ids), list(slots)]).encode()).hexdigest()[:24]


def score_many(model: Model, tokenizer, items: Sequence[Union[str, Sequence[dict]]],
               batch_size: int = 16, progress: Optional[Callable[[int], None]] = None,
               cache: Optional[MutableMapping[str, float]] = None) -> List[float]:
    """``score`` of each item, several per forward: prompts of similar length are left-padded
    into one batch (``prefill_batch_with_verdict``; at most ``batch_size`` rows and about
    ``SCORE_BATCH_TOKENS`` padded tokens), the same p as one by one to float tolerance. Prompts
    longer than one prefill chunk run alone. ``progress(n)`` after each forward (and once for the
    items ``cache`` held). ``cache``: p by ``verdict_key``; items it holds are not run, and each
    new p is stored in it as its forward finishes (``eval.store.VerdictCache`` keeps them on disk)."""
    return [p for p, _ in _verdicts(model, tokenizer, items, batch_size, progress, cache, None)]


def score_and_peaks(model: Model, tokenizer, items: Sequence[Union[str, Sequence[dict]]],
                    window: int, batch_size: int = 16,
                    progress: Optional[Callable[[int], None]] = None,
                    cache: Optional[MutableMapping[str, float]] = None) -> List[tuple]:
    """``score_many`` and, from the same forwards, what the surprisal gate reads of each item:
    (p, the query's highest mean surprisal over ``window`` consecutive query tokens), the peak
    equal to ``query_surprisal``'s. ``cache`` keeps the peaks too (key ``verdict_key|peak<w>``)."""
    return _verdicts(model, tokenizer, items, batch_size, progress, cache, window)


def smoothed_scores(model: Model, tokenizer, items: Sequence[Union[str, Sequence[dict]]],
                    copies: int, rate: float, progress: Optional[Callable[[int], None]] = None,
                    cache: Optional[MutableMapping[str, float]] = None,
                    smoother: Optional[Smoother] = None) -> List[float]:
    """The smoothed query verdict (``SafetyConfig.smooth_copies``, ``smoothing.py``) of each item,
    as generation computes it, one item (its copies batched) at a time; ``progress(1)`` after
    each. ``cache`` as ``score_many``'s (key ``verdict_key|smooth<copies>@<rate>``)."""
    tokenizer = wrap_tokenizer(tokenizer)
    smoother = smoother or Smoother(model, tokenizer)
    out = []
    for item in items:
        ids, slots = _verdict_input(model, tokenizer, item)
        key = f"{verdict_key(ids, slots)}|smooth{copies}@{rate:g}"
        if cache is not None and key in cache:
            p = cache[key]
        else:
            p = smoother(ids, slots, copies, rate)
            if cache is not None:
                cache[key] = p
        out.append(p)
        if progress:
            progress(1)
    return out


SHARED_PREFIX = 256  # leading tokens two prompts must share to run on one cache, not batched


def _shared_prefix_items(inputs: Sequence[tuple], pending: Sequence[int]) -> List[int]:
    """The ``pending`` items whose ids share at least ``SHARED_PREFIX`` leading tokens with
    another's (the same long wrapper or history), sorted by ids so that neighbours share most."""
    by_ids = sorted(pending, key=lambda i: inputs[i][0])
    shared = set()
    for a, b in zip(by_ids, by_ids[1:]):
        x, y = inputs[a][0], inputs[b][0]
        n = next((k for k, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        if n >= SHARED_PREFIX:
            shared |= {a, b}
    return [i for i in by_ids if i in shared]


def _verdicts(model, tokenizer, items, batch_size, progress, cache, window) -> List[tuple]:
    """(p, peak) of each item (peak None without a ``window``): ``score_many``'s batching. Items
    that share a long prefix (``_shared_prefix_items``: the same jailbreak wrapper, say) run one
    by one on one conversation cache instead (``prefill_query``), each computing only what it
    does not share with the one before: the same p and peak as a fresh prefill, to float
    tolerance, for a fraction of the work."""
    tokenizer = wrap_tokenizer(tokenizer)
    inputs = [_verdict_input(model, tokenizer, item) for item in items]
    out: List[Optional[tuple]] = [None] * len(inputs)
    keys = [verdict_key(*x) for x in inputs] if cache is not None else []
    suffix = f"|peak{window}"
    for i, key in enumerate(keys):
        if key in cache and (window is None or key + suffix in cache):
            out[i] = (cache[key], None if window is None else cache[key + suffix])
    kept = sum(o is not None for o in out)
    if kept and progress:
        progress(kept)

    def keep(group, ps, peaks):
        mx.eval(ps)
        for i, p, peak in zip(group, ps, peaks):
            out[i] = (p.item(), peak)
            if cache is not None:
                cache[keys[i]] = out[i][0]
                if peak is not None:
                    cache[keys[i] + suffix] = peak
        if progress:
            progress(len(group))

    pending = [i for i, o in enumerate(out) if o is None]
    shared = _shared_prefix_items(inputs, pending)
    if shared:
        conversation = PromptCache(model)
        for i in shared:
            _, _, p, peak = prefill_query(model, *inputs[i], conversation, window)
            keep([i], [p], [peak])
    alone = set(shared)
    order = sorted((i for i in pending if i not in alone), key=lambda i: len(inputs[i][0]))
    done = 0
    while done < len(order):
        if len(inputs[order[done]][0]) > PREFILL_STEP:  # a long prompt runs chunked, alone
            group = [order[done]]
            ids, slots = inputs[group[0]]
            _, _, p, peak = prefill_query(model, ids, slots, window=window)
            keep(group, [p], [peak])
            done += 1
            continue
        group = []
        for i in order[done:]:
            rows, longest = len(group) + 1, len(inputs[i][0])
            if group and (rows > batch_size or rows * longest > SCORE_BATCH_TOKENS
                          or longest > PREFILL_STEP):
                break
            group.append(i)
        nats = [None if window is None else {} for _ in group]
        ps = [p for _, _, p in prefill_batch_with_verdict(
            model, [inputs[i][0] for i in group], [inputs[i][1] for i in group],
            nats=None if window is None else nats)]
        keep(group, ps, [None if d is None else query_peak(d, inputs[i][1], window)
                         for i, d in zip(group, nats)])
        done += len(group)
    return out


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
    prompt_cache: Optional[PromptCache] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 0,
    max_kv_size: Optional[int] = None,
    fused_probe: bool = True,
    **kwargs: Any,
) -> Iterator[GenerationResult]:
    """Stream a response with safety-aware sampling.

    ``prompt``: a string (raw text), token ids, or chat messages (``[{"role": .., "content": ..}]``,
    rendered with the tokenizer's chat template). ``prefill_response``: assistant text placed
    before the model's own (a prefill attack, or an app's prefix); it is not streamed back.
    ``sampler`` / ``logits_processors``: mlx-lm callables (``make_sampler``,
    ``make_logits_processors``, or ``engine.seeded_sampler``); without a sampler,
    ``temp/top_p/top_k/min_p`` build one. ``prompt_cache``: a ``make_prompt_cache(model)`` kept
    across a conversation's turns; pass the whole conversation each turn and only what follows
    the previous turn's prompt is run. ``kv_bits`` / ``kv_group_size`` / ``quantized_kv_start``:
    mlx-lm's quantized KV cache (with safety on it is quantized once, after the prompt, if that
    holds ``quantized_kv_start`` tokens). ``max_kv_size`` works with safety off only (a rotating
    cache overwrites the slots the safety checks address).
    ``safety``: a ``SafetyConfig``; ``SafetyConfig(enabled=False)`` is exactly mlx-lm's
    ``stream_generate`` (other keyword arguments go to it). Each result carries ``safety``
    (latest p(malicious), query verdict, events). On a ``retracted`` event drop ``event.text``
    from the end of what you displayed (``without_retracted``)."""
    tokenizer = wrap_tokenizer(tokenizer)
    safety = (safety or SafetyConfig()).resolved(model.args.safesig)
    if max_tokens < 1:
        raise SafesigError(f"max_tokens must be at least 1, got {max_tokens}.")
    if prompt_cache is not None and not isinstance(prompt_cache, PromptCache):
        raise SafesigError("prompt_cache must come from mlx_safesig.make_prompt_cache(model): "
                           "it remembers which prompt its keys and values belong to.")
    prepared, prefill_ids = prompt_with_prefill(model, tokenizer, prompt, prefill_response)
    sampler = sampler or make_sampler(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p)
    if not safety.enabled:
        yield from _plain_stream(
            model, tokenizer, prepared.ids + prefill_ids, max_tokens, sampler, logits_processors,
            prompt_cache, kv_bits=kv_bits, kv_group_size=kv_group_size,
            quantized_kv_start=quantized_kv_start, max_kv_size=max_kv_size, **kwargs,
        )
        return
    if max_kv_size is not None:
        raise SafesigError("max_kv_size cannot be honoured with safety on: the safety checks "
                           "address fixed cache slots, which a rotating cache overwrites.")
    if kwargs:
        raise SafesigError(f"stream_generate with safety on does not take "
                           f"{', '.join(sorted(kwargs))}.")
    tic = time.perf_counter()
    engine = SafeBatchGenerator(model, tokenizer, safety, fused_probe=fused_probe,
                                kv_bits=kv_bits, kv_group_size=kv_group_size,
                                quantized_kv_start=quantized_kv_start)
    engine.insert_prepared(prepared, prefill_ids, max_tokens, sampler=sampler,
                           logits_processors=logits_processors, prompt_cache=prompt_cache)
    prompt_tps = len(prepared.ids) / max(time.perf_counter() - tic, 1e-9)
    to_result = StepText(tokenizer, len(prepared.ids), prompt_tps)
    while True:
        for step in engine.next():
            r = to_result(step)
            yield r
            if r.finish_reason is not None:
                return


class StepText:
    """One row's engine steps -> ``GenerationResult`` objects, in order: text segments from
    mlx-lm's streaming detokenizer (EOS not shown), and for a ``RetractStep`` an event-only result
    whose ``retracted`` event carries the withdrawn text. Timing counts from construction."""

    def __init__(self, tokenizer, prompt_tokens: int, prompt_tps: float):
        self.detok = tokenizer.detokenizer
        self.detok.reset()
        self.emitted: List[int] = []
        self.text = ""  # what was shown so far
        self.prompt_tokens, self.prompt_tps = prompt_tokens, prompt_tps
        self.tic = time.perf_counter()
        self.n = 0

    def __call__(self, step: Step) -> GenerationResult:
        detok = self.detok
        if isinstance(step, RetractStep):
            kept = self.emitted[: len(self.emitted) - step.count]
            detok.reset()
            for tok in kept:
                detok.add_token(tok)
            kept_text = detok.last_segment  # already shown: consumed, not re-sent
            withdrawn = self.text[len(kept_text) :]
            safety = replace(step.safety, events=step.safety.events + [
                SafetyEvent("retracted", len(kept), step.safety.p, withdrawn)])
            self.emitted, self.text = kept, kept_text
            return self._result("", step, None, None, safety)
        self.n += 1
        if step.finish_reason != "stop":
            detok.add_token(step.token)
            self.emitted.append(step.token)
        if step.finish_reason is not None:
            detok.finalize()
        segment = detok.last_segment
        self.text += segment
        return self._result(segment, step, step.token, step.logprobs, step.safety)

    def _result(self, text, step, token, logprobs, safety) -> GenerationResult:
        return GenerationResult(
            text=text, token=token, logprobs=logprobs, safety=safety,
            prompt_tokens=self.prompt_tokens, prompt_tps=self.prompt_tps,
            generation_tokens=self.n,
            generation_tps=self.n / max(time.perf_counter() - self.tic, 1e-9),
            peak_memory=mx.get_peak_memory() / 1e9,
            refusal=isinstance(step, TokenStep) and step.refusal,
            finish_reason=getattr(step, "finish_reason", None),
        )


def _plain_stream(model, tokenizer, ids, max_tokens, sampler, logits_processors, prompt_cache,
                  **kwargs):
    """Safety off: mlx-lm's own generation loop on the same model (no [CLS] anywhere); a
    ``PromptCache`` gives mlx-lm its layers and only the ids after the reused prefix."""
    start = 0
    if prompt_cache is not None:
        start = prompt_cache.reuse(ids, safety=False)
        kwargs["prompt_cache"] = prompt_cache.layers
    held = list(ids)  # what leads the cache: the prompt, then the tokens fed after it
    try:
        for r in mlx_lm.stream_generate(
            model, tokenizer, mx.array(ids[start:]), max_tokens=max_tokens, sampler=sampler,
            logits_processors=logits_processors, **kwargs,
        ):
            held.append(r.token)
            yield _plain_result(r)
    finally:  # once the turn ends; mlx-lm may have fed one token more than it handed out
        if prompt_cache is not None:
            prompt_cache.ids = held[: prompt_cache.offset]


def _plain_result(r) -> GenerationResult:
    """mlx-lm's ``GenerationResponse`` as ours (no safety signal: safety off)."""
    return GenerationResult(
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
