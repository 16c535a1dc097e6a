"""What the engine hands out at each step, per row: typed values, never tuples.

``TokenStep`` (a token, or a token of the inserted refusal) and ``RetractStep`` (a rollback
withdrew tokens already handed out), each with a ``SafetySignal``: a snapshot of the row's safety
state when the step was made.
"""

from dataclasses import dataclass, field
from typing import List, Optional, Union

import mlx.core as mx

from .decoding import SafetyEvent, SafetyMonitor


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

    @classmethod
    def of(cls, monitor: SafetyMonitor, events: List[SafetyEvent]) -> "SafetySignal":
        """A snapshot of ``monitor`` with ``events``."""
        return cls(p=monitor.latest_p, query_p=monitor.query_p,
                   flagged=bool(monitor.query_malicious), inserted=monitor.inserted,
                   events=events)


@dataclass
class TokenStep:
    """A token handed out for row ``uid``. ``refusal`` marks tokens of the inserted prefix;
    ``safety`` is the row's safety state when the token was handed out, its events those since
    the row's previous step; ``finish_reason`` is ``"stop"`` (an EOS token, which is this token)
    or ``"length"`` on the row's last step. ``logprobs`` [V] is None for refusal tokens."""

    uid: int
    token: int
    logprobs: Optional[mx.array]
    safety: SafetySignal
    refusal: bool = False
    finish_reason: Optional[str] = None


@dataclass
class RetractStep:
    """Row ``uid`` withdrew its last ``count`` handed-out tokens (rollback before a refusal)."""

    uid: int
    count: int
    safety: SafetySignal


Step = Union[TokenStep, RetractStep]
