"""The generation thread: the only thread that touches the model, driving one ``SafeBatchGenerator``
with continuous batching. HTTP handler threads hand it ``Job`` objects through a bounded queue
and read each job's ``Delta`` values from the job's own queue; a cancelled job (its client went
away) leaves the running batch before the next step (``SafeBatchGenerator.remove``).
"""

import logging
import queue
import random
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import mlx.core as mx

from ..engine import SafeBatchGenerator, seeded_sampler
from ..generate import GenerationResult, StepText, without_retracted
from ..model import SafesigError
from ..prompt import PreparedPrompt
from .api import ApiError, Request, Sampling, event_dict

log = logging.getLogger("mlx_safesig.server")


@dataclass
class Delta:
    """What one engine step changed in a response: ``text`` the client appends (after dropping
    what ``retracted`` events among ``events`` say), the step's safety ``events`` (wire dicts),
    the query verdict and whether the refusal is in so far, and on the last one
    ``finish_reason``."""

    text: str
    events: List[dict]
    query_p: Optional[float]
    inserted: bool
    finish_reason: Optional[str] = None


def held_back(text: str, stops: List[str]) -> int:
    """Length of the longest end of ``text`` that could be the start of a stop sequence (not
    streamed until the next tokens decide)."""
    for n in range(min(len(text), max(map(len, stops), default=1) - 1), 0, -1):
        if any(s.startswith(text[-n:]) for s in stops):
            return n
    return 0


class Job:
    """One request inside the generation thread: its prompt and stop sequences, the text
    made so far and the safety state. ``out`` carries ``Delta`` values (or one ``ApiError``) to
    the handler thread."""

    def __init__(self, request: Request, prepared: PreparedPrompt, prefill_ids: List[int],
                 max_tokens: int):
        self.request, self.prepared, self.prefill_ids = request, prepared, prefill_ids
        self.max_tokens = max_tokens
        self.out: "queue.SimpleQueue" = queue.SimpleQueue()
        self.cancelled = threading.Event()
        self.uid: Optional[int] = None
        self.to_result: Optional[StepText] = None
        self.text, self.sent = "", 0  # the response so far; how much of it the client has
        self.events: List[dict] = []
        self.query_p: Optional[float] = None
        self.inserted = False
        self.tokens = 0
        self.finish_reason: Optional[str] = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prepared.ids) + len(self.prefill_ids)

    def feed(self, r: GenerationResult) -> bool:
        """Take one streamed result; True when the response is complete (the engine finished the
        row, or a stop sequence appeared: the text ends before it, as OpenAI's does)."""
        stops = self.request.stop
        kept = without_retracted(self.text, r.safety.events)
        dropped = max(0, self.sent - len(kept))
        self.sent -= dropped
        events = [event_dict(e, dropped) for e in r.safety.events]
        self.text = kept + r.text
        finish = r.finish_reason
        if stops:  # an earlier stop would have been found in an earlier step
            start = max(0, len(kept) - max(map(len, stops)) + 1)
            hits = [i for i in (self.text.find(s, start) for s in stops) if i >= 0]
            if hits:
                self.text, finish = self.text[: min(hits)], "stop"
        end = len(self.text) if finish else max(self.sent, len(self.text) - held_back(
            self.text, stops))
        delta = Delta(self.text[self.sent : end], events, r.safety.query_p, r.safety.inserted,
                      finish)
        self.sent = end
        self.events += events
        self.query_p, self.inserted = r.safety.query_p, r.safety.inserted
        self.tokens = r.generation_tokens
        self.finish_reason = finish
        if self.request.stream or finish:  # a whole response is sent once, at its end
            self.out.put(delta)
        return finish is not None


class Worker:
    """Owns the model and the engine. ``submit`` queues a job (429 when ``max_queue`` jobs wait,
    503 once stopping); the thread admits waiting jobs while fewer than ``max_batch`` run, steps
    the batch and routes each step to its job. ``stop`` lets running and queued jobs finish."""

    def __init__(self, model, tokenizer, safety, sampling: Sampling, max_batch: int = 32,
                 max_queue: int = 64):
        self.model, self.tokenizer, self.safety = model, tokenizer, safety
        self.sampling = sampling
        self.engine = SafeBatchGenerator(model, tokenizer, safety)
        self.max_batch = max_batch
        self.waiting: "queue.Queue[Job]" = queue.Queue(max_queue)
        self.running: Dict[int, Job] = {}
        self.counts = Counter()
        self._counts_lock = threading.Lock()
        self._cancelled: "queue.SimpleQueue[Job]" = queue.SimpleQueue()
        self._wake = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mlx-safesig-generation",
                                       daemon=True)

    def _sampler(self, request: Request) -> Callable:
        """The request's own sampler (made in this thread, as every array the model meets): its
        draws depend on its seed only, whatever else runs."""
        seed = request.seed if request.seed is not None else random.getrandbits(63)
        return seeded_sampler(seed, temp=request.temperature, top_p=request.top_p,
                              top_k=self.sampling.top_k, min_p=self.sampling.min_p)

    def submit(self, job: Job):
        if self.stopping.is_set():
            raise ApiError(503, "the server is shutting down.", type="server_error",
                           code="shutting_down")
        try:
            self.waiting.put_nowait(job)
        except queue.Full:
            self.count("rejected")
            raise ApiError(429, f"the server is busy: {self.waiting.maxsize} requests are "
                           "already waiting; retry shortly.", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        self._wake.set()

    def count(self, what: str):
        with self._counts_lock:
            self.counts[what] += 1

    def cancel(self, job: Job):
        """The client went away: free the job's row before the next step."""
        job.cancelled.set()
        self._cancelled.put(job)
        self._wake.set()

    def stop(self):
        """Finish what is running and waiting, then end the thread (``thread.join()``)."""
        self.stopping.set()
        self._wake.set()

    # -- the generation thread ------------------------------------------------------------------

    def _run(self):
        try:
            while True:
                try:
                    self._drop_cancelled()
                    self._admit()
                    if not self.running:
                        if self.stopping.is_set() and self.waiting.empty():
                            return
                        self._wake.wait(0.05)
                        self._wake.clear()
                        continue
                    self._step()
                except Exception as e:  # a fault fails the running requests, never the server
                    log.exception("generation failed")
                    self._fail_all(_fault(e))
        finally:
            # MLX frees a thread's streams (and their C++ threads) only when that thread asks;
            # left to process exit they sometimes abort it ("terminate called without an
            # active exception", exit -6) after every request was answered.
            mx.clear_streams()

    def _drop_cancelled(self):
        while True:
            try:
                job = self._cancelled.get_nowait()
            except queue.Empty:
                return
            if self.running.pop(job.uid, None) is not None:
                self.engine.remove([job.uid])
                self.count("cancelled")

    def _admit(self):
        """Admit the waiting jobs while fewer than ``max_batch`` run: those that arrived together
        go in as one batched prefill (``insert_prepared_many``); if one of them is refused, one by
        one, so a bad prompt fails only its own request."""
        jobs = []
        while len(self.running) + len(jobs) < self.max_batch:
            try:
                job = self.waiting.get_nowait()
            except queue.Empty:
                break
            if job.cancelled.is_set():
                self.count("cancelled")
                continue
            jobs.append(job)
        if len(jobs) > 1:
            try:
                uids = self.engine.insert_prepared_many(
                    [(job.prepared, job.prefill_ids) for job in jobs],
                    [job.max_tokens for job in jobs],
                    samplers=[self._sampler(job.request) for job in jobs])
            except SafesigError:  # checked before anything is admitted: each job's own below
                uids = None
            except Exception as e:  # a fault: these jobs fail, the engine starts over
                for job in jobs:
                    job.out.put(_fault(e))
                raise
            if uids is not None:
                for job, uid in zip(jobs, uids):
                    self._started(job, uid)
                return
        for job in jobs:
            try:
                uid = self.engine.insert_prepared(job.prepared, job.prefill_ids, job.max_tokens,
                                                  sampler=self._sampler(job.request))
            except SafesigError as e:
                job.out.put(ApiError(400, str(e).splitlines()[0], code="invalid_prompt"))
                continue
            except Exception as e:
                log.exception("admission failed")
                job.out.put(_fault(e))
                continue
            self._started(job, uid)

    def _started(self, job: "Job", uid: int):
        job.uid = uid
        job.to_result = StepText(self.engine.tokenizer, job.prompt_tokens, 0.0)
        self.running[uid] = job

    def _step(self):
        for step in self.engine.next():
            job = self.running.get(step.uid)
            if job is None:  # finished by a stop sequence earlier in this batch of steps
                continue
            if job.feed(job.to_result(step)):
                del self.running[step.uid]
                self.count("completed")
                if getattr(step, "finish_reason", None) is None:
                    self.engine.remove([step.uid])

    def _fail_all(self, error: ApiError):
        for job in self.running.values():
            job.out.put(error)
        self.running.clear()
        self.engine = SafeBatchGenerator(self.model, self.tokenizer, self.safety)


def _fault(e: Exception) -> ApiError:
    return ApiError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error",
                    code="generation_failed")
