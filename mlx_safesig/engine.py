"""The strategic-decoding engine (SPEC §3-4): one step implementation for 1..B rows.

``SafeBatchGenerator`` is the only generation loop with safety on. ``stream_generate`` drives it
with one row, ``safe_batch`` (evaluation) and apps (a server's continuous batching) with many:
rows are inserted at any time, each with its own prompt, monitor (``decoding.SafetyMonitor``),
sampler, logits processors, token budget, rollback and events, and leave when done. Each step
hands out typed values (``TokenStep``, ``RetractStep``) carrying a snapshot of the row's safety
state (``SafetySignal``).

Cache layout of one row (slot = index in its KV cache, pos = RoPE position)::

    slots 0 .. n-1   the prompt (BOS, template, query, template)   pos 1 .. n    plain causal
    slot  n          [CLS], attends to the query slots and itself  pos 0         kept: the verdict
    slots n+1 ..     response tokens (prefill, generated, refusal) pos n+1 ..  attend all, [CLS] too

With ``SafetyConfig.keep_verdict="flagged"`` a benign verdict's ``[CLS]`` leaves the cache right
after it is read: the response then starts at slot n, still at positions n+1 .., so it is the
language model's own continuation of the prompt.

This is the strategic prefill mask of SPEC §3 (``attention.sft_mask``) evaluated in three plain
steps: nobody in the prompt attends to ``[CLS]``, so the prompt runs at mlx-lm's causal speed, and
the order of slots in a KV cache does not matter to attention, only masks and positions do. Rows of
a batch share mlx-lm's left-padded ``BatchKVCache`` (row i's slot s sits at ``pad_i + s``); a lone
row keeps its plain per-layer caches, mlx-lm's fast single-sequence path.

Every decode step is one forward of ``[token, [CLS]]`` per row (``decode_probe_mask``): the token
sees its row causally, never the probe; the probe sees the window its row's monitor chose and
itself, or only itself when the schedule skips the row; its keys/values are trimmed right after.
When no row probes, the step is the plain one-token step. Like mlx-lm, the forward of token t+1 is
launched before token t is handed out, so building the graph overlaps computing it; the probe plan
for t+1 is made before the verdict riding with t is read and the step is re-launched in the rare
case that verdict changed a plan (a flip starting or clearing) or inserted the refusal, so the
result equals step-by-step decoding. Whether the newest token is special (rule 4) is decided
inside the graph. A row's result depends on its own inputs only: its draws come from its own
sampler, so a batch of B gives each row the tokens of its single run.

What a row feeds as a block goes in on its own cache, before it (re)joins the batch: the prompt,
the kept query verdict, a prefill (judged by a window probe before the first generated token) and
the refusal prefix (after a rollback, if asked).
"""

from dataclasses import dataclass, field
from itertools import count
from typing import Callable, List, Optional, Sequence, Union

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache, trim_prompt_cache
from mlx_lm.sample_utils import greedy_sampler

from .attention import decode_probe_mask, window_row
from .decoding import SafetyConfig, SafetyEvent, SafetyMonitor
from .model import Model, SafesigError
from .prefill import (
    PREFILL_STEP,
    PromptCache,
    cls_logits_mask,
    prefill_batch_with_verdict,
    prefill_query,
    probe,
    probe_position,
    token_table,
)
from .prompt import PreparedPrompt, prompt_with_prefill, special_ids, wrap_tokenizer
from .sampling import seeded_sampler  # noqa: F401  (the engine's rows' samplers)
from .smoothing import Smoother
from .steps import RetractStep, SafetySignal, Step, TokenStep
from .surprisal import query_peak


@dataclass
class _Row:
    """One generation. ``y`` [1] is the next token to feed (response index ``len(response)``),
    sampled from ``logprobs`` [V]; ``response`` holds the response tokens fed so far."""

    uid: int
    prompt: PreparedPrompt
    monitor: SafetyMonitor
    sampler: Optional[Callable]
    processors: List[Callable]
    max_tokens: int
    cache: Optional[list]  # its own caches while outside the batch
    history: Optional[mx.array]  # what logits processors see (prompt + response)
    refusal: List[int] = field(default_factory=list)  # its refusal prefix's ids
    response: List[int] = field(default_factory=list)
    special: List[bool] = field(default_factory=list)
    generated: int = 0
    events: List[SafetyEvent] = field(default_factory=list)
    y: Optional[mx.array] = None
    logprobs: Optional[mx.array] = None
    kept: bool = True  # the query verdict's [CLS] is in the cache (``SafetyConfig.keep_verdict``)
    conversation: Optional[PromptCache] = None  # kept across turns (``insert(prompt_cache=)``)

    @property
    def base(self) -> int:
        """Slot of response index 0 (the kept ``[CLS]`` verdict, if any, sits just before it)."""
        return len(self.prompt.ids) + int(self.kept)

    @property
    def slot(self) -> int:
        """Slot of ``y``: the number of slots before it in the row's cache."""
        return self.base + len(self.response)

    @property
    def position(self) -> int:
        """RoPE position of ``y``: the prompt sits at 1 .. n, the response after it, whether or
        not the verdict's ``[CLS]`` (position 0) stays in the cache."""
        return len(self.prompt.ids) + 1 + len(self.response)

    def plan(self) -> Optional[tuple]:
        """What the probe riding on ``y`` sees: (slots before ``y``, whether ``y``'s own slot is
        in the window), or None when the monitor skips it."""
        t = len(self.response)
        if not self.monitor.wants_probe(t):
            return None
        self.special.append(False)  # y's own flag is looked up in the graph; no O(t) copy
        include_query, window = self.monitor.window(t, self.special)
        self.special.pop()
        slots = (self.prompt.query_slots if include_query else []) + [
            self.base + i for i in window if i < t]
        return tuple(slots), t in window

    def append(self, ids: Sequence[int], tables: "_Tables", sampled: bool = False):
        """Response tokens fed; a sampled one is in ``history`` already (``_sample``)."""
        self.response.extend(ids)
        self.special.extend(t in tables.special for t in ids)
        if self.history is not None and not sampled:
            self.history = mx.concatenate([self.history, mx.array(ids)])


@dataclass
class _Tables:
    """What every row shares: token sets, the default refusal's ids, the ``[CLS]`` logit mask."""

    refusal: List[int]
    special: set
    eos: set
    cls_mask: Optional[mx.array]  # [V]: -inf at [CLS] when it has an LM-head row
    special_table: mx.array  # [V'] bool: rule 4, looked up inside the graph


class SafeBatchGenerator:
    """Safety-on generation for rows that come and go (mlx-lm's ``BatchGenerator`` shape).

    ``insert`` admits prompts (prefilled at once, on their own caches) and returns their uids;
    each ``next()`` call advances every row by one token and returns the ``TokenStep`` /
    ``RetractStep`` objects produced; a row leaves after its step with a ``finish_reason``.
    ``safety`` may be unresolved (the model's values fill it in). ``fused_probe=False`` runs each
    probe as its own forward after the token's (for equivalence tests)."""

    def __init__(self, model: Model, tokenizer, safety: SafetyConfig, *, fused_probe: bool = True,
                 kv_bits: Optional[int] = None, kv_group_size: int = 64,
                 quantized_kv_start: int = 0):
        self.model, self.tokenizer = model, wrap_tokenizer(tokenizer)
        self.config = safety.resolved(model.args.safesig)
        if not self.config.enabled:
            raise SafesigError("SafeBatchGenerator runs safety-on generation; with safety off "
                               "use mlx-lm's BatchGenerator.")
        vocab = model.args.vocab_size  # LM-head rows
        ids = special_ids(self.tokenizer)
        self.tables = _Tables(
            refusal=self.tokenizer.encode(self.config.refusal_prefix, add_special_tokens=False),
            special=ids, eos=set(self.tokenizer.eos_token_ids),
            cls_mask=cls_logits_mask(model, vocab),
            special_table=token_table(max(vocab, model.cls_token_id + 1), ids),
        )
        self.fused_probe = fused_probe
        self.smoother = Smoother(model, self.tokenizer)  # ``smooth_copies``: the query verdict
        self._cls = mx.array([model.cls_token_id])
        self.kv = (kv_bits, kv_group_size, quantized_kv_start)
        self.rows: List[_Row] = []  # in batch order; their y is in flight in ``self._out``
        self.joining: List[_Row] = []  # admitted, on their own caches
        self.cache: Optional[list] = None
        self._out = None  # (logits [B, V], probe p [B] or None, plans) of the step in flight
        self._pending: List[Step] = []
        self._uids = count()

    # -- admission ----------------------------------------------------------------------------

    def insert(self, prompts: Sequence, max_tokens: Union[int, Sequence[int]] = 256, *,
               prefill_responses: Optional[Sequence[Optional[str]]] = None,
               samplers: Optional[Sequence[Optional[Callable]]] = None,
               logits_processors: Optional[Sequence[Optional[List[Callable]]]] = None,
               prompt_cache: Optional[PromptCache] = None,
               safety: Optional[SafetyConfig] = None) -> List[int]:
        """Admit ``prompts`` (strings, token ids or chat messages, as ``stream_generate`` takes
        them) and return their uids. Per prompt: ``max_tokens``, a prefilled response text, a
        sampler (None: greedy) and logits processors. ``prompt_cache``: one prompt only, whose
        conversation cache is reused and kept (``PromptCache``). ``safety``: these rows' own
        settings (schedule, thresholds, rollback, refusal ...) instead of the generator's.
        Raises ``SafesigError`` for an unusable prompt (nothing admitted then)."""
        n = len(prompts)
        if isinstance(max_tokens, int):
            max_tokens = [max_tokens] * n
        prefills = prefill_responses or [None] * n
        samplers = samplers or [None] * n
        processors = logits_processors or [None] * n
        prepared = [prompt_with_prefill(self.model, self.tokenizer, p, f)
                    for p, f in zip(prompts, prefills)]
        return self.insert_prepared_many(prepared, max_tokens, samplers=samplers,
                                         logits_processors=processors, prompt_cache=prompt_cache,
                                         safety=safety)

    def insert_prepared(self, prompt: PreparedPrompt, prefill_ids: Sequence[int] = (),
                        max_tokens: int = 256, *, sampler: Optional[Callable] = None,
                        logits_processors: Optional[List[Callable]] = None,
                        prompt_cache: Optional[PromptCache] = None,
                        safety: Optional[SafetyConfig] = None) -> int:
        """``insert`` for one prompt already prepared (``prompt_with_prefill``): its ids and query
        slots, and the prefill's token ids. Returns its uid."""
        return self.insert_prepared_many([(prompt, prefill_ids)], [max_tokens],
                                         samplers=[sampler], logits_processors=[logits_processors],
                                         prompt_cache=prompt_cache, safety=safety)[0]

    def insert_prepared_many(self, prompts: Sequence[tuple], max_tokens: Sequence[int], *,
                             samplers: Optional[Sequence[Optional[Callable]]] = None,
                             logits_processors: Optional[Sequence[Optional[List]]] = None,
                             prompt_cache: Optional[PromptCache] = None,
                             safety: Optional[SafetyConfig] = None) -> List[int]:
        """``insert_prepared`` for several ``(prompt, prefill_ids)`` at once (a server admitting the
        requests that arrived together): their prompts and query verdicts run as one left-padded
        forward (``prefill_batch_with_verdict``), the rest row by row. Returns their uids."""
        n = len(prompts)
        config = self.config if safety is None else safety.resolved(self.model.args.safesig)
        if not config.enabled:
            raise SafesigError("SafeBatchGenerator rows run with safety on; with safety off use "
                               "mlx-lm's BatchGenerator.")
        for m in max_tokens:
            if m < 1:
                raise SafesigError(f"max_tokens must be at least 1, got {m}.")
        if prompt_cache is not None and n != 1:
            raise SafesigError("a prompt cache holds one conversation: insert one prompt with it.")
        if self.kv[0] is not None and (self.rows or self.joining or n > 1):
            raise SafesigError("kv_bits works with safety on for one row at a time; mlx-lm's "
                               "batch cache is not quantized.")
        refusal = self.tables.refusal if config.refusal_prefix == self.config.refusal_prefix \
            else self.tokenizer.encode(config.refusal_prefix, add_special_tokens=False)
        prefilled = [None] * n
        if n > 1 and all(len(p.ids) <= PREFILL_STEP for p, _ in prompts):
            slots = [p.query_slots for p, _ in prompts]
            nats = [{} for _ in prompts]  # filled with a gate only
            gated = nats if config.surprisal_gate is not None else None
            rows = prefill_batch_with_verdict(self.model, [p.ids for p, _ in prompts], slots, gated)
            prefilled = [(*row, query_peak(got, s, config.surprisal_window) if gated else None)
                         for row, got, s in zip(rows, nats, slots)]
        uids = []
        for (prompt, prefill_ids), m, s, procs, pre in zip(
                prompts, max_tokens, samplers or [None] * n, logits_processors or [None] * n,
                prefilled):
            uids.append(next(self._uids))
            self._admit(uids[-1], prompt, list(prefill_ids), m, s, list(procs or []),
                        prompt_cache, config, refusal, pre)
        return uids

    def remove(self, uids: Sequence[int]):
        """Drop rows ``uids`` (a client went away); the other rows go on unchanged."""
        gone = set(uids)
        self.joining = [r for r in self.joining if r.uid not in gone]
        self._pending = [s for s in self._pending if s.uid not in gone]
        keep = [i for i, r in enumerate(self.rows) if r.uid not in gone]
        if len(keep) == len(self.rows):
            return
        self._trim(1)  # the step in flight: launched again without the rows that left
        self._leave(keep)
        self._out = self._launch([r.plan() for r in self.rows]) if self.rows else None

    def _admit(self, uid, prompt: PreparedPrompt, prefill_ids: List[int], max_tokens: int,
               sampler, processors, prompt_cache: Optional[PromptCache],
               config: SafetyConfig, refusal: List[int], prefilled: Optional[tuple] = None):
        """Prefill one row on its own cache: the prompt (reusing a conversation cache's common
        prefix) and the kept query verdict (or take them ``prefilled``: its cache, the last
        prompt token's hidden state, the verdict and the surprisal peak), the prefill and its
        window probe, the refusal if due; then sample its first token. It joins the batch at
        the next step."""
        model = self.model
        cache, h, verdict, peak = prefilled or prefill_query(
            model, prompt.ids, prompt.query_slots, prompt_cache,
            None if config.surprisal_gate is None else config.surprisal_window)
        if config.smooth_copies:
            verdict = mx.array(self.smoother(prompt.ids, prompt.query_slots, config.smooth_copies,
                                             config.smooth_rate))
        self._maybe_quantize(cache)
        logits = model.logits(h[None])
        monitor = SafetyMonitor(config, n_prefill=len(prefill_ids))
        row = _Row(uid, prompt, monitor, sampler, processors, max_tokens, cache,
                   mx.array(prompt.ids) if processors else None, refusal,
                   conversation=prompt_cache)
        decision = monitor.start(verdict.item(), peak)
        row.events = decision.events
        if config.keep_verdict == "flagged" and not monitor.query_malicious:
            trim_prompt_cache(cache, 1)
            row.kept = False
        if prefill_ids:
            h = model.hidden(mx.array(prefill_ids)[None], cache, positions=row.position)
            row.append(prefill_ids, self.tables)
            logits = model.logits(h[:, -1])
            if monitor.wants_prefill_probe():
                t = len(prefill_ids) - 1
                include_query, window = monitor.window(t, row.special)
                slots = (prompt.query_slots if include_query else []) + [
                    row.base + i for i in window]
                p = probe(model, cache, slots, position=probe_position(model, row.position))
                decision = monitor.observe(t, p.item())
                row.events += decision.events
        if decision.insert:
            self._refuse(row)
        else:
            self._sample([row], logits)
            self.joining.append(row)

    def _maybe_quantize(self, cache: list):
        bits, group, start = self.kv
        if bits is None:
            return
        for i, c in enumerate(cache):
            if hasattr(c, "to_quantized") and c.offset >= start:
                cache[i] = c.to_quantized(group_size=group, bits=bits)

    def _refuse(self, row: _Row):
        """Feed the refusal prefix on the row's own cache, hand its tokens out and sample the
        token after it; the row joins again unless it ended on the way."""
        refusal = row.refusal
        h = self.model.hidden(mx.array(refusal)[None], row.cache, positions=row.position)
        row.append(refusal, self.tables)
        for tok in refusal:
            if self._emit(row, tok, None, refusal=True):
                self._keep_conversation(row, row.cache)
                return
        self._sample([row], self.model.logits(h[:, -1]))
        self.joining.append(row)

    def _emit(self, row: _Row, token: int, logprobs, refusal: bool = False) -> bool:
        """Hand a token out; True when it ends the row (EOS or its token budget)."""
        row.generated += 1
        finish = "stop" if token in self.tables.eos else (
            "length" if row.generated >= row.max_tokens else None)
        self._pending.append(TokenStep(row.uid, token, logprobs,
                                       SafetySignal.of(row.monitor, row.events), refusal, finish))
        row.events = []
        return finish is not None

    # -- sampling and the forward --------------------------------------------------------------

    def _sample(self, rows: List[_Row], logits: mx.array):
        """Rows' next tokens from logits [B, V] (lazily): the ``[CLS]`` logit masked, each row's
        processors and sampler; greedy rows without processors share one argmax."""
        if self.tables.cls_mask is not None:
            logits = logits + self.tables.cls_mask
        if all(r.sampler in (None, greedy_sampler) and not r.processors for r in rows):
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            ys = mx.argmax(logprobs, axis=-1)
            for i, row in enumerate(rows):
                row.y, row.logprobs = ys[i : i + 1], logprobs[i]
            return
        for i, row in enumerate(rows):
            z = logits[i : i + 1]
            for proc in row.processors:
                z = proc(row.history, z)
            logprobs = z - mx.logsumexp(z, keepdims=True)
            sampler = row.sampler or greedy_sampler
            row.y, row.logprobs = sampler(logprobs).reshape(1), logprobs[0]
        for row in rows:
            if row.history is not None:
                row.history = mx.concatenate([row.history, row.y])

    def _launch(self, plans: List[Optional[tuple]]):
        """Feed every row its ``y`` (and a probe where ``plans`` has one) in one forward; returns
        (logits [B, V], p [B] (a scalar for a lone row) or None, plans), lazily evaluated in the
        background. A lone row's step builds exactly the graph of a single sequence: no stacking,
        no padding, 1-d positions (every op costs graph time at each token)."""
        model, rows, cache = self.model, self.rows, self.cache
        batched = isinstance(cache[0], BatchKVCache)
        width = cache[0].size() if batched else cache[0].offset
        ys = mx.concatenate([r.y for r in rows]) if batched else rows[0].y
        ns = [r.slot for r in rows]  # cached slots before each row's y: masks and padding
        ps_y = [r.position for r in rows]  # RoPE positions of the ys
        probing = any(p is not None for p in plans)

        def heads(h, i):  # p(malicious) of every row's probe [B]; a lone row's as a scalar
            return model.safety_prob(h[:, i]) if batched else model.safety_prob(h[0, i])

        if not probing or not self.fused_probe:
            mask = None
            if batched:  # left padding: row i's slots start at width - n_i
                pads = mx.array([width - n for n in ns])
                mask = (mx.arange(width + 1) >= pads[:, None])[:, None, None]
            h = model.hidden(ys[:, None], cache, mask=mask,
                             positions=mx.array(ps_y)[:, None] if batched else mx.array(ps_y),
                             compiled=True)
            logits = model.logits(h[:, -1])
            if not probing:
                mx.async_eval(ys, logits)
                return logits, None, plans
            if batched:
                mask = self._batch_mask(ns, width, plans, ys, fused=False)
            else:
                mask = self._probe_row(ns[0] + 1, width + 1, plans[0], ys[0], with_token=False)
            pos = [probe_position(model, p + 1) for p in ps_y]
            h = model.hidden(mx.full((len(rows), 1), model.cls_token_id), cache, mask=mask,
                             positions=mx.array(pos)[:, None] if batched else mx.array(pos))
            self._trim(1)
            ps = heads(h, -1)
        else:
            pos = [[p, probe_position(model, p + 1)] for p in ps_y]
            if batched:
                inputs = mx.stack([ys, mx.full(ys.shape, model.cls_token_id)], axis=1)
                mask = self._batch_mask(ns, width, plans, ys, fused=True)
            else:
                inputs = mx.concatenate([ys, self._cls])[None]
                mask = self._probe_row(ns[0], width, plans[0], ys[0], with_token=True)
            h = model.hidden(inputs, cache, mask=mask,
                             positions=mx.array(pos) if batched else mx.array(pos[0]),
                             compiled=True)
            self._trim(1)
            logits = model.logits(h[:, 0])
            ps = heads(h, 1)
        mx.async_eval(ys, logits, ps)
        return logits, ps, plans

    def _batch_mask(self, ns: List[int], width: int, plans, ys: mx.array,
                    fused: bool) -> mx.array:
        """The mask [B, 1, L, width + 2] of a batch step, built in one piece: rows are left-padded
        to ``width`` cached slots, row b's newest token ``ys[b]`` sits at padded slot ``width``
        and its probe at ``width + 1``; L = 2 fused (token row, probe row), else 1 (the probe,
        after the token's own step)."""
        B, K = len(ns), width + 2
        mask = np.zeros((B, 2 if fused else 1, K), dtype=bool)
        sees_y = np.zeros(B, dtype=bool)
        for b, (n, plan) in enumerate(zip(ns, plans)):
            pad = width - n
            if fused:
                mask[b, 0, pad : width + 1] = True  # the token: its row causally, not the probe
            if plan is not None:
                mask[b, -1, pad + np.asarray(plan[0], dtype=np.int64)] = True
                sees_y[b] = plan[1]
        mask[:, -1, K - 1] = True  # every probe sees itself
        # rule 4 inside the graph: a special newest token stays out of the window
        sees = mx.array(sees_y) & mx.logical_not(self.tables.special_table[ys])
        probe_row = mx.arange(mask.shape[1]) == mask.shape[1] - 1
        at_y = probe_row[:, None] & (mx.arange(K) == width)[None]
        return mx.where(at_y, sees[:, None, None], mx.array(mask))[:, None]

    def _probe_row(self, n: int, width: int, plan, y: mx.array, with_token: bool) -> mx.array:
        """Mask rows for a probe appended after a row's ``n`` slots (its newest token ``y`` at
        slot n - 1, or at slot n when fused with it), left-padded to ``width`` cached slots:
        [2, width + 2] fused (token row, probe row), else [1, width + 1]."""
        slots, sees_y = plan if plan is not None else ((), False)
        y_slot = n if with_token else n - 1
        if sees_y:  # rule 4 inside the graph: a special newest token stays out of the window
            sees_y = mx.logical_not(self.tables.special_table[y])
        if with_token:
            base = decode_probe_mask(n, slots)
            column = mx.stack([mx.array(True), mx.array(sees_y)])[:, None]
            rows = mx.where(mx.arange(n + 2) == y_slot, column, base)
        else:
            rows = mx.where(mx.arange(n + 1) == y_slot, mx.array(sees_y), window_row(n, slots))
            rows = rows[None]
        return rows if width == n else mx.pad(rows, [(0, 0), (width - n, 0)])

    # -- the cache of the batch ----------------------------------------------------------------

    def _trim(self, n: int):
        for c in self.cache:
            c.trim(n)

    def _join(self):
        """Move the joining rows into the batch (after the rows already in it)."""
        if not self.joining:
            return
        caches = [r.cache for r in self.joining]
        if self.cache is None and len(caches) == 1:
            self.cache = caches[0]  # a lone row keeps mlx-lm's single-sequence caches
        else:
            if self.cache is not None and not isinstance(self.cache[0], BatchKVCache):
                caches = [self.cache] + caches
                self.cache = None
            merged = [BatchKVCache.merge(list(layer)) for layer in zip(*caches)]
            if self.cache is None:
                self.cache = merged
            else:
                for c, m in zip(self.cache, merged):
                    c.extend(m)
        for r in self.joining:
            r.cache = None
        self.rows += self.joining
        self.joining = []

    def _leave(self, keep: List[int], extract: Sequence[int] = ()) -> List[list]:
        """Keep rows ``keep`` (indices) in the batch; returns the caches of rows ``extract``."""
        batched = self.cache is not None and isinstance(self.cache[0], BatchKVCache)
        out = [[c.extract(i) for c in self.cache] if batched else self.cache for i in extract]
        if len(keep) < len(self.rows):
            self.rows = [self.rows[i] for i in keep]
            if not keep:
                self.cache = None
            elif batched:
                for c in self.cache:
                    c.filter(keep)
        return out

    # -- one step -------------------------------------------------------------------------------

    def next(self) -> List[Step]:
        """Advance every row by one token; returns the steps produced (admission's refusal
        tokens included), in row order. Empty when no row is left."""
        if self._out is None:
            self._join()
            if self.rows:
                self._out = self._launch([r.plan() for r in self.rows])
        if self._out is not None:
            self._step()
        steps, self._pending = self._pending, []
        return steps

    def _step(self):
        logits, ps, plans = self._out
        tokens = (self.rows[0].y if len(self.rows) == 1 else
                  mx.concatenate([r.y for r in self.rows])).tolist()
        keep = []
        for i, (row, token) in enumerate(zip(self.rows, tokens)):
            if not self._emit(row, token, row.logprobs):
                row.append([token], self.tables, sampled=True)
                keep.append(i)
        t_of = {i: len(self.rows[i].response) - 1 for i in keep}
        if len(keep) < len(self.rows):  # finished rows leave before the next step is launched
            done = [i for i in range(len(self.rows)) if i not in keep]
            saving = [i for i in done if self.rows[i].conversation is not None]
            leaving = [self.rows[i] for i in saving]
            for row, cache, i in zip(leaving, self._leave(keep, saving), saving):
                self._keep_conversation(row, cache, final=tokens[i])
            if not keep:
                self._out = None
                return
            logits = logits[mx.array(keep)]
        self._sample(self.rows, logits)
        planned = [r.plan() for r in self.rows]
        self._join()  # new rows ride along from the next launch on
        planned += [r.plan() for r in self.rows[len(planned):]]
        out_next = self._launch(planned)
        relaunch, refusing = False, []
        if ps is not None:
            ps = ps.tolist() if ps.ndim else [ps.item()]
            for j, i in enumerate(keep):
                if plans[i] is None:
                    continue
                row = self.rows[j]
                decision = row.monitor.observe(t_of[i], ps[i])
                row.events += decision.events
                if decision.insert:
                    refusing.append((j, decision.rollback_to))
                elif row.plan() != planned[j]:
                    relaunch = True
        if refusing or relaunch:
            self._trim(1)  # the speculative step is not kept
            if refusing:
                self._refuse_rows(refusing)
            self._join()
            out_next = self._launch([r.plan() for r in self.rows]) if self.rows else None
        self._out = out_next

    def _keep_conversation(self, row: _Row, cache: list, final: Optional[int] = None):
        """A finished row hands its cache to its conversation (``PromptCache``). With the
        verdict's ``[CLS]`` out of the cache (``keep_verdict="flagged"``, a benign verdict) the
        response's keys are those of a plain prefill of prompt + response, so the next turn runs
        only what follows them; with it in, they attended to that ``[CLS]``, which a later turn's
        tokens must not see, so only the prompt is kept and the response runs again. ``final``:
        the last token handed out, whose keys the step in flight put in the cache."""
        if row.conversation is None:
            return
        ids = list(row.prompt.ids)
        if not row.kept:
            ids += row.response + ([final] if final is not None else [])
        row.conversation.hold(cache, ids)

    def _refuse_rows(self, refusing: List[tuple]):
        """Take the rows that must refuse out of the batch, roll them back if asked, and feed
        them the refusal on their own caches (they join again after it)."""
        idx = [j for j, _ in refusing]
        leaving = [self.rows[j] for j in idx]
        caches = self._leave([j for j in range(len(self.rows)) if j not in idx], idx)
        for row, cache, (_, keep) in zip(leaving, caches, refusing):
            row.cache = cache
            if row.history is not None:  # the speculative token is not kept
                row.history = row.history[:-1]
            if keep is not None and keep < len(row.response):
                drop = len(row.response) - keep
                for c in cache:
                    c.trim(drop)
                del row.response[keep:], row.special[keep:]
                if row.history is not None:
                    row.history = row.history[: row.history.size - drop]
                self._pending.append(RetractStep(row.uid, drop,
                                                 SafetySignal.of(row.monitor, row.events)))
                row.events = []
            self._refuse(row)
