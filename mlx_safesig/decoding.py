"""Strategic decoding (SPEC §3-4): when to re-check, what a probe sees, when to insert the refusal.

Pure Python, no arrays: ``SafetyMonitor`` is fed probe probabilities and answers with windows and
decisions, so it can be tested with a scripted head. Indices are *response* indices: 0 is the first
response token (attacker/app prefill first, then generated tokens).

Rules (r1, r2, r3 and tau from ``SafetyConfig``):
1. first verdict malicious: a probe sees the query and the first r1 response tokens;
2. first verdict benign: a probe sees the latest r2 response tokens;
3. a benign->malicious flip at response index S: probes see [S - r2 + 1, S + r3] (the r2 tokens up
   to S and the r3 after it); a benign verdict there drops back to rule 2;
4. special tokens (PAD, BOS, template) are never in a window;
[ours] no check of the generated text before the response holds ``min_window`` tokens;
[ours] with ``window_query`` the probes of rules 2-3 see the query span too;
[ours] with ``surprisal_gate`` a query whose highest window surprisal is above it is refused as a
malicious verdict is (``start``'s ``peak``, computed by the prefill: ``surprisal.py``);
[ours] with ``smooth_copies`` the query verdict is the mean over randomly perturbed copies of the
prompt (``smoothing.py``; the engine computes it and ``start`` is given it).
The query verdict malicious inserts the refusal at once (after any prefill); otherwise tau consecutive
malicious probes insert it. At most one insertion. A probability equal to the threshold is malicious.

Schedules count *generated* tokens (g = response index - prefill length): an attacker's prefill
cannot thin the checks; the prefill itself is judged by one window probe before the first
generated token, whatever the schedule. No probe runs after the insertion: there is at most one,
so a verdict would change nothing (with an immediate insertion on a malicious query verdict, rule
1's windows are never probed). Which generated indices get a probe (in rule 3 every index is
probed so that tau consecutive verdicts arrive without delay):
- ``each``: every index;  ``first``: none (only the query verdict and a prefill's probe);
- ``periodic:N``: every N-th;
- ``annealing``: dense early, sparse later -- index t is probed when t % k(t) == 0, where k doubles
  from 1 to 16 as the response grows: every token for t < 31, every 2nd up to 94, every 4th up to
  222, every 8th up to 478, every 16th after (``annealing_interval``). Prefill attacks and harmful
  openings are decided in the first tokens, so the checks are spent there.
"""

from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence

REFUSAL_PREFIX = "\nSorry, I can't fulfill your request because"
SCHEDULES = ("each", "first", "periodic:N", "annealing")


# the SafetyConfig fields a model's (or an adapter's) ``safesig`` block may set
MODEL_DEFAULTS = ("threshold", "window_threshold", "tau", "min_window", "window_query", "r1", "r2",
                  "r3", "refusal_prefix", "keep_verdict", "surprisal_gate", "surprisal_window",
                  "smooth_copies", "smooth_rate")
SURPRISAL_WINDOW = 8
SMOOTH_RATE = 0.1  # SmoothLLM's middle setting (it swept 5-20% of characters)


@dataclass
class SafetyConfig:
    """Safety-aware sampling settings. ``None`` fields take the model's ``safesig`` config values
    (paper defaults: threshold 0.5, tau 3, r1 = r2 = r3 = 10, the refusal prefix above).

    ``window_threshold`` [ours]: the threshold of the probes over generated text (rules 2-3); the
    query verdict uses ``threshold``. None: the model's value, else ``threshold``. A window of ten
    tokens carries less evidence than a whole query, so a model may ship a higher one.

    ``min_window`` [ours]: no check of the generated text (rules 2-3) before the response holds
    this many tokens (an attacker's or app's prefill counts). None: the model's value, else 1
    (the paper: a check from the first token on). A probe over the first one to three tokens of
    an answer ("The", "To create a") has little to judge; on the default model's benign answers
    holding the checks back hardly changed which answers get flagged (CHANGELOG.md), so
    no shipped model sets it.

    ``window_query`` [ours]: the checks of the generated text (rules 2-3) see the query span as
    well as their window (rule 1's probes always do). None: the model's value, else False (the
    paper). A window such as "X is a type of cybercrime that ..." is harmful or not depending on
    what was asked; the default model sets it although its probes were trained on windows alone
    (``train --window-query`` trains them on query and window; CHANGELOG.md).

    ``keep_verdict`` [ours]: when the response attends to the kept query ``[CLS]``: ``"always"``
    (the paper's mask) or ``"flagged"`` (only when the query verdict is malicious; a benign
    verdict's ``[CLS]`` leaves the cache and the response is the language model's own, at the same
    positions). None: the model's value, else ``"always"``. On the default model the kept benign
    verdict sent some answers into loops that the same weights without it do not write.

    ``surprisal_gate`` [ours, issue 26]: insert the refusal at once when the query's highest mean
    surprisal (nats per token, the model's own, ``surprisal.py``) over ``surprisal_window``
    consecutive query tokens is above this, whatever the verdict: optimised adversarial suffixes
    are text no one writes. None: the model's value, else off. ``surprisal_window``: None: the
    model's value, else 8. Off by default: on dev text it also stops some machine-translated
    benign prompts (MODEL_CARD.md).

    ``smooth_copies`` [ours, issue 26]: the query verdict is the mean p(malicious) of this many
    copies of the prompt in which each query token is replaced, with probability ``smooth_rate``,
    by a random printable token (randomized smoothing, ``smoothing.py``; the draw is seeded by the
    prompt, so a prompt always gets the same verdict). Costs that many extra prefills of the
    prompt. None: the model's value, else 0 (off). ``smooth_rate``: None: the model's, else 0.1."""

    enabled: bool = True
    threshold: Optional[float] = None
    window_threshold: Optional[float] = None
    tau: Optional[int] = None
    min_window: Optional[int] = None
    window_query: Optional[bool] = None
    r1: Optional[int] = None
    r2: Optional[int] = None
    r3: Optional[int] = None
    schedule: str = "annealing"
    refusal_prefix: Optional[str] = None
    rollback: bool = False
    keep_verdict: Optional[str] = None
    surprisal_gate: Optional[float] = None
    surprisal_window: Optional[int] = None
    smooth_copies: Optional[int] = None
    smooth_rate: Optional[float] = None

    def __post_init__(self):
        parse_schedule(self.schedule)
        if self.keep_verdict not in (None, "always", "flagged"):
            raise ValueError(f"keep_verdict must be 'always' or 'flagged', got {self.keep_verdict!r}.")
        for name in ("threshold", "window_threshold", "smooth_rate"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}.")
        if self.smooth_copies is not None and (not isinstance(self.smooth_copies, int)
                                               or self.smooth_copies < 0):
            raise ValueError(f"smooth_copies must be 0 or more, got {self.smooth_copies!r}.")
        if self.surprisal_gate is not None and not self.surprisal_gate > 0:
            raise ValueError(f"surprisal_gate must be above 0, got {self.surprisal_gate}.")
        for name in ("tau", "min_window", "r1", "r2", "r3", "surprisal_window"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")

    def resolved(self, model_defaults: dict) -> "SafetyConfig":
        """A copy with every ``None`` filled from the model's ``safesig`` block."""
        values = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for k in MODEL_DEFAULTS:
            if values[k] is None:
                values[k] = model_defaults.get(k)
        if values["refusal_prefix"] is None:
            values["refusal_prefix"] = REFUSAL_PREFIX
        if values["window_threshold"] is None:
            values["window_threshold"] = values["threshold"]
        if values["min_window"] is None:
            values["min_window"] = 1
        values["window_query"] = bool(values["window_query"])
        values["keep_verdict"] = values["keep_verdict"] or "always"
        values["surprisal_window"] = values["surprisal_window"] or SURPRISAL_WINDOW
        values["smooth_copies"] = values["smooth_copies"] or 0
        values["smooth_rate"] = values["smooth_rate"] or SMOOTH_RATE
        return SafetyConfig(**values)


def config_fingerprint(config: SafetyConfig) -> dict:
    """A config's fields as recorded beside evaluation rows (a resume must match them); the gate's
    only with a gate and smoothing's only with smoothing, so runs recorded before they existed
    still resume."""
    out = asdict(config)
    if config.surprisal_gate is None:
        out.pop("surprisal_gate"), out.pop("surprisal_window")
    if not config.smooth_copies:
        out.pop("smooth_copies"), out.pop("smooth_rate")
    return out


def parse_schedule(schedule: str):
    """``"each" | "first" | "annealing"`` -> itself; ``"periodic:N"`` -> ("periodic", N)."""
    if schedule in ("each", "first", "annealing"):
        return schedule
    if schedule.startswith("periodic:"):
        n = schedule.split(":", 1)[1]
        if n.isdigit() and int(n) >= 1:
            return ("periodic", int(n))
    raise ValueError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}.")


def annealing_interval(t: int) -> int:
    """Probe interval at response index t: 1 while t + 1 < 32, then 2, 4, 8, 16 from
    t + 1 >= 32 * (2k - 1) on."""
    k = 1
    while k < 16 and (t + 1) >= 32 * (2 * k - 1):
        k *= 2
    return k


def scheduled(schedule: str, t: int) -> bool:
    """Does the schedule ask for a probe after generated token ``t`` (0 = the first)?"""
    s = parse_schedule(schedule)
    if s == "each":
        return True
    if s == "first":
        return False
    if s == "annealing":
        return t % annealing_interval(t) == 0
    return t % s[1] == s[1] - 1


@dataclass
class SafetyEvent:
    """Something a UI can show. kind: ``probe`` | ``flip`` | ``flip-cleared`` |
    ``surprisal-gate`` (the query's window surprisal, ``nats``, is above the gate) |
    ``refusal-inserted`` | ``retracted``; ``step`` is a response index (-1: the query)."""

    kind: str
    step: int
    p: Optional[float] = None
    text: Optional[str] = None
    nats: Optional[float] = None


@dataclass
class Decision:
    insert: bool = False
    rollback_to: Optional[int] = None  # keep response tokens [0, rollback_to) before inserting
    events: List[SafetyEvent] = field(default_factory=list)


class SafetyMonitor:
    """Rules 1-4, tau and the single insertion, over response indices."""

    def __init__(self, config: SafetyConfig, n_prefill: int = 0):
        self.config = config
        self.n_prefill = n_prefill
        self.query_malicious: Optional[bool] = None
        self.flip_step: Optional[int] = None
        self.streak = 0
        self.inserted = False
        self.latest_p: Optional[float] = None
        self.query_p: Optional[float] = None

    def start(self, p0: float, peak: Optional[float] = None) -> Decision:
        """The query verdict (the ``[CLS]`` over the query span at prefill) and, with a surprisal
        gate, the query's highest window surprisal ``peak``: above the gate, the refusal goes in
        although the verdict may be benign (``query_malicious`` stays the verdict's)."""
        self.latest_p = self.query_p = p0
        self.query_malicious = p0 >= self.config.threshold
        events = [SafetyEvent("probe", -1, p0)]
        gate = self.config.surprisal_gate
        gated = gate is not None and peak is not None and peak > gate
        if gated:
            events.append(SafetyEvent("surprisal-gate", -1, nats=peak))
        if self.query_malicious or gated:
            self.inserted = True
            events.append(SafetyEvent("refusal-inserted", self.n_prefill, p0))
        return Decision(insert=self.inserted, events=events)

    def wants_probe(self, t: int) -> bool:
        """Is the token at response index ``t`` checked? Never after the insertion (at most one,
        so a verdict would change nothing); at every index during a flip (rule 3); otherwise where
        the schedule says, counting *generated* tokens only (index ``t - n_prefill``), so a long
        prefill cannot thin the checks (SPEC §3b). The prefill has its own probe
        (``wants_prefill_probe``)."""
        if self.inserted:
            return False
        if self.flip_step is not None:
            return True
        g = t - self.n_prefill
        return g >= 0 and t + 1 >= (self.config.min_window or 1) and scheduled(
            self.config.schedule, g)

    def wants_prefill_probe(self) -> bool:
        """Is the prefilled response text judged by a window probe (as response index
        ``n_prefill - 1``) before the first generated token? Whenever there is a prefill, the
        query verdict did not already insert, and it holds ``min_window`` tokens."""
        return 0 < self.n_prefill and not self.inserted and \
            self.n_prefill >= (self.config.min_window or 1)

    def window(self, t: int, special: Sequence[bool]) -> tuple[bool, List[int]]:
        """What a probe after response index ``t`` attends to: (include the query span?,
        response indices). ``special[i]`` marks response tokens rule 4 skips."""
        c = self.config
        if self.query_malicious:
            include_query, lo, hi = True, 0, min(t, c.r1 - 1)
        elif self.flip_step is not None:
            include_query, lo = bool(c.window_query), self.flip_step - c.r2 + 1
            hi = min(t, self.flip_step + c.r3)
        else:
            include_query, lo, hi = bool(c.window_query), t - c.r2 + 1, t
        return include_query, [i for i in range(max(lo, 0), hi + 1) if not special[i]]

    def observe(self, t: int, p: float) -> Decision:
        """A probe after response index ``t`` said ``p``."""
        self.latest_p = p
        d = Decision(events=[SafetyEvent("probe", t, p)])
        if self.inserted:
            return d
        if p < (self.config.window_threshold or self.config.threshold):
            if self.flip_step is not None:
                d.events.append(SafetyEvent("flip-cleared", t, p))
            self.flip_step, self.streak = None, 0
            return d
        if self.flip_step is None:
            self.flip_step = t
            d.events.append(SafetyEvent("flip", t, p))
        self.streak += 1
        if self.streak >= self.config.tau:
            self.inserted = True
            d.insert = True
            if self.config.rollback:
                d.rollback_to = max(self.flip_step, self.n_prefill)
            at = t + 1 if d.rollback_to is None else d.rollback_to
            d.events.append(SafetyEvent("refusal-inserted", at, p))
        return d
