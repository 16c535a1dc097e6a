"""Batched strategic decoding for evaluation: ``eval.harness.respond``'s outcome for many jobs at once.

``safe_batch`` runs safety-on jobs as rows of the one engine (``engine.SafeBatchGenerator``), up to
``batch_size`` at a time, the next job (by prompt length) joining when one finishes, and gives each
job the dict ``respond`` builds from ``stream_generate``: the same tokens, text (retractions
applied), finish reason, query verdict, insertion point and probes (a lone row and a row of a batch
run the same steps, and their steps become text through the same ``StepText``).

Numerics: a batched matrix product may round differently from a one-row one (float32: ~1e-6 on
p(malicious) for a 30-layer model, bit-equal on the tiny test models), so a near tie between two
logits, or a probability that close to a threshold, could in principle decide differently.
"""

from typing import TYPE_CHECKING, Dict, Iterable, Iterator, List, Sequence, Tuple

from .decoding import SafetyConfig
from .engine import SafeBatchGenerator
from .generate import GenerationResult, StepText, without_retracted
from .model import Model, SafesigError
from .prompt import prompt_with_prefill, wrap_tokenizer
from .steps import Step

if TYPE_CHECKING:
    from .evaluate import Job


def safe_batchable(job: "Job", safety: SafetyConfig) -> bool:
    """Whether ``safe_batch`` gives ``job`` the sequential path's outcome: safety on and greedy
    (temperature 0). Sampled jobs stay sequential: their draws come from a per-job seed of the
    global random state."""
    greedy = float((job.sampling or {}).get("temp", 0.0)) == 0.0
    return job.mode == "on" and greedy and safety.enabled


def outcome(results: Iterable[GenerationResult]) -> dict:
    """What evaluation records of one response streamed as ``results``: the text (retracted text
    removed), its token count and finish reason, the query verdict, whether and where the refusal
    was inserted, and the probes ``[response index, p]``."""
    text, probes, inserted_at, last = "", [], None, None
    for r in results:
        for e in r.safety.events:
            if e.kind == "probe":
                probes.append([e.step, round(float(e.p), 5)])
            elif e.kind == "refusal-inserted":
                inserted_at = e.step
        text = without_retracted(text, r.safety.events) + r.text
        last = r
    return {
        "response": text, "tokens": last.generation_tokens if last else 0,
        "finish": last.finish_reason if last else None,
        "query_p": last.safety.query_p if last else None,
        "inserted": inserted_at is not None, "inserted_at": inserted_at, "probes": probes,
    }


def step_outcome(tokenizer, steps: List[Step]) -> dict:
    """``outcome`` of one row's engine steps, as ``stream_generate`` would stream them."""
    to_result = StepText(tokenizer, 0, 0.0)
    return outcome(to_result(step) for step in steps)


def safe_batch(model: Model, tokenizer, jobs: Sequence["Job"], safety: SafetyConfig,
               max_tokens: int, batch_size: int) -> Iterator[Tuple["Job", dict]]:
    """Generate ``jobs`` (``safe_batchable`` ones; their ``messages`` and ``prefill`` are used)
    with safety on (rollback too) and greedy sampling, up to ``batch_size`` at a time, and yield ``(job,
    outcome)`` as each finishes. ``outcome`` is what ``eval.harness.respond(model, tokenizer, job,
    safety, max_tokens, seed)`` returns, or ``{"error": ...}`` where that raises ``SafesigError``
    (e.g. a prompt longer than the model's context). ``safety`` may be unresolved (the model's
    values fill it in, as ``stream_generate`` does)."""
    tokenizer = wrap_tokenizer(tokenizer)
    config = safety.resolved(model.args.safesig)
    if not config.enabled:
        raise ValueError("safe_batch runs safety-on generations only.")
    queued = []
    for job in jobs:
        try:
            prepared, prefill_ids = prompt_with_prefill(model, tokenizer, job.messages,
                                                        job.prefill or None)
        except SafesigError as e:
            yield job, {"error": str(e)}
            continue
        queued.append((job, prepared, prefill_ids))
    queued.sort(key=lambda q: len(q[1].ids) + len(q[2]))  # less padding
    engine = SafeBatchGenerator(model, tokenizer, config)
    running: Dict[int, "Job"] = {}
    steps: Dict[int, List[Step]] = {}
    while queued or running:
        while queued and len(running) < batch_size:
            job, prepared, prefill_ids = queued.pop(0)
            uid = engine.insert_prepared(prepared, prefill_ids, max_tokens)
            running[uid], steps[uid] = job, []
        for step in engine.next():
            steps[step.uid].append(step)
            if getattr(step, "finish_reason", None) is not None:
                yield running.pop(step.uid), step_outcome(tokenizer, steps.pop(step.uid))
