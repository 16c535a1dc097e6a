"""OpenAI's wire format: request bodies -> checked ``Request`` values, results -> response bodies.

Every error is an ``ApiError``, sent as OpenAI's ``{"error": {"message", "type", "param",
"code"}}`` with its HTTP status, so clients (the official ``openai`` package among them) raise
their usual exceptions. Fields OpenAI defines that this server cannot honour (``n`` > 1,
``logprobs``, tools) are refused rather than silently ignored.
"""

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import List, Optional, Union

from ..decoding import SafetyEvent

MAX_STOP = 4  # OpenAI's limit on stop sequences
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class ApiError(Exception):
    """An OpenAI-style error: HTTP ``status`` and the ``error`` object's fields."""

    status: int
    message: str
    param: Optional[str] = None
    code: Optional[str] = None
    type: str = "invalid_request_error"
    headers: dict = field(default_factory=dict)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclass
class Sampling:
    """The server's defaults for what a request leaves out (the command line's options)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None


@dataclass
class Request:
    """A checked completion request. ``prompt``: chat messages (``chat``) or a string / token ids
    (a text completion); ``max_tokens`` None means "up to the context's end, at most the server's
    default"."""

    chat: bool
    prompt: Union[str, List[int], List[dict]]
    max_tokens: Optional[int]
    temperature: float
    top_p: float
    seed: Optional[int]
    stop: List[str]
    stream: bool
    include_usage: bool
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400 naming what is wrong with it."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}).", code="invalid_json") \
            from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object.", code="invalid_json")
    return body


def _type_error(name: str, expected: str, value) -> ApiError:
    return ApiError(400, f"'{name}' must be {expected}, got {json.dumps(value)}.", param=name,
                    code="invalid_type")


def _number(body: dict, name: str, lo: float, hi: float, integer: bool = False):
    """``body[name]`` checked to be a number (an integer) in [lo, hi]; None when absent."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise _type_error(name, "an integer" if integer else "a number", value)
    if not lo <= value <= hi:
        raise ApiError(400, f"'{name}' must be between {lo} and {hi}, got {value}.", param=name,
                       code="invalid_value")
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _type_error(name, "true or false", value)
    return value


def _stop(body: dict) -> List[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _type_error("stop", "a non-empty string or a list of them", stop)
    if len(stops) > MAX_STOP:
        raise ApiError(400, f"'stop' takes at most {MAX_STOP} sequences, got {len(stops)}.",
                       param="stop", code="invalid_value")
    return stops


def _content(message: dict, i: int) -> str:
    """A message's text: a string, or a list of ``{"type": "text", "text": ..}`` parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content):
        return "".join(p["text"] for p in content)
    raise _type_error(f"messages[{i}].content", "a string or a list of text parts", content)


def _messages(body: dict) -> List[dict]:
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "'messages' is required.", param="messages", code="missing_required")
    if not isinstance(messages, list) or not messages:
        raise _type_error("messages", "a non-empty list of messages", messages)
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _type_error(f"messages[{i}]", "an object with 'role' and 'content'", m)
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got "
                           f"{json.dumps(role)}.", param=f"messages[{i}].role",
                           code="invalid_value")
        out.append({"role": ROLES[role], "content": _content(m, i)})
    return out


def _prompt(body: dict) -> Union[str, List[int]]:
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(400, "'prompt' is required.", param="prompt", code="missing_required")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt.strip():
        return prompt
    if isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
        return prompt
    raise _type_error("prompt", "a non-empty string or a list of token ids", prompt)


def parse_request(body: dict, chat: bool, model_id: str, defaults: Sampling) -> Request:
    """Check a ``/v1/chat/completions`` (``chat``) or ``/v1/completions`` body; 404 for a model
    this server does not serve, 400 for anything missing, mistyped or out of range."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _type_error("model", "a string", model)
    if model is not None and model != model_id:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves "
                       f"{model_id!r}.", param="model", code="model_not_found")
    if body.get("n") not in (None, 1):
        raise ApiError(400, f"'n' must be 1 (one choice per request), got "
                       f"{json.dumps(body['n'])}.", param="n", code="invalid_value")
    for name in ("logprobs", "top_logprobs", "tools", "functions", "echo", "suffix"):
        if body.get(name) not in (None, False, [], 0):
            raise ApiError(400, f"'{name}' is not supported by this server.", param=name,
                           code="unsupported_parameter")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number({name: max_tokens}, name, 1, 2**31, integer=True)
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1)
    seed = _number(body, "seed", 0, 2**64 - 1, integer=True)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _type_error("stream_options", "an object", options)
    return Request(
        chat=chat, prompt=_messages(body) if chat else _prompt(body), max_tokens=max_tokens,
        temperature=defaults.temperature if temperature is None else float(temperature),
        top_p=defaults.top_p if top_p is None else float(top_p),
        seed=defaults.seed if seed is None else seed, stop=_stop(body),
        stream=_flag(body, "stream"), include_usage=_flag(options or {}, "include_usage"),
    )


# -- responses -----------------------------------------------------------------------------


def event_dict(event: SafetyEvent, dropped: int = 0) -> dict:
    """A safety event on the wire: ``kind``, ``step`` (response index; -1 is the query verdict),
    ``p``; a ``retracted`` event adds ``chars``, how many characters the client drops from the
    end of what it received; a ``surprisal-gate`` event ``nats``, the query's window surprisal."""
    out = {"kind": event.kind, "step": event.step,
           "p": None if event.p is None else round(float(event.p), 6)}
    if event.kind == "retracted":
        out["chars"] = dropped
    if event.nats is not None:
        out["nats"] = round(float(event.nats), 4)
    return out


def safety_object(query_p: Optional[float], inserted: bool, events: List[dict]) -> dict:
    return {"query_p": None if query_p is None else round(float(query_p), 6),
            "refusal_inserted": bool(inserted), "events": events}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _envelope(req: Request, model_id: str, chunk: bool) -> dict:
    kind = "chat.completion" if req.chat else "text_completion"
    return {"id": ("chatcmpl-" if req.chat else "cmpl-") + req.id,
            "object": kind + (".chunk" if chunk and req.chat else ""),
            "created": req.created, "model": model_id, "system_fingerprint": None}


def completion_body(req: Request, model_id: str, text: str, finish_reason: str,
                    usage_: dict, safety: dict) -> dict:
    """The whole (non-streamed) response."""
    if req.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "finish_reason": finish_reason, "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
    return {**_envelope(req, model_id, chunk=False), "choices": [choice], "usage": usage_,
            "safety": safety}


def chunk_body(req: Request, model_id: str, text: Optional[str] = None, *, first: bool = False,
               finish_reason: Optional[str] = None, safety: Optional[dict] = None,
               usage_: Optional[dict] = None) -> dict:
    """One streamed chunk: new ``text``, a ``finish_reason``, ``safety`` (events as they happen,
    the whole object on the last chunk); ``usage_`` alone makes the usage chunk (no choices)."""
    body = _envelope(req, model_id, chunk=True)
    if usage_ is not None:
        body["choices"], body["usage"] = [], usage_
    elif req.chat:
        delta = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        body["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                            "logprobs": None}]
    else:
        body["choices"] = [{"index": 0, "text": text or "", "finish_reason": finish_reason,
                            "logprobs": None}]
    if safety is not None:
        body["safety"] = safety
    return body
