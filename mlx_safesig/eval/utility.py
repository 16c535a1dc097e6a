"""Utility kept: how well a safety model still answers benign requests, against its base model.

Two measures, both on benign rows (``text`` or ``messages``) from a source never trained on:

* ``answer_nll``: the mean per-token negative log-likelihood of a reference answer (``reference``)
  given the prompt. With ``cls_in_context`` the sequence is the one generation builds with safety
  on: prompt at positions 1.., the query verdict's ``[CLS]`` kept, the answer attending to it; without,
  the plain causal forward mlx-lm runs (safety off, or the base model without an adapter).
* ``loop_rate``: the share of answers in which some word 4-gram occurs 3 or more times.

Comparing the base model, the adapter without ``[CLS]`` and the adapter with it separates what the
LoRA changed from what the kept ``[CLS]`` in context changes.
"""

import re
from typing import Callable, Dict, List, Optional, Sequence

import mlx.core as mx
import numpy as np

from ..model import SafesigError
from ..prefill import prefill_prompt, probe
from ..prompt import prepare_prompt, wrap_tokenizer
from ..surprisal import token_surprisal
from .detection import row_messages


def _nll(logits: mx.array, targets: Sequence[int]) -> float:
    """Mean NLL of ``targets`` under ``logits`` [T, V] (row t predicts target t)."""
    return token_surprisal(logits, mx.array(targets)).mean().item()


def answer_nll(model, tokenizer, rows: Sequence[dict], cls_in_context: bool,
               progress: Optional[Callable[[int], None]] = None) -> List[float]:
    """Per row: mean NLL per token of ``row["reference"]`` as the response to the row's prompt."""
    tokenizer = wrap_tokenizer(tokenizer)
    out = []
    for row in rows:
        if not row.get("reference", "").strip():
            raise SafesigError(f"row {row.get('id')} has no reference answer.")
        prepared = prepare_prompt(tokenizer, row_messages(row))
        answer = tokenizer.encode(row["reference"], add_special_tokens=False)
        cache = model.make_cache()
        if cls_in_context:
            last = prefill_prompt(model, prepared.ids, cache)
            probe(model, cache, prepared.query_slots, position=0, keep=True)
            rest = model.hidden(mx.array(answer[:-1])[None], cache)[0] if len(answer) > 1 else None
            h = last[None] if rest is None else mx.concatenate([last[None], rest])
        else:
            seq = prepared.ids + answer[:-1]
            h = model.hidden(mx.array(seq)[None], cache, positions=0)[0, len(prepared.ids) - 1:]
        out.append(_nll(model.logits(h), answer))
        if progress:
            progress(1)
    return out


def loop_cut(text: str, n: int = 4, times: int = 3) -> Optional[int]:
    """Where ``text`` starts to loop: the character offset of the second occurrence of the first
    word ``n``-gram to occur ``times`` times (None: no loop). ``text[:cut]`` holds it once."""
    spans = [(m.start(), m.group()) for m in re.finditer(r"\S+", text)]
    seen: Dict[tuple, List[int]] = {}
    for i in range(len(spans) - n + 1):
        starts = seen.setdefault(tuple(w for _, w in spans[i:i + n]), [])
        starts.append(spans[i][0])
        if len(starts) == times:
            return starts[1]
    return None


def has_loop(text: str, n: int = 4, times: int = 3) -> bool:
    """Whether some word ``n``-gram occurs ``times`` or more times in ``text``."""
    return loop_cut(text, n, times) is not None


def loop_rate(texts: Sequence[str]) -> float:
    """Share of ``texts`` with a word 4-gram repeated 3+ times."""
    if not texts:
        raise SafesigError("no answers to measure the loop rate of.")
    return round(sum(has_loop(t) for t in texts) / len(texts), 4)


def summarize(nll: Sequence[float]) -> Dict[str, float]:
    """Mean and median NLL per token over rows."""
    a = np.asarray(nll, dtype=np.float64)
    return {"n": int(a.size), "mean_nll": round(float(a.mean()), 4),
            "median_nll": round(float(np.median(a)), 4)}


UTILITY_FILE = "utility.json"


def _answers(model, tokenizer, rows, safety, max_tokens, progress) -> List[str]:
    from ..generate import generate

    out = []
    for row in rows:
        out.append(generate(model, tokenizer, row_messages(row), max_tokens, safety=safety))
        if progress:
            progress(1)
    return out


def _loops(answers: Sequence[str], rows: Sequence[dict]) -> Dict:
    """Loop rate over all ``answers`` and per source of their ``rows``."""
    sources: Dict[str, List[str]] = {}
    for answer, row in zip(answers, rows):
        sources.setdefault(row["source"], []).append(answer)
    return {"all": loop_rate(answers), "sources": {s: loop_rate(a) for s, a in sorted(sources.items())}}


def reference_rows(rows: Sequence[dict]) -> List[dict]:
    """The rows with a reference answer (``reference``, else ``response``), as ``reference``."""
    with_ref = [r for r in rows if (r.get("reference") or r.get("response") or "").strip()]
    return [dict(r, reference=r.get("reference") or r["response"]) for r in with_ref]


def run_utility(model, tokenizer, base, base_tokenizer, rows: Sequence[dict], safety,
                max_tokens: int = 100, progress: Optional[Callable[[int], None]] = None,
                references: Optional[Sequence[dict]] = None) -> Dict:
    """Safety on (``safety``, a resolved ``SafetyConfig``) against ``base`` (the model without
    the adapter, plain mlx-lm) on benign rows: the NLL of the reference answers of
    ``references`` (default: the ``rows`` that have one; the answer sees the kept ``[CLS]`` as
    generation would: always, or with ``keep_verdict="flagged"`` only when the verdict is flagged)
    and the loop rate of greedy answers of ``max_tokens`` to ``rows``, over all and per source.
    Counts and rates only, never text."""
    from ..decoding import SafetyConfig
    from ..generate import score

    with_ref = reference_rows(rows if references is None else references)
    report: Dict = {"n": len(rows), "max_tokens": max_tokens, "keep_verdict": safety.keep_verdict}
    if with_ref:
        flagged = [score(model, tokenizer, row_messages(r)) >= safety.threshold for r in with_ref]
        on = [answer_nll(model, tokenizer, [r], safety.keep_verdict == "always" or f)[0]
              for r, f in zip(with_ref, flagged)]
        off = answer_nll(base, base_tokenizer, with_ref, cls_in_context=False)
        if progress:
            progress(2 * len(with_ref))
        report["reference_nll"] = {
            "safety": summarize(on), "base": summarize(off),
            "mean_difference": round(float(np.mean(np.subtract(on, off))), 4),
            "flagged": int(sum(flagged)),
            "sources": sorted({r["source"] for r in with_ref})}
    answers_on = _answers(model, tokenizer, rows, safety, max_tokens, progress)
    answers_base = _answers(base, base_tokenizer, rows, SafetyConfig(enabled=False), max_tokens,
                            progress)
    report["loop_rate"] = {"safety": _loops(answers_on, rows), "base": _loops(answers_base, rows)}
    return report
