"""HTTP on the standard library's ``ThreadingHTTPServer`` (as mlx_lm.server): one thread per
connection parses and checks the request, tokenizes the prompt, queues a ``Job`` for the
generation thread and writes what comes back, as one JSON body or as server-sent events.

Every failure is an OpenAI-style JSON error: bad requests (400), unknown models or paths (404),
prompts longer than the context (413), a full queue (429 with ``Retry-After``), shutdown (503),
faults (500, logged, never a traceback to the client). A client that goes away is noticed while
its request waits or streams (a closed socket reads as end of file), and its row is freed.
"""

import json
import logging
import queue
import select
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from ..model import SafesigError
from ..prompt import prepare_prompt, prompt_with_prefill
from .api import (
    ApiError,
    Request,
    Sampling,
    chunk_body,
    completion_body,
    parse_json,
    parse_request,
    safety_object,
    usage,
)
from .worker import Job, Worker

log = logging.getLogger("mlx_safesig.server")
MAX_BODY = 16 * 2**20


class ClientGone(Exception):
    """The client closed the connection before its response was complete."""


class Handler(BaseHTTPRequestHandler):
    server: "Server"
    timeout = 60  # seconds a client may take to send its request
    server_version = "mlx-safesig"

    # -- plumbing ---------------------------------------------------------------------------------

    def log_message(self, format, *args):
        log.info("%s %s", self.address_string(), format % args)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a malformed request line, an unknown method) as JSON."""
        phrase = HTTPStatus(code).phrase if code in HTTPStatus._value2member_map_ else "Error"
        self._send_json(code, ApiError(code, message or phrase, code=phrase.lower().replace(
            " ", "_")).body())

    def _send_json(self, status: int, body: dict, headers: Optional[dict] = None):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _guarded(self, route):
        try:
            route()
        except ApiError as e:
            self._send_json(e.status, e.body(), e.headers)
        except (ClientGone, BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception as e:  # a bug: logged here, one line to the client
            log.exception("request failed")
            error = ApiError(500, f"internal error: {type(e).__name__}: {e}",
                             type="server_error", code="internal_error")
            try:
                self._send_json(500, error.body())
            except OSError:
                pass

    def _client_gone(self) -> bool:
        """The client closed its end (HTTP/1.0: it sends nothing after the request)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
        except (OSError, ValueError):
            return True

    # -- routes -------------------------------------------------------------------------------------

    def do_GET(self):
        routes = {"/health": self._health, "/v1/models": self._models}
        path = self.path.split("?", 1)[0].rstrip("/")
        self._guarded(routes.get(path, self._not_found))

    def do_POST(self):
        routes = {"/v1/chat/completions": lambda: self._complete(chat=True),
                  "/v1/completions": lambda: self._complete(chat=False)}
        path = self.path.split("?", 1)[0].rstrip("/")
        self._guarded(routes.get(path, self._not_found))

    def _not_found(self):
        raise ApiError(404, f"no route {self.command} {self.path}; this server answers GET "
                       "/health, GET /v1/models, POST /v1/chat/completions and POST "
                       "/v1/completions.", code="not_found")

    def _health(self):
        worker = self.server.worker
        ok = worker.thread.is_alive() and not worker.stopping.is_set()
        self._send_json(200 if ok else 503, {
            "status": "ok" if ok else "stopping", "model": self.server.model_id,
            "running": len(worker.running), "waiting": worker.waiting.qsize(),
            **dict(worker.counts)})

    def _models(self):
        self._send_json(200, {"object": "list", "data": [{
            "id": self.server.model_id, "object": "model", "created": self.server.created,
            "owned_by": "mlx-safesig"}]})

    def _read_body(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "send the request body with a Content-Length header.",
                           code="length_required")
        if not length.isdigit():
            raise ApiError(400, f"Content-Length {length!r} is not a number.",
                           code="invalid_header")
        if int(length) > MAX_BODY:
            raise ApiError(413, f"the request body is {length} bytes; at most {MAX_BODY} are "
                           "accepted.", code="body_too_large")
        return parse_json(self.rfile.read(int(length)))

    def _complete(self, chat: bool):
        server = self.server
        req = parse_request(self._read_body(), chat, server.model_id, server.sampling)
        job = server.job(req)
        server.worker.submit(job)
        try:
            if req.stream:
                self._stream(job)
            else:
                self._whole(job)
        except (ClientGone, OSError):
            server.worker.cancel(job)
            raise ClientGone from None

    def _deltas(self, job: Job):
        """The job's ``Delta`` values as the generation thread makes them."""
        while True:
            try:
                item = job.out.get(timeout=0.05)
            except queue.Empty:  # meanwhile, check on the client and the generation thread
                if self._client_gone():
                    raise ClientGone from None
                if not self.server.worker.thread.is_alive():
                    raise ApiError(503, "the generation thread has stopped.",
                                   type="server_error", code="unavailable") from None
                continue
            if isinstance(item, ApiError):
                raise item
            yield item
            if item.finish_reason is not None:
                return

    def _whole(self, job: Job):
        for _ in self._deltas(job):
            pass
        self._send_json(200, completion_body(
            job.request, self.server.model_id, job.text, job.finish_reason,
            usage(job.prompt_tokens, job.tokens), self._safety(job)))

    def _safety(self, job: Job) -> dict:
        return safety_object(job.query_p, job.inserted, job.events)

    def _stream(self, job: Job):
        req, model_id = job.request, self.server.model_id
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.close_connection = True  # the end of the stream is the end of the connection
        first = True
        try:
            for d in self._deltas(job):
                if d.events:  # safety events as they happen: no content
                    self._event(chunk_body(req, model_id, first=first, safety=safety_object(
                        d.query_p, d.inserted, d.events)))
                    first = False
                if d.text or first or d.finish_reason:
                    last = d.finish_reason is not None and not req.include_usage
                    self._event(chunk_body(req, model_id, d.text, first=first,
                                           finish_reason=d.finish_reason,
                                           safety=self._safety(job) if last else None))
                    first = False
            if req.include_usage:
                self._event(chunk_body(req, model_id, usage_=usage(job.prompt_tokens, job.tokens),
                                       safety=self._safety(job)))
        except ApiError as e:  # headers are out: the error travels as an event
            self._event(e.body())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _event(self, body: dict):
        self.wfile.write(b"data: " + json.dumps(body).encode() + b"\n\n")
        self.wfile.flush()


class Server(ThreadingHTTPServer):
    """The HTTP server and its generation thread (``Worker``). ``serve`` runs until ``stop``
    (SIGTERM, Ctrl-C) and returns once the running and queued requests are answered."""

    daemon_threads = True
    request_queue_size = 128  # connections the kernel holds before accept (default 5 resets bursts)

    def __init__(self, model, tokenizer, safety, *, model_id: str, host: str = "127.0.0.1",
                 port: int = 8080, sampling: Optional[Sampling] = None, max_batch: int = 32,
                 max_queue: int = 64):
        self.address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        super().__init__((host, port), Handler)
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.sampling = sampling or Sampling()
        self.created = int(time.time())
        self.worker = Worker(model, tokenizer, safety, self.sampling, max_batch=max_batch,
                             max_queue=max_queue)
        self._tokenizer_lock = threading.Lock()  # one tokenizer, many handler threads
        self._active = 0
        self._idle = threading.Condition()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def job(self, req: Request) -> Job:
        """Tokenize ``req``'s prompt and size its response: 400 for a prompt the model cannot
        judge, 413 for one longer than the context, 400 for ``max_tokens`` past its end."""
        model = self.model
        vocab = model.args.vocab_size
        if not req.chat and isinstance(req.prompt, list) and max(req.prompt) >= vocab:
            raise ApiError(400, f"prompt token ids must be below the vocabulary size {vocab}, "
                           f"got {max(req.prompt)}.", param="prompt", code="invalid_value")
        with self._tokenizer_lock:
            try:
                prepared, prefill_ids = prompt_with_prefill(model, self.tokenizer, req.prompt)
            except SafesigError as e:
                try:
                    prepare_prompt(self.tokenizer, req.prompt)
                except SafesigError as bad:
                    raise ApiError(400, str(bad).splitlines()[0], param="messages" if req.chat
                                   else "prompt", code="invalid_prompt") from None
                raise ApiError(413, str(e).splitlines()[0], param="messages" if req.chat else
                               "prompt", code="context_length_exceeded") from None
        n = len(prepared.ids) + len(prefill_ids) + 1  # the kept [CLS] verdict takes a slot
        room = (model.args.max_position_embeddings or 2**31) - n
        if req.max_tokens is not None and req.max_tokens > room:
            raise ApiError(400, f"the prompt leaves room for {room} tokens in the model's "
                           f"context, but max_tokens is {req.max_tokens}.", param="max_tokens",
                           code="context_length_exceeded")
        max_tokens = min(req.max_tokens or self.sampling.max_tokens, room)
        return Job(req, prepared, prefill_ids, max_tokens)

    def process_request_thread(self, request, client_address):
        with self._idle:
            self._active += 1
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._idle:
                self._active -= 1
                self._idle.notify_all()

    def serve(self, on_ready=None):
        """Answer requests until ``stop``; then finish the running and queued ones and return."""
        self.worker.thread.start()
        if on_ready is not None:
            on_ready(self)
        try:
            self.serve_forever()
        except KeyboardInterrupt:
            pass
        self.socket.close()  # new connections are refused at once, not left waiting
        self.worker.stop()
        self.worker.thread.join()
        with self._idle:  # the handlers write their last bytes
            self._idle.wait_for(lambda: self._active == 0, timeout=30)
        self.server_close()

    def stop(self):
        """Stop accepting connections; ``serve`` then drains and returns. Safe from a signal
        handler (the listening loop is stopped from another thread)."""
        self.worker.stopping.set()
        threading.Thread(target=self.shutdown, daemon=True).start()
