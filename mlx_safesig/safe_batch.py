"""Batched strategic decoding for evaluation: ``evaluate.respond``'s outcome for many jobs at once.

``safe_batch`` runs safety-on jobs as rows of the one engine (``engine.SafeBatchGenerator``), up to
``batch_size`` at a time, the next job (by prompt length) joining when one finishes, and gives each
job the dict ``respond`` builds from ``stream_generate``: the same tokens, text, finish reason,
query verdict, insertion point and probes (a lone row and a row of a batch run the same steps).

Numerics: a batched matrix product may round differently from a one-row one (float32: ~1e-6 on
p(malicious) for a 30-layer model, bit-equal on the tiny test models), so a near tie between two
logits, or a probability that close to a threshold, could in principle decide differently.
"""

from typing import TYPE_CHECKING, Dict, Iterator, List, Sequence, Tuple

from .decoding import SafetyConfig
from .engine import SafeBatchGenerator, TokenStep
from .generate import streamed_text
from .model import Model, SafesigError
from .prompt import prompt_with_prefill, wrap_tokenizer

if TYPE_CHECKING:
    from .evaluate import Job


def safe_batchable(job: "Job", safety: SafetyConfig) -> bool:
    """Whether ``safe_batch`` gives ``job`` the sequential path's outcome: safety on, greedy
    (temperature 0) and no rollback. Sampled jobs stay sequential: their draws come from a per-job
    seed of the global random state."""
    greedy = float((job.sampling or {}).get("temp", 0.0)) == 0.0
    return job.mode == "on" and greedy and safety.enabled and not safety.rollback


def _outcome(tokenizer, steps: List[TokenStep]) -> dict:
    """``evaluate.respond``'s dict from a row's steps."""
    probes, inserted_at = [], None
    for step in steps:
        for e in step.events:
            if e.kind == "probe":
                probes.append([e.step, round(float(e.p), 5)])
            elif e.kind == "refusal-inserted":
                inserted_at = e.step
    finish = steps[-1].finish_reason
    ids = [s.token for s in steps]
    ids = ids[:-1] if finish == "stop" else ids
    return {
        "response": streamed_text(tokenizer, ids, finish), "tokens": len(steps),
        "finish": finish, "query_p": steps[-1].monitor.query_p,
        "inserted": inserted_at is not None, "inserted_at": inserted_at, "probes": probes,
    }


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
    steps: Dict[int, List[TokenStep]] = {}
    while queued or running:
        while queued and len(running) < batch_size:
            job, prepared, prefill_ids = queued.pop(0)
            uid = engine.insert_prepared(prepared, prefill_ids, max_tokens)
            running[uid], steps[uid] = job, []
        for step in engine.next():
            steps[step.uid].append(step)
            if step.finish_reason is not None:
                yield running.pop(step.uid), _outcome(tokenizer, steps.pop(step.uid))
