"""Running an evaluation: the generations of every suite with safety on and off, appended to
``rows.jsonl`` as they finish, then aggregated into the report (``report.py``).

Output directory: ``rows.jsonl`` (one line per generation, appended as it finishes; ``--resume``
skips every key already there, the last line of a key wins), ``run.json`` (the settings a resume
must match), then ``results.json``, ``report.md`` and ``*.png``. Responses are written to
``rows.jsonl`` only; the report carries aggregate numbers and row ids.

Batching: greedy generations run ``--batch-size`` at a time and give the rows one by one gives
(with safety on, a probe's rounded p may differ in its last digit: a batched product rounds
differently from a one-row one).
Safety off (and the prefill suite's own continuations): mlx-lm's ``BatchGenerator`` on the same
prompt ids and with the same detokenization (``plain_batch``). Safety on: ``safe_batch.safe_batch``,
the strategic decoding of ``safe_generate_step`` with every row's probes, windows and refusal its
own. Sampled generations (per-job seeds) run one by one.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
from mlx_lm.generate import BatchGenerator

from ..decoding import SafetyConfig, config_fingerprint, parse_schedule
from ..generate import score, stream_generate, streamed_text
from ..model import SafesigError
from ..prompt import prompt_with_prefill, wrap_tokenizer
from ..safe_batch import outcome, safe_batch, safe_batchable
from .judges import judge_response
from .report import atomic_write, summarize, write_outputs
from .store import lock_rows
from .suites import (
    HARMFUL_SUITES,
    MODES,
    PREFILL_KS,
    PREFILL_SCHEME,
    SUITES,
    SURE,
    Job,
    job_seed,
    load_data,
    plan_suite,
    plan_verdicts,
)

ROWS_FILE, RUN_FILE = "rows.jsonl", "run.json"



def respond(model, tokenizer, job: Job, safety: SafetyConfig, max_tokens: int, seed: int) -> dict:
    """Run one generation; the response text (retracted text removed), the query verdict, whether
    and where the refusal was inserted, and the probes ``[response index, p]``."""
    sampling = dict(job.sampling or {})
    if sampling.get("top_k", 0) >= model.args.vocab_size:  # all tokens (mlx-lm wants k < vocab)
        sampling["top_k"] = 0
    mx.random.seed(seed)
    return outcome(stream_generate(model, tokenizer, job.messages, max_tokens, safety=safety,
                                   prefill_response=job.prefill or None, **sampling))


def own_continuation(model, tokenizer, content: str, n: int, prefill: str = SURE) -> List[int]:
    """The model's own greedy continuation (safety off) of the response ``prefill``, first ``n``
    tokens, EOS dropped."""
    ids = []
    for r in stream_generate(model, tokenizer, [{"role": "user", "content": content}], n,
                             safety=SafetyConfig(enabled=False), prefill_response=prefill):
        if r.finish_reason != "stop":
            ids.append(int(r.token))
    return ids


def verdict_key(job: Job) -> str:
    """What a query verdict depends on: the job's messages (one request has several shapes)."""
    return json.dumps(job.messages, sort_keys=True)


def batchable(job: Job) -> bool:
    """Whether mlx-lm's batch generator can run ``job`` with the sequential path's results:
    safety off and greedy (a cached continuation, or an ``off`` job at temperature 0). Sampled
    jobs stay sequential: their draws come from a per-job seed (``job_seed``)."""
    if job.mode == "continuation":
        return True
    return job.mode == "off" and float((job.sampling or {}).get("temp", 0.0)) == 0.0


def plain_prompt_ids(model, tokenizer, job: Job) -> List[int]:
    """The token ids ``stream_generate`` feeds mlx-lm for ``job`` with safety off: the chat
    template rendered by ``prepare_prompt``, then the prefill's tokens. Raises the sequential
    path's ``SafesigError`` for an unusable prompt (e.g. longer than the model's context)."""
    prepared, prefill = prompt_with_prefill(model, tokenizer, job.messages, job.prefill or None)
    return prepared.ids + prefill


def plain_batch(model, tokenizer, jobs: Sequence[Job], max_tokens: int,
                batch_size: int) -> Iterator[Tuple[Job, dict]]:
    """Generate ``batchable`` jobs with mlx-lm's ``BatchGenerator`` (greedy, up to ``batch_size``
    sequences at a time, a finished one replaced by the next prompt) and yield ``(job, outcome)``
    as each finishes. Outcomes are what the sequential path gives: ``respond``'s dict for an
    ``off`` job (``max_tokens`` tokens), ``{"ids": ...}`` like ``own_continuation`` for a
    continuation (``max(PREFILL_KS)`` tokens), ``{"error": ...}`` for a prompt it would reject."""
    tokenizer = wrap_tokenizer(tokenizer)
    queued = []
    for job in jobs:
        try:
            ids = plain_prompt_ids(model, tokenizer, job)
        except SafesigError as e:
            yield job, {"error": str(e)}
            continue
        limit = max(PREFILL_KS) if job.mode == "continuation" else max_tokens
        queued.append((job, ids, limit))
    if not queued:
        return
    queued.sort(key=lambda q: len(q[1]))  # similar lengths share a batch: less padding
    gen = BatchGenerator(model, stop_tokens=[[t] for t in tokenizer.eos_token_ids],
                         completion_batch_size=batch_size, prefill_batch_size=batch_size)
    try:
        uids = gen.insert([ids for _, ids, _ in queued], [limit for _, _, limit in queued])
        by_uid = {uid: job for uid, (job, _, _) in zip(uids, queued)}
        tokens: Dict[int, List[int]] = {uid: [] for uid in uids}
        while responses := gen.next_generated():
            for r in responses:
                if r.finish_reason != "stop":  # the EOS token is not part of the response
                    tokens[r.uid].append(int(r.token))
                if r.finish_reason is None:
                    continue
                job, ids = by_uid[r.uid], tokens.pop(r.uid)
                if job.mode == "continuation":
                    yield job, {"ids": ids}
                else:  # respond()'s dict; like mlx-lm, the count includes a final EOS
                    yield job, {
                        "response": streamed_text(tokenizer, ids, r.finish_reason),
                        "tokens": len(ids) + (r.finish_reason == "stop"),
                        "finish": r.finish_reason, "query_p": None, "inserted": False,
                        "inserted_at": None, "probes": [],
                    }
    finally:
        gen.close()



def read_rows(path: Path) -> Dict[str, dict]:
    """Finished rows by key; the last line of a key wins; a torn last line is ignored."""
    rows = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").split("\n"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "key" in row:
                rows[row["key"]] = row
    return rows


class _RowLog:
    """rows.jsonl, appended and flushed row by row so an interrupted run can resume."""

    def __init__(self, path: Path):
        self.path, self.rows = path, read_rows(path)

    def add(self, job: Job, outcome: dict):
        row = {**outcome, "key": job.key, "suite": job.suite, "attack": job.attack,
               "variant": job.variant, "prompt_id": job.prompt_id, "mode": job.mode,
               "prefill_tokens": job.prefill_tokens, "sampling": job.sampling}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        self.rows[job.key] = row
        return row


def _bar(total: int, done: int, desc: str, progress: bool):
    from ..progress import progress_bar

    return progress_bar(total, desc, "gen", initial=done, enabled=progress)


@dataclass
class EvalSettings:
    """What a run does. ``modes``: ``("off", "on")`` or one of them; ``sampling``: temp / top_p /
    top_k of every suite but ``decoding``; ``threshold`` / ``schedule``: the safety config (None
    threshold = the model's); ``batch_size``: greedy generations run this many at a time
    (``plain_batch``, ``safe_batch``; 1 = one by one), not part of the fingerprint: it does not
    change the rows."""

    suites: Sequence[str] = SUITES
    split: str = "dev"
    limit: Optional[int] = None
    max_tokens: int = 64
    grid_size: int = 5
    modes: Sequence[str] = MODES
    sampling: dict = field(default_factory=lambda: dict(temp=0.0, top_p=1.0, top_k=0))
    seed: int = 0
    schedule: str = "annealing"
    threshold: Optional[float] = None
    window_threshold: Optional[float] = None
    tau: Optional[int] = None
    min_window: Optional[int] = None
    window_query: Optional[bool] = None
    keep_verdict: Optional[str] = None
    surprisal_gate: Optional[float] = None
    surprisal_window: Optional[int] = None
    smooth_copies: Optional[int] = None
    smooth_rate: Optional[float] = None
    model_name: str = "Assistant"
    exclude_categories: Sequence[str] = ()
    batch_size: int = 8

    def fingerprint(self, model_id: str, decoding: Optional[dict] = None) -> dict:
        """The settings every row of an output directory shares (a resume must match them);
        ``decoding``: the safety-on decoding rules resolved against the model's defaults, so a
        model whose defaults changed (a new adapter config) cannot be resumed into old rows."""
        return {"model": model_id, "split": self.split, "max_tokens": self.max_tokens,
                "sampling": self.sampling, "seed": self.seed, "schedule": self.schedule,
                "threshold": self.threshold, "window_threshold": self.window_threshold,
                "tau": self.tau, "min_window": self.min_window, "window_query": self.window_query,
                "keep_verdict": self.keep_verdict, "model_name": self.model_name,
                "prefill": PREFILL_SCHEME,
                "exclude_categories": sorted(self.exclude_categories), "decoding": decoding}


def _check_resume(out: Path, fingerprint: dict, resume: bool):
    run_file = out / RUN_FILE
    if not run_file.is_file():
        if (out / ROWS_FILE).is_file() and not resume:
            raise SafesigError(f"{out} already holds evaluation rows; pass --resume to continue "
                               "them or choose another --out.")
        return
    if not resume:
        raise SafesigError(f"{out} already holds an evaluation; pass --resume to continue it or "
                           "choose another --out.")
    before = json.loads(run_file.read_text())
    for k, v in fingerprint.items():
        if k == "decoding" and before.get(k) != v:
            if not before.get(k):
                raise SafesigError(f"cannot resume {out}: it was run by an earlier mlx-safesig, "
                                   "which did not record the decoding rules; choose another --out.")
            name = next(n for n in v if before[k].get(n) != v[n])
            raise SafesigError(f"cannot resume {out}: it was run with {name}="
                               f"{before[k].get(name)!r}, not {v[name]!r} (the model's decoding "
                               "defaults changed).")
        if before.get(k) != v:
            raise SafesigError(f"cannot resume {out}: it was run with {k}={before.get(k)!r}, "
                               f"not {v!r}.")


def run_eval(model, tokenizer, data_dir, out_dir, settings: EvalSettings, *, model_id: str = "",
             judge: Optional[Callable[[str, str], bool]] = None, judge_id: str = "",
             resume: bool = False, progress: bool = True) -> dict:
    """Run the suites, append every generation to ``out_dir/rows.jsonl`` (skipping keys already
    there when ``resume``), then write ``results.json``, ``report.md`` and the plots. Returns the
    results dict (see ``summarize``)."""
    unknown = [s for s in settings.suites if s not in SUITES]
    if unknown:
        raise SafesigError(f"unknown suite {unknown[0]!r}; use {', '.join(SUITES)} or all.")
    parse_schedule(settings.schedule)
    if settings.batch_size < 1:
        raise SafesigError(f"the batch size must be at least 1, got {settings.batch_size}.")
    if settings.max_tokens < 1:
        raise SafesigError(f"max_tokens must be at least 1, got {settings.max_tokens}.")
    data = load_data(data_dir, settings.split, settings.suites, settings.exclude_categories)
    safety = SafetyConfig(schedule=settings.schedule, threshold=settings.threshold,
                          window_threshold=settings.window_threshold, tau=settings.tau,
                          min_window=settings.min_window, window_query=settings.window_query,
                          keep_verdict=settings.keep_verdict,
                          surprisal_gate=settings.surprisal_gate,
                          surprisal_window=settings.surprisal_window,
                          smooth_copies=settings.smooth_copies, smooth_rate=settings.smooth_rate)
    resolved = safety.resolved(model.args.safesig)
    threshold = resolved.threshold
    out = Path(out_dir)
    fingerprint = settings.fingerprint(model_id, config_fingerprint(resolved))
    lock_rows(out / ROWS_FILE)  # one run at a time appends to an --out
    _check_resume(out, fingerprint, resume)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / RUN_FILE, json.dumps(fingerprint, indent=1))
    log = _RowLog(out / ROWS_FILE)
    configs = {"on": safety, "off": SafetyConfig(enabled=False)}
    known_verdicts: Dict[str, float] = {}

    def run(jobs: List[Job], desc: str):
        todo = [j for j in jobs if j.key not in log.rows]
        batched = [j for j in todo if settings.batch_size > 1 and batchable(j)]
        if len(batched) < 2:  # a batch of one is the sequential path with overhead
            batched = []
        safe = [j for j in todo if settings.batch_size > 1 and safe_batchable(j, safety)]
        if len(safe) < 2:
            safe = []
        with _bar(len(jobs), len(jobs) - len(todo), desc, progress) as bar:

            def finish(job: Job, outcome: dict):
                if judge is not None and job.suite in HARMFUL_SUITES and "response" in outcome:
                    outcome["judge_model"] = judge_response(judge, judge_id, job, outcome)
                log.add(job, outcome)
                bar.update(1)

            for job, outcome in plain_batch(model, tokenizer, batched, settings.max_tokens,
                                            settings.batch_size):
                finish(job, outcome)
            for job, outcome in safe_batch(model, tokenizer, safe, safety, settings.max_tokens,
                                           settings.batch_size):
                finish(job, outcome)
            batched_keys = {j.key for j in batched + safe}
            for job in todo:
                if job.key in batched_keys:
                    continue
                try:
                    if job.mode == "verdict" and verdict_key(job) in known_verdicts:
                        outcome = {"query_p": known_verdicts[verdict_key(job)]}
                    elif job.mode == "verdict":
                        outcome = {"query_p": score(model, tokenizer, job.messages)}
                    elif job.mode == "continuation":
                        outcome = {"ids": own_continuation(model, tokenizer, job.content,
                                                           max(PREFILL_KS), job.prefill)}
                    else:
                        outcome = respond(model, tokenizer, job, configs[job.mode],
                                          settings.max_tokens, job_seed(settings.seed, job))
                except SafesigError as e:  # e.g. a template longer than the model's context
                    outcome = {"error": str(e)}
                finish(job, outcome)

    jobs: List[Job] = []
    for suite in settings.suites:
        continuations = None
        if suite == "prefill":
            cont = [Job("prefill", "continuation", str(r["id"]), "continuation", r["text"],
                        variant="after-sure", prefill=SURE)
                    for r in data.sets["harmful"][: settings.limit]]
            run(cont, "prefill: own continuations of \"Sure, here is\"")
            continuations = {j.prompt_id: log.rows[j.key].get("ids", []) for j in cont}
        suite_jobs = plan_suite(suite, data, settings.modes, settings.limit, settings.sampling,
                                settings.grid_size, settings.model_name, continuations, tokenizer)
        run(suite_jobs, suite)
        jobs += suite_jobs
    # a safety-on generation already computed the query verdict of its message (the same prefill
    # and probe as score()): reuse it rather than prefill long template prompts again
    known_verdicts.update({verdict_key(j): log.rows[j.key]["query_p"] for j in jobs
                           if j.mode == "on" and log.rows[j.key].get("query_p") is not None})
    verdicts = plan_verdicts(settings.suites, data, settings.limit, settings.model_name)
    run(verdicts, "[CLS] query verdicts")
    if judge is not None:  # rows generated before this judge was given
        for job in jobs:
            row = log.rows[job.key]
            if job.suite in HARMFUL_SUITES and "error" not in row and \
                    (row.get("judge_model") or {}).get("judge") != judge_id:
                log.add(job, {**row, "judge_model": judge_response(judge, judge_id, job, row)})
    results = summarize(jobs + verdicts, log.rows, data.keywords, threshold,
                        judge_given=judge is not None)
    results["config"] = {**fingerprint, "suites": list(settings.suites), "limit": settings.limit,
                         "grid_size": settings.grid_size, "modes": list(settings.modes),
                         "threshold": threshold, "window_threshold": resolved.window_threshold,
                         "tau": resolved.tau, "min_window": resolved.min_window,
                         "window_query": resolved.window_query,
                         "keep_verdict": resolved.keep_verdict,
                         "surprisal_gate": resolved.surprisal_gate,
                         "smooth_copies": resolved.smooth_copies,
                         "judge_model": judge_id or None}
    write_outputs(results, [log.rows[j.key] for j in jobs if j.key in log.rows], out)
    return results
