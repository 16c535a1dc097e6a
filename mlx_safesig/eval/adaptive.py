"""White-box discrete suffix attacks on the ``[CLS]`` safety signal (``eval --suite adaptive``).

The attacker appends ``suffix_len`` tokens to the content of the last user message and searches
for tokens that make the query verdict say benign. Two objectives:

- ``verdict``: log p(malicious) of the query verdict, exactly as ``score`` computes it (the prompt
  built by ``prepare_prompt``; the ``[CLS]`` at generation's position sees the query slots and itself);
- ``windows``: that plus the log p(malicious) of every window probe generation would run over the
  first ``n_response`` tokens of the response, with the config's schedule, ``min_window``, r2 and
  ``window_query`` (windows from ``decoding.SafetyMonitor`` itself, assuming every probe stays
  benign, which is what the attacker wants). The response is the model's own greedy continuation
  of the suffixed prompt under the cache layout a benign verdict leaves (``keep_verdict``:
  "flagged" drops the ``[CLS]``, i.e. the safety-off continuation; "always" keeps it), recomputed
  every ``refresh`` steps and held fixed in between (the target of the window terms).

Two published attacks search the suffix:

- ``gcg`` (Zou et al. 2023, "Universal and transferable adversarial attacks on aligned language
  models"): the gradient of the loss w.r.t. the one-hot suffix gives the ``top_k`` most promising
  tokens per position; ``batch`` random single-token swaps from those are evaluated exactly and
  the best becomes the suffix (as in the paper, even when it is worse than the current one);
- ``random`` (Andriushchenko et al. 2024, "Jailbreaking leading safety-aligned LLMs with simple
  adaptive attacks"): ``batch`` random single-token swaps from all allowed tokens, the best kept
  only if it lowers the loss. Same evaluations per step as GCG, so the two compare the value of
  the gradient at a fixed budget.

Under ``surprisal_gate`` (the decoding gate, ``SafetyConfig.surprisal_gate``: ``surprisal.py``)
the attacker keeps the highest mean surprisal over ``surprisal_window`` consecutive query tokens at
or below the gate: candidates are ranked by how far they exceed it first and by the loss second,
swaps draw from the ``fluent_k`` tokens the language model finds most probable at that position
(ordered by the gradient for ``gcg``), and a success is checked only within the gate (the check, a
real generation with the config's gate on, would refuse the others).

Under ``smooth_copies`` (``SafetyConfig``; ``smoothing.py``) the attacker computes the smoothed
verdict each candidate gets, exactly (the copies are seeded by the prompt), and GCG's gradient
over the current suffix's copies (``adaptive_smooth.py``; the ``verdict`` objective only).

Tokens a suffix may hold: not special, not ``[CLS]``, printable ASCII, not whitespace only; and a
candidate suffix is kept only if rendering the chat with its text and tokenizing again gives back
exactly the attacked ids (the usual GCG filter), so every suffix found is text a user can paste.
"""

import math
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..attention import cls_row
from ..decoding import SafetyConfig, SafetyMonitor
from ..model import Model, SafesigError
from ..prefill import cls_logits_mask, prefill_with_verdict, probe_position
from ..prompt import PreparedPrompt, prepare_prompt, special_ids, wrap_tokenizer
from ..smoothing import printable_tokens
from ..surprisal import token_surprisal, window_peaks
from .adaptive_smooth import forward_after_cut, smoothed_gradient, smoothed_losses

ATTACKS = ("gcg", "random")
OBJECTIVES = ("verdict", "windows")
INIT_TEXT = " !"  # the suffix starts as this text repeated (GCG's "! ! ! ...")


@dataclass
class AttackSettings:
    attack: str = "gcg"
    objective: str = "verdict"
    suffix_len: int = 12
    top_k: int = 64
    batch: int = 32
    steps: int = 100  # the largest step budget
    time_budget: Optional[float] = None  # seconds per request (or per universal run)
    n_response: int = 16  # response tokens whose window probes the loss sums (and the check runs)
    refresh: int = 5  # recompute the greedy response every this many steps (windows objective)
    surprisal_gate: Optional[float] = None  # keep the query's window surprisal at or below this
    surprisal_window: int = 8
    fluent_k: int = 512  # with a gate: swaps draw from the LM's most probable tokens at a position
    loss_floor: Optional[float] = 0.05  # a head's p below this earns nothing more (None: no floor)

    def __post_init__(self):
        if self.attack not in ATTACKS:
            raise SafesigError(f"unknown attack {self.attack!r}; use {', '.join(ATTACKS)}.")
        if self.objective not in OBJECTIVES:
            raise SafesigError(f"unknown objective {self.objective!r}; use {', '.join(OBJECTIVES)}.")
        for name in ("suffix_len", "top_k", "batch", "steps", "n_response", "refresh",
                     "surprisal_window", "fluent_k"):
            if getattr(self, name) < 1:
                raise SafesigError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.loss_floor is not None and not 0 < self.loss_floor < 1:
            raise SafesigError(f"loss_floor must be in (0, 1), got {self.loss_floor}.")


def _decoder(tokenizer):
    raw = getattr(tokenizer, "_tokenizer", tokenizer)
    return lambda ids: raw.decode(list(ids), clean_up_tokenization_spaces=False)


def allowed_tokens(model: Model, tokenizer) -> np.ndarray:
    """Ids a suffix may use: printable ASCII, not whitespace only, not special, not ``[CLS]``
    (``smoothing.printable_tokens``, the pool smoothing draws from too)."""
    return printable_tokens(model, tokenizer)


class SuffixPrompt:
    """One request's chat messages with a token suffix on the last user message's content: where
    the suffix sits in the prompt ids, and which suffixes survive the text round trip."""

    def __init__(self, tokenizer, messages: Sequence[dict], init: Sequence[int]):
        self.tokenizer = wrap_tokenizer(tokenizer)
        self.decode = _decoder(self.tokenizer)
        self.messages = [dict(m) for m in messages]
        users = [i for i, m in enumerate(self.messages) if m.get("role") == "user"]
        if not users:
            raise SafesigError("the chat messages contain no user message to attack.")
        self.at = users[-1]
        init = list(init)
        prepared = prepare_prompt(self.tokenizer, self.with_suffix(init))
        ids, L = prepared.ids, len(init)
        slots = set(prepared.query_slots)
        starts = [k for k in range(len(ids) - L + 1)
                  if ids[k : k + L] == init and all(i in slots for i in range(k, k + L))]
        if not starts:
            raise SafesigError("the initial suffix does not tokenize on its own after the request.")
        self.start, self.length = starts[-1], L
        if self.start == 0:
            raise SafesigError("the chat template puts no token before the request to attack.")
        self.prefix, self.postfix = ids[: self.start], ids[self.start + L :]
        self.slots = list(prepared.query_slots)

    def with_suffix(self, suffix: Sequence[int]) -> List[dict]:
        """The messages with the suffix's text appended to the last user message."""
        out = [dict(m) for m in self.messages]
        out[self.at]["content"] = (out[self.at].get("content") or "") + self.decode(suffix)
        return out

    def ids(self, suffix: Sequence[int]) -> List[int]:
        return self.prefix + list(suffix) + self.postfix

    def fits(self, suffix: Sequence[int]) -> bool:
        """Does the suffix's text render and tokenize back to exactly these ids and slots?"""
        try:
            p = prepare_prompt(self.tokenizer, self.with_suffix(suffix))
        except SafesigError:
            return False
        return p.ids == self.ids(suffix) and p.query_slots == self.slots


def initial_suffix(tokenizer, allowed: np.ndarray, length: int) -> List[int]:
    """``length`` ids of ``INIT_TEXT`` repeated (a token of it that is not allowed: the first
    allowed id)."""
    tokenizer = wrap_tokenizer(tokenizer)
    ids = tokenizer.encode(INIT_TEXT * length, add_special_tokens=False)
    ok = set(allowed.tolist())
    ids = [t if t in ok else int(allowed[0]) for t in ids] or [int(allowed[0])]
    return (ids * length)[:length]


@dataclass
class Layout:
    """One forward of a suffixed prompt and its probes: the prompt, the query verdict's ``[CLS]``,
    the fixed response and one ``[CLS]`` per window probe, with the masks and positions generation
    uses (engine.py's cache layout: prompt at 1..n, verdict at 0, response at n+1..)."""

    tokens: np.ndarray  # [T] (the suffix slots hold the current suffix)
    mask: mx.array  # [T, T] bool
    positions: mx.array  # [T]
    heads: List[int]  # rows whose [CLS] head enters the loss: the verdict first
    start: int  # slot of the first suffix token
    cut: int  # the slots before this are the same for every candidate (the suffix's start, or the
    # first query slot under smoothing, whose copies change query tokens before the suffix)
    prefix: Optional[list] = None  # keys/values of the slots before ``cut`` (``prefix_state``)
    n_prompt: int = 0  # prompt tokens (slots 0 .. n_prompt - 1)
    prefix_surprisal: Optional[np.ndarray] = None  # [start] surprisal of the tokens before the suffix
    next_logits: Optional[mx.array] = None  # [V] the logits that predict the first suffix token


def layout(model: Model, target: SuffixPrompt, suffix: Sequence[int],
           response: Sequence[int] = (), windows: Sequence[tuple] = (),
           kept: bool = False, surprisal: bool = False, cut: Optional[int] = None) -> Layout:
    """``windows``: (response index t, include the query?, response indices seen) per probe;
    ``surprisal``: also keep what ``batch_losses`` needs to score the query's surprisal; ``cut``:
    where the shared prefix ends (default: the suffix's start)."""
    ids = target.ids(suffix)
    n, m = len(ids), len(response)
    T = n + 1 + m + len(windows)
    mask = np.zeros((T, T), dtype=bool)
    mask[:n, :n] = np.tril(np.ones((n, n), dtype=bool))
    q = [int(i) for i in target.slots]
    cls_row(mask[n], n, q)
    positions = list(range(1, n + 1)) + [probe_position(model, n)] + list(range(n + 1, n + 1 + m))
    for i in range(m):
        mask[n + 1 + i, :n] = True
        mask[n + 1 + i, n] = kept
        mask[n + 1 + i, n + 1 : n + 2 + i] = True
    heads = [n]
    for j, (t, include_query, seen) in enumerate(windows):
        row = n + 1 + m + j
        cls_row(mask[row], row, [n + 1 + i for i in seen] + (q if include_query else []))
        positions.append(probe_position(model, n + 1 + t + 1))
        heads.append(row)
    tokens = np.array(ids + [model.cls_token_id] + list(response)
                      + [model.cls_token_id] * len(windows), dtype=np.int64)
    cut = target.start if cut is None else cut
    if surprisal and cut != target.start:
        raise SafesigError("the surprisal terms need the prefix to end at the suffix.")
    lay = Layout(tokens, mx.array(mask), mx.array(positions), heads, target.start, cut, n_prompt=n)
    lay.prefix = prefix_state(model, lay, surprisal)
    return lay


def log_p_malicious(model: Model, h_cls: mx.array) -> mx.array:
    """log p(malicious) of final-norm ``[CLS]`` states [..., D] (log-sigmoid of the logit; of the
    logit difference for a 2-logit head): what the attacker minimises."""
    z = model.cls_head(h_cls.astype(model.cls_head.weight.dtype))
    z = z[..., 0] if z.shape[-1] == 1 else z[..., 1] - z[..., 0]
    return -nn.softplus(-z)


def prefix_state(model: Model, lay: Layout, surprisal: bool = False) -> list:
    """Keys and values of the slots before ``lay.cut`` (the same for every candidate): computed
    once per layout, so a candidate's forward runs only the suffix (from the cut) and what
    follows it. With ``surprisal``, also the layout's surprisal of those slots and the logits
    predicting the first suffix token."""
    cache = model.make_cache()
    s = lay.cut
    h = model.hidden(mx.array(lay.tokens[None, :s]), cache, mask=lay.mask[:s, :s],
                     positions=lay.positions[:s])[0]
    states = [(c.keys[..., : c.offset, :], c.values[..., : c.offset, :]) for c in cache]
    if not surprisal:
        mx.eval(states)
        return states
    logits = model.logits(h)
    nats = token_surprisal(logits[:-1], mx.array(lay.tokens[1:s]))
    mx.eval(states, logits, nats)
    lay.prefix_surprisal = np.concatenate([[0.0], np.array(nats, dtype=np.float64)])
    lay.next_logits = logits[-1]
    return states


def head_loss(logp: mx.array, floor: Optional[float]) -> mx.array:
    """The attacker's loss over heads (last axis): the sum of their log p(malicious), each held at
    ``log(floor)`` at least. Without a floor, one head pushed ever lower (log p has no bound) can
    outweigh another that never gives way: the search then drives the window probes to p ~ 1e-40
    while the verdict stays flagged."""
    if floor:
        logp = mx.maximum(logp, math.log(floor))
    return logp.sum(axis=-1)


def batch_losses(model: Model, lay: Layout, suffixes: np.ndarray,
                 slots: Optional[Sequence[int]] = None, window: int = 8,
                 floor: Optional[float] = None) -> tuple:
    """Each suffix [B, L] put in ``lay``: (loss [B] = ``head_loss`` of the heads, the verdict's
    p(malicious) [B], and with query ``slots`` the highest mean surprisal over ``window``
    consecutive query tokens [B] (else None)), all numpy."""
    B, L = suffixes.shape
    tokens = np.repeat(lay.tokens[None], B, axis=0)
    tokens[:, lay.start : lay.start + L] = suffixes
    h = forward_after_cut(model, lay, tokens)
    heads = [i - lay.cut for i in lay.heads]
    logp = log_p_malicious(model, h[:, heads])  # [B, heads]
    loss, p = head_loss(logp, floor), model.safety_prob(h[:, heads[0]])
    out = [loss, p]
    if slots is not None:
        s, n = lay.start, lay.n_prompt
        first = token_surprisal(mx.repeat(lay.next_logits[None], B, axis=0),
                                mx.array(tokens[:, s]))[:, None]
        rest = token_surprisal(model.logits(h[:, : n - 1 - s]), mx.array(tokens[:, s + 1 : n]))
        out.append(mx.concatenate([first, rest], axis=1))
    mx.eval(out)
    peaks = None
    if slots is not None:
        full = np.concatenate([np.repeat(lay.prefix_surprisal[None], B, axis=0),
                               np.array(out[2], dtype=np.float64)], axis=1)  # [B, n]
        peaks = window_peaks(full[:, [i for i in slots if i >= 1]], window)
    return np.array(loss, dtype=np.float64), np.array(p, dtype=np.float64), peaks


def suffix_logits(model: Model, lay: Layout, suffix: Sequence[int]) -> mx.array:
    """[L, V]: the logits that predict each token of ``suffix`` in ``lay`` (the language model's
    view of which tokens are fluent at each suffix position)."""
    tokens = lay.tokens[None].copy()
    tokens[0, lay.start : lay.start + len(suffix)] = suffix
    off = lay.start - lay.cut
    h = forward_after_cut(model, lay, tokens)[0, off : off + len(suffix) - 1]
    return mx.concatenate([lay.next_logits[None], model.logits(h)], axis=0)


def suffix_gradient(model: Model, lay: Layout, length: int,
                    floor: Optional[float] = None) -> mx.array:
    """d loss / d one-hot suffix [L, V]: the gradient w.r.t. the suffix embeddings times the
    embedding matrix (what ``one_hot @ E`` would give, without building it)."""
    tokens = lay.tokens[None]
    base = model.embed(mx.array(tokens[:, lay.cut :]))
    heads, off = [i - lay.cut for i in lay.heads], lay.start - lay.cut

    def loss_fn(e):
        h = mx.concatenate([base[:, :off], e[None], base[:, off + length :]], axis=1)
        h = forward_after_cut(model, lay, tokens, embeddings=h)
        return head_loss(log_p_malicious(model, h[0, heads]), floor)

    g = mx.grad(loss_fn)(base[0, off : off + length])
    return model.model.embed_tokens.as_linear(g.astype(base.dtype))


def greedy_response(model: Model, prepared: PreparedPrompt, n: int, kept: bool,
                    eos: set) -> List[int]:
    """The model's greedy continuation (at most ``n`` tokens, EOS excluded) of a prompt whose
    query verdict is benign, on the cache layout generation leaves: the verdict's ``[CLS]`` kept
    (``keep_verdict="always"``) or dropped ("flagged": the language model's own continuation)."""
    from mlx_lm.models.cache import trim_prompt_cache

    cache = model.make_cache()
    h, _ = prefill_with_verdict(model, prepared.ids, cache, prepared.query_slots)
    if not kept:
        trim_prompt_cache(cache, 1)
    cls_mask = None
    out: List[int] = []
    position = len(prepared.ids) + 1
    while len(out) < n:
        logits = model.logits(h)
        if cls_mask is None:
            cls_mask = cls_logits_mask(model, logits.shape[-1])
        if cls_mask is not None:
            logits = logits + cls_mask
        token = int(mx.argmax(logits).item())
        if token in eos:
            break
        out.append(token)
        h = model.hidden(mx.array([[token]]), cache, positions=position)[0, -1]
        position += 1
    return out


def probe_windows(config: SafetyConfig, response: Sequence[int], special: set) -> List[tuple]:
    """The window probes generation runs over ``response`` while every verdict stays benign:
    (response index, include the query?, response indices seen), from ``SafetyMonitor``."""
    monitor = SafetyMonitor(config)
    monitor.start(0.0)
    flags = [t in special for t in response]
    out = []
    for t in range(len(response)):
        if monitor.wants_probe(t):
            include_query, seen = monitor.window(t, flags[: t + 1])
            out.append((t, include_query, seen))
    return out


@dataclass
class Target:
    """A request under attack and the forward its loss runs (rebuilt when the response changes)."""

    prompt: SuffixPrompt
    response: List[int] = field(default_factory=list)
    lay: Optional[Layout] = None


@dataclass
class AttackResult:
    suffix: List[int]
    loss: float
    ps: List[float]  # the verdict p(malicious) of each target with ``suffix``
    steps_run: int
    steps_to_success: Optional[int]
    seconds: float
    seconds_to_success: Optional[float]
    inserted: Optional[bool]  # did the last success check's generation insert a refusal?
    trace: List[float] = field(default_factory=list)  # the loss after each step (step 0 = init)
    peak: Optional[float] = None  # with a surprisal gate: the suffix's highest window surprisal


class Attack:
    """One suffix against one or more requests (the loss sums over them: a universal suffix)."""

    def __init__(self, model: Model, tokenizer, config: SafetyConfig, settings: AttackSettings,
                 messages: Sequence[Sequence[dict]], allowed: np.ndarray, seed: int):
        self.model, self.tokenizer = model, wrap_tokenizer(tokenizer)
        self.config, self.s = config, settings
        self.allowed = allowed
        self.rng = np.random.default_rng(seed)
        init = initial_suffix(self.tokenizer, allowed, settings.suffix_len)
        self.targets = [Target(SuffixPrompt(self.tokenizer, m, init)) for m in messages]
        self.suffix = init
        self.special = special_ids(self.tokenizer)
        self.eos = set(self.tokenizer.eos_token_ids) | {self.tokenizer.eos_token_id}
        self.allowed_mask = np.full(model.model.embed_tokens.weight.shape[0], np.inf)
        self.allowed_mask[allowed] = 0.0
        self.smooth = config.smooth_copies or 0  # the attacker computes the smoothed verdict
        if self.smooth and (settings.objective != "verdict" or settings.surprisal_gate is not None):
            raise SafesigError("an attack on a smoothed verdict (smooth_copies) supports the "
                               "verdict objective without a surprisal gate only.")

    def _relayout(self, refresh: bool):
        kept = self.config.keep_verdict == "always"
        for t in self.targets:
            if self.s.objective == "windows" and refresh:
                prepared = PreparedPrompt(t.prompt.ids(self.suffix), t.prompt.slots)
                t.response = greedy_response(self.model, prepared, self.s.n_response, kept, self.eos)
            windows = (probe_windows(self.config, t.response, self.special)
                       if self.s.objective == "windows" else [])
            t.lay = layout(self.model, t.prompt, self.suffix, t.response, windows, kept,
                           surprisal=self.s.surprisal_gate is not None,
                           cut=min(t.prompt.slots) if self.smooth else None)

    def evaluate(self, suffixes: np.ndarray) -> tuple:
        """Loss [B] summed over the targets, the verdict p [B, targets] and how far the highest
        window surprisal exceeds the gate over the targets [B] (zeros without a gate)."""
        losses, ps, top = np.zeros(len(suffixes)), [], np.zeros(len(suffixes))
        gate = self.s.surprisal_gate
        for t in self.targets:
            if self.smooth:
                loss, p, peaks = smoothed_losses(self.model, t.lay, suffixes, t.prompt.slots,
                                                 self.allowed, *self._smoothing())
            else:
                loss, p, peaks = batch_losses(self.model, t.lay, suffixes,
                                              None if gate is None else t.prompt.slots,
                                              self.s.surprisal_window, self.s.loss_floor)
            losses += loss
            ps.append(p)
            if gate is not None:
                top = np.maximum(top, peaks)
        self.peaks = top  # the highest window surprisal over the targets [B]
        excess = np.maximum(top - gate, 0.0) if gate is not None else top * 0.0
        return losses, np.stack(ps, axis=1), excess

    def _smoothing(self) -> tuple:
        return self.smooth, self.config.smooth_rate, self.s.loss_floor

    def fluent(self) -> np.ndarray:
        """[L, V] bool: the ``fluent_k`` tokens the language model finds most probable at each
        suffix position given the current suffix (first target), among the allowed ones."""
        t = self.targets[0]
        logits = np.array(suffix_logits(self.model, t.lay, self.suffix).astype(mx.float32))
        logits = logits - self.allowed_mask[None]
        top = np.argsort(-logits, axis=1)[:, : self.s.fluent_k]
        out = np.zeros(logits.shape, dtype=bool)
        np.put_along_axis(out, top, True, axis=1)
        return out & np.isfinite(logits)

    def candidates(self) -> np.ndarray:
        L, B = self.s.suffix_len, self.s.batch
        current = np.array(self.suffix, dtype=np.int64)
        positions = self.rng.integers(0, L, size=B)
        fluent = self.fluent() if self.s.surprisal_gate is not None else None
        if self.s.attack == "gcg":
            grad = sum(smoothed_gradient(self.model, t.lay, L, t.prompt.slots, self.allowed,
                                         *self._smoothing()) if self.smooth
                       else suffix_gradient(self.model, t.lay, L, self.s.loss_floor)
                       for t in self.targets)
            grad = np.array(grad.astype(mx.float32)) + self.allowed_mask[None]
            if fluent is not None:
                grad[~fluent] = np.inf
            grad[np.arange(L), current] = np.inf  # a swap must change the token
            k = self.s.top_k if fluent is None else max(1, min(self.s.top_k, self.s.fluent_k - 1))
            top = np.argsort(grad, axis=1)[:, :k]  # most negative first (never a non-fluent one)
            tokens = top[positions, self.rng.integers(0, top.shape[1], size=B)]
        elif fluent is not None:
            fluent[np.arange(L), current] = False
            tokens = np.array([self.rng.choice(np.flatnonzero(fluent[i])) if fluent[i].any()
                               else current[i] for i in positions])  # none left: no swap
        else:
            tokens = self.allowed[self.rng.integers(0, len(self.allowed), size=B)]
        out = np.repeat(current[None], B, axis=0)
        out[np.arange(B), positions] = tokens
        return out

    def _fitting(self, cands: np.ndarray) -> np.ndarray:
        seen, keep = {tuple(self.suffix)}, []
        for c in cands:
            key = tuple(int(x) for x in c)
            if key in seen:
                continue
            seen.add(key)
            if all(t.prompt.fits(key) for t in self.targets):
                keep.append(c)
        return np.array(keep, dtype=np.int64).reshape(-1, self.s.suffix_len)

    def run(self, check: Optional[Callable[[List[int]], bool]] = None,
            progress: Optional[Callable[[int], None]] = None) -> AttackResult:
        """Search for at most ``settings.steps`` steps (and ``time_budget`` seconds). ``check``
        (single-target attacks): called with the suffix whenever the verdict says benign; True
        ends the search as a success (the step count is recorded)."""
        tic = time.perf_counter()
        threshold = self.config.threshold
        self._relayout(refresh=True)
        loss, ps, excess = self.evaluate(np.array([self.suffix]))
        loss, ps, excess = float(loss[0]), ps[0], float(excess[0])
        best = (excess, loss, list(self.suffix), ps)
        trace, step, inserted, checked = [loss], 0, None, None

        def try_success():
            nonlocal inserted, checked
            if check is None or tuple(self.suffix) == checked or not (ps < threshold).all() \
                    or excess > 0:
                return False
            checked = tuple(self.suffix)
            ok = check(list(self.suffix))
            inserted = not ok
            return ok

        done = try_success()
        while not done and step < self.s.steps:
            if self.s.time_budget is not None and time.perf_counter() - tic > self.s.time_budget:
                break
            step += 1
            if self.s.objective == "windows" and step > 1 and (step - 1) % self.s.refresh == 0:
                self._relayout(refresh=True)  # a new target response: re-score the current suffix
                loss_now, ps, excess_now = self.evaluate(np.array([self.suffix]))
                loss, ps, excess = float(loss_now[0]), ps[0], float(excess_now[0])
            cands = self._fitting(self.candidates())
            if len(cands):
                losses, cps, excesses = self.evaluate(cands)
                i = int(np.lexsort((losses, excesses))[0])  # within the gate first, then the loss
                if self.s.attack == "gcg" or (excesses[i], losses[i]) < (excess, loss):
                    self.suffix, loss, ps = [int(x) for x in cands[i]], float(losses[i]), cps[i]
                    excess = float(excesses[i])
                    for t in self.targets:
                        t.lay.tokens[t.lay.start : t.lay.start + self.s.suffix_len] = self.suffix
            trace.append(loss)
            if (excess, loss) < best[:2]:
                best = (excess, loss, list(self.suffix), ps)
            if progress:
                progress(1)
            done = try_success()
        seconds = time.perf_counter() - tic
        if done:
            best = (excess, loss, list(self.suffix), ps)
        peak = None
        if self.s.surprisal_gate is not None:
            self.evaluate(np.array([best[2]]))
            peak = round(float(self.peaks[0]), 5)
        return AttackResult(
            suffix=best[2], loss=best[1], ps=[float(p) for p in best[3]], steps_run=step,
            steps_to_success=step if done else None, seconds=round(seconds, 3),
            seconds_to_success=round(seconds, 3) if done else None, inserted=inserted,
            trace=[round(x, 5) for x in trace], peak=peak)


def inserts_refusal(model: Model, tokenizer, messages: Sequence[dict], config: SafetyConfig,
                    n_response: int) -> tuple:
    """A real greedy generation with safety on (``stream_generate``) that runs the checks of the
    first ``n_response`` response tokens (``n_response + 1`` tokens: a token's check rides on
    the step that feeds it, so the last token of a generation is never checked): (was a refusal
    inserted?, the query verdict it started from)."""
    from ..generate import stream_generate

    inserted, query_p = False, None
    for r in stream_generate(model, tokenizer, list(messages), n_response + 1, safety=config):
        query_p = r.safety.query_p if query_p is None else query_p
        inserted = inserted or r.safety.inserted or r.refusal
    return inserted, query_p
