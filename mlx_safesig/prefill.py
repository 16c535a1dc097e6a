"""What runs on one sequence's own KV cache: the prompt prefill, ``[CLS]`` probes, and the
conversation cache an app keeps across turns (``make_prompt_cache``).

Shared by ``score``, the engine (``engine.py``) and the benchmark.
"""

from typing import List, Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache, KVCache, trim_prompt_cache

from .attention import prompt_verdict_mask, window_row
from .model import Model, SafesigError
from .surprisal import query_peak, slot_surprisal

PREFILL_STEP = 2048


def prefill_prompt(model: Model, ids: Sequence[int], cache, start_position: int = 1) -> mx.array:
    """Run the prompt tokens ``ids`` causally after what ``cache`` holds, at positions
    ``start_position ..``, in chunks; returns the final-norm hidden state [D] of the last one."""
    done = 0
    tokens = mx.array(ids)
    while True:
        chunk = tokens[done : done + PREFILL_STEP]
        h = model.hidden(chunk[None], cache, positions=start_position + done)
        done += chunk.size
        if done >= len(ids):
            return h[0, -1]
        mx.eval([c.state for c in cache])


def prefill_with_verdict(model: Model, ids: Sequence[int], cache, slots: Sequence[int],
                         start_position: int = 1, nats: Optional[dict] = None):
    """``prefill_prompt`` with the query verdict riding on the last chunk: the ``[CLS]`` row goes
    in after the prompt's last token in the same forward (it sees ``slots`` and itself; the prompt
    rows are causal and never see it), so admitting a prompt costs one forward, not two. Its
    keys/values stay in the cache (the kept verdict). Returns (the last prompt token's hidden
    state [D], p(malicious) of the verdict). ``nats``: a dict to fill with the surprisal of the
    query ``slots`` this call runs (slot -> nats, ``surprisal.slot_surprisal``; the first token
    after what the cache held is left out: its predictor is not run here)."""
    done, offset, before = 0, cache[0].offset, None
    while len(ids) - done > PREFILL_STEP:
        chunk = list(ids[done : done + PREFILL_STEP])
        h = model.hidden(mx.array(chunk)[None], cache, positions=start_position + done)[0]
        if nats is not None:
            nats.update(slot_surprisal(model, h, chunk, offset + done, slots, before))
            before = h[-1]
        mx.eval([c.state for c in cache] + ([before] if before is not None else []))
        done += PREFILL_STEP
    tail = list(ids[done:])
    n, L = offset + done, len(tail)  # slots before the chunk; its prompt tokens
    mask = prompt_verdict_mask(n, L, slots)
    positions = list(range(start_position + done, start_position + done + L)) + [
        probe_position(model, n + L)]
    h = model.hidden(mx.array(tail + [model.cls_token_id])[None], cache, mask=mx.array(mask),
                     positions=mx.array(positions))
    if nats is not None:
        nats.update(slot_surprisal(model, h[0, :L], tail, n, slots, before))
    return h[0, L - 1], model.safety_prob(h[0, L])


def prefill_query(model: Model, ids: Sequence[int], slots: Sequence[int],
                  prompt_cache: Optional["PromptCache"] = None,
                  window: Optional[int] = None) -> tuple:
    """Admit a prompt: ``prefill_with_verdict`` on a fresh cache, or on a conversation's cache
    reusing the prefix it shares with ``ids`` (``PromptCache``). With a surprisal ``window``
    (a gate is on) also the query's highest mean surprisal over that many query tokens. Returns
    (cache, the last prompt token's hidden state [D], p(malicious) of the verdict, peak or None)."""
    nats = None if window is None else {}
    if prompt_cache is not None:
        cache = prompt_cache.layers
        start = prompt_cache.reuse(ids, safety=True, need=slots if window is not None else ())
        if nats is not None:
            nats.update(prompt_cache.nats)
    else:
        cache, start = model.make_cache(), 0
    h, p = prefill_with_verdict(model, ids[start:], cache, slots, start_position=start + 1,
                                nats=nats)
    if prompt_cache is not None:
        prompt_cache.ids = list(ids)
        if nats is not None:
            prompt_cache.nats = dict(nats)
    return cache, h, p, None if nats is None else query_peak(nats, slots, window)


def prefill_batch_with_verdict(model: Model, prompts: Sequence[Sequence[int]],
                               slot_sets: Sequence[Sequence[int]],
                               nats: Optional[Sequence[dict]] = None) -> List[tuple]:
    """``prefill_with_verdict`` for several prompts (each at most ``PREFILL_STEP`` tokens) in one
    forward, left-padded in mlx-lm's ``BatchKVCache`` (a padded slot is seen by no real token),
    each ``[CLS]`` after its own prompt. Returns per prompt (its own caches, unpadded, the last
    prompt token's hidden state [D], p(malicious) of its verdict). ``nats``: one dict per prompt
    to fill with its query slots' surprisal."""
    B, L = len(prompts), max(len(ids) for ids in prompts)
    pads = [L - len(ids) for ids in prompts]
    tokens = np.zeros((B, L + 1), dtype=np.int64)
    tokens[:, L] = model.cls_token_id
    mask = np.zeros((B, 1, L + 1, L + 1), dtype=bool)
    positions = np.zeros((B, L + 1), dtype=np.int64)
    for b, (ids, slots, pad) in enumerate(zip(prompts, slot_sets, pads)):
        tokens[b, pad:L] = ids
        mask[b, 0] = prompt_verdict_mask(0, len(ids), slots, pad)
        positions[b, pad:L] = np.arange(1, len(ids) + 1)
        positions[b, L] = probe_position(model, len(ids))
    cache = [BatchKVCache(pads) for _ in model.layers]
    h = model.hidden(mx.array(tokens), cache, mask=mx.array(mask), positions=mx.array(positions))
    ps = model.safety_prob(h[:, L])
    for b, out in enumerate(nats or []):
        out.update(slot_surprisal(model, h[b, pads[b] : L], prompts[b], 0, slot_sets[b]))
    return [([c.extract(b) for c in cache], h[b, L - 1], ps[b]) for b in range(B)]


def forward_on_prefix(model: Model, states: Sequence[tuple], tokens: mx.array, mask: mx.array,
                      positions: mx.array, embeddings: Optional[mx.array] = None) -> mx.array:
    """Final-norm states [B, T, D] of ``tokens`` [B, T] run after one sequence's keys and values
    (``states``: (keys, values) per layer), copied for each row: many continuations of one
    prefix in one forward (the adaptive attacks' candidates)."""
    B, cache = tokens.shape[0], []
    for k, v in states:
        c = KVCache()
        c.update_and_fetch(mx.repeat(k, B, axis=0), mx.repeat(v, B, axis=0))
        cache.append(c)
    return model.hidden(tokens, cache, mask=mask, positions=positions, input_embeddings=embeddings)


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


def probe_position(model: Model, slot: int) -> int:
    """RoPE position of a probe appended at ``slot`` (the model's ``probe_position``)."""
    return slot if model.args.safesig["probe_position"] == "current" else 0


def cls_logits_mask(model: Model, vocab: int) -> Optional[mx.array]:
    """[vocab] additive mask that keeps ``[CLS]`` from being sampled when the LM head has a row
    for its id (tied embeddings, padded vocabularies); None when it has none."""
    if model.cls_token_id < vocab:  # [CLS] is input only: never sample it
        return mx.where(mx.arange(vocab) == model.cls_token_id, -mx.inf, 0.0)
    return None


def token_table(vocab: int, ids: set) -> mx.array:
    """[vocab] bool: True at ``ids`` (for lookups inside a lazy graph)."""
    table = np.zeros(vocab, dtype=bool)
    table[[i for i in ids if i < vocab]] = True
    return mx.array(table)


class PromptCache:
    """A conversation's KV cache, kept across turns: pass the *whole* conversation each turn
    (``stream_generate(model, tokenizer, messages, prompt_cache=cache)``) and only the tokens
    after the longest prefix it shares with what the cache holds are run.

    What is kept is what a prefill of the whole conversation would compute, never a ``[CLS]``:
    the previous turn's prompt, and its response when the response's keys never attended to a
    ``[CLS]`` (safety off, or ``keep_verdict="flagged"`` with a benign verdict). A response
    generated with the verdict's ``[CLS]`` in context is run again as part of the new prompt
    (that ``[CLS]`` must stay invisible to later turns; re-running the reply is the price of
    exactness). The reply comes back rendered by the chat template; the shared prefix ends where
    its tokens differ from the ones generated. So a conversation continued on its cache gives
    the tokens and probabilities of a prefill of the whole conversation. Safety on and off lay
    the prompt out at different positions, so a switch between them starts the cache over."""

    def __init__(self, model: Model):
        self.layers = model.make_cache()
        self.ids: List[int] = []  # the prompt whose keys/values lead the cache
        self.safety: Optional[bool] = None
        self.nats: dict = {}  # surprisal of query slots among ``ids`` (slot -> nats), if known

    @property
    def offset(self) -> int:
        return self.layers[0].offset

    def reuse(self, ids: Sequence[int], safety: bool, need: Sequence[int] = ()) -> int:
        """Trim the cache to the longest prefix it shares with ``ids`` (one token at least is left
        to run, for the logits) and return that prefix's length. ``need``: slots whose surprisal
        the caller needs (a surprisal gate): the prefix ends before the first one the cache
        does not know, so that the prefill computes it (a slot's predictor is the slot before)."""
        n = 0
        if self.safety == safety:
            for a, b in zip(self.ids, ids):
                if a != b:
                    break
                n += 1
        known = {s: v for s, v in self.nats.items() if s < n}  # same token, same context
        n = min(n, len(ids) - 1)
        unknown = [s for s in need if s <= n and s not in known]
        if unknown:
            n = max(min(unknown) - 1, 0)
        trim_prompt_cache(self.layers, self.offset - n)
        self.nats = {s: v for s, v in known.items() if s <= n}
        self.ids, self.safety = [], safety  # set again once the new prompt is in
        return n

    def hold(self, layers: list, ids: Sequence[int]):
        """Keep ``layers`` (this conversation's caches after a turn; the same list, or a row's
        caches taken out of a batch), trimmed to the ``ids`` whose keys lead them."""
        if layers is not self.layers:
            self.layers[:] = layers
        trim_prompt_cache(self.layers, self.offset - len(ids))
        self.ids = list(ids)
        self.nats = {s: v for s, v in self.nats.items() if s < len(ids)}


def make_prompt_cache(model: Model, max_kv_size: Optional[int] = None) -> PromptCache:
    """A conversation cache for ``stream_generate(..., prompt_cache=cache)`` (mlx-lm's function
    of the same name, for this model). ``max_kv_size`` (a rotating cache) cannot be honoured:
    the safety windows address fixed cache slots."""
    if max_kv_size is not None:
        raise SafesigError("max_kv_size cannot be honoured with safety on: the safety checks "
                           "address fixed cache slots, which a rotating cache overwrites.")
    return PromptCache(model)
