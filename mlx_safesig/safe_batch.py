"""Batched strategic decoding for evaluation: greedy safety-on generations, many at a time.

``safe_batch`` runs the jobs ``evaluate.respond`` runs one by one with safety on and greedy
sampling as rows of one batch, and gives each job ``respond``'s outcome: the same tokens, text,
finish reason, query verdict, insertion point and probes (SPEC §3-4, ``safe_generate_step``).

Layout (slots and positions as in ``generate``'s module docstring)::

    row i of the batch cache:  pad_i empty slots | prompt | [CLS] verdict | response so far
    every decode step:         [token, [CLS]] per row in one forward, then the probe slot is trimmed

* Whatever the sequential path feeds as a block is fed as a block, on the row's own KV cache and
  with the same calls: the prompt, the kept ``[CLS]`` query verdict (position 0), an attacker
  prefill, and the refusal prefix (a row that must refuse leaves the batch, is fed the prefix and
  joins again). Single-row caches join mlx-lm's left-padded ``BatchKVCache``: every row ends at the
  batch's last slot, so row i's slot s sits at ``pad_i + s``. A finished row leaves the batch and
  the next job (by prompt length) joins, as in mlx-lm's ``BatchGenerator``.
* A decode step feeds every row its last emitted token and a ``[CLS]`` probe under
  ``decode_probe_mask`` (left-padded per row): the token sees its row's slots causally, never the
  probe; the probe sees the window its row's own ``SafetyMonitor`` chose (rules 1-4) and itself,
  or only itself when the schedule skips the row. Per-row positions: the token at its slot, the
  probe at the model's ``probe_position``. The probes' keys/values are trimmed after the step.
* The loop is synchronous: the probe plan for response index t is made once the verdict of index
  t - 1 is known, the result the sequential path's speculative planning reproduces.

Numerics: the arithmetic is the sequential path's, but a batched matrix product may round
differently from a one-row one (float32: ~1e-6 on p(malicious) for a 30-layer model, bit-equal on
the tiny test models), so a near tie between two logits, or a probability that close to a
threshold, could in principle decide differently.
"""

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, trim_prompt_cache

from .attention import decode_probe_mask
from .decoding import SafetyConfig, SafetyEvent, SafetyMonitor
from .generate import (
    _cls_logits_mask,
    _probe_position,
    prefill_prompt,
    probe,
    streamed_text,
)
from .model import Model, SafesigError
from .prompt import PreparedPrompt, prompt_with_prefill, special_ids, wrap_tokenizer

if TYPE_CHECKING:
    from .evaluate import Job


def safe_batchable(job: "Job", safety: SafetyConfig) -> bool:
    """Whether ``safe_batch`` gives ``job`` the sequential path's outcome: safety on, greedy
    (temperature 0) and no rollback. Sampled jobs stay sequential: their draws come from a per-job
    seed."""
    greedy = float((job.sampling or {}).get("temp", 0.0)) == 0.0
    return job.mode == "on" and greedy and safety.enabled and not safety.rollback


@dataclass
class _Tables:
    """What every row shares: the token sets of the sequential path and the ``[CLS]`` logit mask."""

    refusal: List[int]
    special: set
    eos: set
    cls_mask: Optional[mx.array]


@dataclass
class _Row:
    """One generation. ``token`` is the last emitted token: the next one to feed."""

    job: "Job"
    monitor: SafetyMonitor
    query_slots: List[int]
    base: int  # slot of response index 0 (the [CLS] verdict sits at base - 1)
    special: List[bool] = field(default_factory=list)  # per response token fed: rule 4
    emitted: List[int] = field(default_factory=list)  # the tokens the sequential path yields
    probes: List[list] = field(default_factory=list)
    inserted_at: Optional[int] = None

    @property
    def token(self) -> int:
        return self.emitted[-1]

    @property
    def slot(self) -> int:
        """The slot (and RoPE position) of the next token fed."""
        return self.base + len(self.special)

    def record(self, events: Sequence[SafetyEvent]):
        """Keep the probes and the insertion point, as ``evaluate.respond`` does."""
        for e in events:
            if e.kind == "probe":
                self.probes.append([e.step, round(float(e.p), 5)])
            elif e.kind == "refusal-inserted":
                self.inserted_at = e.step

    def plan(self, tables: _Tables) -> Optional[List[int]]:
        """The cache slots the probe riding on ``token`` sees (its own slot included when the
        window holds it and it is not special), or None when the schedule skips it."""
        t = len(self.special)
        if not self.monitor.wants_probe(t):
            return None
        special = self.special + [self.token in tables.special]
        include_query, window = self.monitor.window(t, special)
        return (self.query_slots if include_query else []) + [self.base + i for i in window]

    def emit(self, token: int, max_tokens: int, tables: _Tables) -> bool:
        """Hand out a token; True when it ends the generation (EOS, or ``max_tokens``)."""
        self.emitted.append(token)
        return token in tables.eos or len(self.emitted) >= max_tokens

    def outcome(self, tokenizer, tables: _Tables) -> dict:
        """``evaluate.respond``'s dict for this generation."""
        finish = "stop" if self.token in tables.eos else "length"
        ids = self.emitted[:-1] if finish == "stop" else self.emitted
        return {
            "response": streamed_text(tokenizer, ids, finish), "tokens": len(self.emitted),
            "finish": finish, "query_p": self.monitor.query_p,
            "inserted": self.inserted_at is not None, "inserted_at": self.inserted_at,
            "probes": self.probes,
        }


def _greedy(logits: mx.array, tables: _Tables) -> mx.array:
    """Rows of logits [B, V] -> the tokens the sequential greedy sampler picks [B]."""
    if tables.cls_mask is not None:
        logits = logits + tables.cls_mask
    return mx.argmax(logits - mx.logsumexp(logits, axis=-1, keepdims=True), axis=-1)


def _feed(model: Model, row: _Row, cache: list, ids: Sequence[int], tables: _Tables) -> mx.array:
    """Feed response tokens through one row's own cache in one forward, as the sequential path
    feeds a prefill or the refusal; returns the logits [1, V] after the last."""
    h = model.hidden(mx.array(ids)[None], cache)
    row.special.extend(t in tables.special for t in ids)
    return model.logits(h[:, -1])


def _refuse(model: Model, row: _Row, cache: list, tables: _Tables, max_tokens: int) -> bool:
    """Insert the refusal prefix into a row on its own cache, emit it and the token after it;
    True when the generation ended on the way."""
    logits = _feed(model, row, cache, tables.refusal, tables)
    if any(row.emit(t, max_tokens, tables) for t in tables.refusal):
        return True
    return row.emit(_greedy(logits, tables).item(), max_tokens, tables)


def _admit(model: Model, job: "Job", prepared: PreparedPrompt, prefill_ids: List[int],
           config: SafetyConfig, tables: _Tables, max_tokens: int) -> Tuple[_Row, list, bool]:
    """Prefill one job on its own as ``safe_generate_step`` does (prompt, kept query verdict,
    attacker prefill, the refusal if the verdict is malicious) and emit its first token. Returns
    the row, its KV cache and whether the generation already ended."""
    cache = model.make_cache()
    logits = model.logits(prefill_prompt(model, prepared.ids, cache)[None])
    row = _Row(job, SafetyMonitor(config, n_prefill=len(prefill_ids)),
               prepared.query_slots, base=len(prepared.ids) + 1)
    decision = row.monitor.start(probe(model, cache, row.query_slots, position=0, keep=True).item())
    row.record(decision.events)
    if prefill_ids:
        logits = _feed(model, row, cache, prefill_ids, tables)
    if decision.insert:
        return row, cache, _refuse(model, row, cache, tables, max_tokens)
    return row, cache, row.emit(_greedy(logits, tables).item(), max_tokens, tables)


def _step(model: Model, rows: List[_Row], plans: List[Optional[List[int]]], cache: list,
          tables: _Tables) -> Tuple[List[int], List[float]]:
    """Feed every row's ``[token, [CLS]]`` in one forward, the probe of row i seeing the slots
    ``plans[i]`` (None: only itself), and trim the probes. Returns the greedy next tokens and the
    probes' p(malicious), one per row."""
    width = cache[0].size()  # every row ends here; row i starts at width - its slot count
    masks, positions = [], []
    for row, slots in zip(rows, plans):
        n = row.slot
        masks.append(mx.pad(decode_probe_mask(n, slots or []), [(0, 0), (width - n, 0)]))
        positions.append([n, _probe_position(model, n + 1)])
    inputs = mx.array([[row.token, model.cls_token_id] for row in rows])
    h = model.hidden(inputs, cache, mask=mx.stack(masks)[:, None], positions=mx.array(positions),
                     compiled=True)
    trim_prompt_cache(cache, 1)
    # the head row by row: its matrix-vector product rounds like the sequential path's, a [B, D]
    # product does not
    ps = mx.stack([model.safety_prob(h[i, 1]) for i in range(len(rows))])
    tokens = _greedy(model.logits(h[:, 0]), tables)
    return tokens.tolist(), ps.tolist()


def _join(cache: Optional[list], row_caches: List[list]) -> list:
    """Merge single-row KV caches into the batch cache (left-padded, right-aligned)."""
    merged = [BatchKVCache.merge(list(layer)) for layer in zip(*row_caches)]
    if cache is None:
        return merged
    for c, m in zip(cache, merged):
        c.extend(m)
    return cache


def safe_batch(model: Model, tokenizer, jobs: Sequence["Job"], safety: SafetyConfig,
               max_tokens: int, batch_size: int) -> Iterator[Tuple["Job", dict]]:
    """Generate ``jobs`` (``safe_batchable`` ones; their ``messages`` and ``prefill`` are used)
    with safety on and greedy sampling, up to ``batch_size`` at a time, and yield ``(job,
    outcome)`` as each finishes. ``outcome`` is what ``evaluate.respond(model, tokenizer, job,
    safety, max_tokens, seed)`` returns, or ``{"error": ...}`` where that raises ``SafesigError``
    (e.g. a prompt longer than the model's context). ``safety`` may be unresolved (the model's
    values fill it in, as ``stream_generate`` does)."""
    tokenizer = wrap_tokenizer(tokenizer)
    config = safety.resolved(model.args.safesig)
    if not config.enabled or config.rollback:
        raise ValueError("safe_batch runs safety-on generations without rollback only.")
    tables = _Tables(
        refusal=tokenizer.encode(config.refusal_prefix, add_special_tokens=False),
        special=special_ids(tokenizer), eos=set(tokenizer.eos_token_ids),
        cls_mask=_cls_logits_mask(model, model.args.vocab_size),
    )
    queued = []
    for job in jobs:
        try:
            prepared, prefill_ids = prompt_with_prefill(model, tokenizer, job.messages,
                                                        job.prefill or None)
        except SafesigError as e:
            yield job, {"error": str(e)}
            continue
        queued.append((job, prepared, prefill_ids))
    queue = deque(sorted(queued, key=lambda q: len(q[1].ids) + len(q[2])))  # less padding
    rows: List[_Row] = []
    joining: List[Tuple[_Row, list]] = []  # rows fed on their own cache, to join the batch
    cache = None
    while queue or rows or joining:
        while queue and len(rows) + len(joining) < batch_size:
            row, row_cache, done = _admit(model, *queue.popleft(), config, tables, max_tokens)
            if done:
                yield row.job, row.outcome(tokenizer, tables)
            else:
                joining.append((row, row_cache))
        if joining:
            cache = _join(cache, [c for _, c in joining])
            rows += [r for r, _ in joining]
            joining = []
        if not rows:
            continue
        plans = [row.plan(tables) for row in rows]
        sampled, ps = _step(model, rows, plans, cache, tables)
        keep = []
        for i, row in enumerate(rows):
            t = len(row.special)
            row.special.append(row.token in tables.special)
            if plans[i] is not None:
                decision = row.monitor.observe(t, ps[i])
                row.record(decision.events)
                if decision.insert:  # the refusal goes in as one block on the row's own cache
                    row_cache = [c.extract(i) for c in cache]
                    if _refuse(model, row, row_cache, tables, max_tokens):
                        yield row.job, row.outcome(tokenizer, tables)
                    else:
                        joining.append((row, row_cache))
                    continue
            if row.emit(sampled[i], max_tokens, tables):
                yield row.job, row.outcome(tokenizer, tables)
            else:
                keep.append(i)
        if len(keep) < len(rows):
            rows = [rows[i] for i in keep]
            if rows:
                for c in cache:
                    c.filter(keep)
            else:
                cache = None
