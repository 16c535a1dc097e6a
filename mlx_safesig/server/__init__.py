"""An OpenAI-compatible HTTP server whose every response carries the safety signal.

``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /health``,
in OpenAI's shapes (the official ``openai`` client works unchanged), plus a top-level
``"safety": {"query_p", "refusal_inserted", "events": [{"kind", "step", "p"}, ..]}``. Streamed,
each step's events arrive in a chunk of their own (``safety``, no content) and the last chunk
carries the whole object; under rollback a ``retracted`` event says how many characters
(``chars``) the client drops from the end of what it received.

Requests join and leave one running batch of the strategic-decoding engine
(``engine.SafeBatchGenerator``), each row with its own sampler and monitor: ``worker`` is the one
generation thread, ``http`` the handler threads, ``api`` the wire format.
"""

import signal
import threading

from .api import ApiError, Sampling
from .http import Server

__all__ = ["ApiError", "Sampling", "Server", "serve"]


def serve(model, tokenizer, safety, *, model_id: str, host: str = "127.0.0.1", port: int = 8080,
          sampling: Sampling = None, max_batch: int = 32, max_queue: int = 64, on_ready=None):
    """Serve ``model`` until SIGTERM or Ctrl-C, then answer the running and queued requests and
    return. ``on_ready(server)`` is called once it listens (``server.url``)."""
    server = Server(model, tokenizer, safety, model_id=model_id, host=host, port=port,
                    sampling=sampling, max_batch=max_batch, max_queue=max_queue)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: server.stop())
    server.serve(on_ready)
