"""The server under bad input and faults: OpenAI-style JSON errors with the right status for each
mistake, 429 with Retry-After on a full queue, a disconnecting client's row freed, SIGTERM
answering what is in flight, and a bounded load of 32 concurrent clients x 4 requests."""

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from conftest import write_model_dir
from test_server import client, endless_model, running

from mlx_safesig.server import Sampling

ROOT = Path(__file__).resolve().parent.parent
LONG = " ".join(["bread"] * 600)  # longer than the tiny model's context (512)
USER = [{"role": "user", "content": "Tell me a story"}]


@pytest.fixture(scope="module")
def server(tokenizer):
    with running(endless_model(), tokenizer, sampling=Sampling(max_tokens=4)) as s:
        yield s


def call(server, method, path, body=None, raw=None, headers=None):
    """(status, headers, JSON body) of one raw HTTP request."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers=headers or {})
    r = conn.getresponse()
    out = r.status, dict(r.getheaders()), json.loads(r.read())
    conn.close()
    return out


def health(server):
    return call(server, "GET", "/health")[2]


def wait_for(predicate, timeout=10.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


CHAT = "/v1/chat/completions"
ERRORS = [  # (path, body or raw bytes, status, param, code)
    (CHAT, b"{not json", 400, None, "invalid_json"),
    (CHAT, b"[1, 2]", 400, None, "invalid_json"),
    (CHAT, {"model": "tiny"}, 400, "messages", "missing_required"),
    (CHAT, {"messages": "hi"}, 400, "messages", "invalid_type"),
    (CHAT, {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role",
     "invalid_value"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content",
     "invalid_type"),
    (CHAT, {"messages": USER, "max_tokens": "ten"}, 400, "max_tokens", "invalid_type"),
    (CHAT, {"messages": USER, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    (CHAT, {"messages": USER, "temperature": True}, 400, "temperature", "invalid_type"),
    (CHAT, {"messages": USER, "temperature": 3}, 400, "temperature", "invalid_value"),
    (CHAT, {"messages": USER, "top_p": 1.5}, 400, "top_p", "invalid_value"),
    (CHAT, {"messages": USER, "seed": -1}, 400, "seed", "invalid_value"),
    (CHAT, {"messages": USER, "stop": ["a", ""]}, 400, "stop", "invalid_type"),
    (CHAT, {"messages": USER, "stream": "yes"}, 400, "stream", "invalid_type"),
    (CHAT, {"messages": USER, "n": 2}, 400, "n", "invalid_value"),
    (CHAT, {"messages": [{"role": "system", "content": "only a system prompt"}]}, 400,
     "messages", "invalid_prompt"),
    (CHAT, {"messages": USER, "max_tokens": 600}, 400, "max_tokens", "context_length_exceeded"),
    (CHAT, {"messages": [{"role": "user", "content": LONG}]}, 413, "messages",
     "context_length_exceeded"),
    ("/v1/completions", {"prompt": LONG}, 413, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", "invalid_type"),
    ("/v1/completions", {"prompt": [5, 320]}, 400, "prompt", "invalid_value"),
    (CHAT, {"model": "gpt-4", "messages": USER}, 404, "model", "model_not_found"),
    ("/v1/embeddings", {"input": "hi"}, 404, None, "not_found"),
]


@pytest.mark.parametrize("path,body,status,param,code", ERRORS,
                         ids=[f"{e[2]}-{e[4]}-{e[3]}" for e in ERRORS])
def test_bad_requests_get_openai_errors(server, path, body, status, param, code):
    raw = body if isinstance(body, bytes) else None
    got, headers, payload = call(server, "POST", path, None if raw else body, raw=raw)
    assert got == status and headers["Content-Type"] == "application/json"
    assert set(payload) == {"error"}
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"]) == (param, code)
    assert error["type"] == "invalid_request_error"
    assert error["message"].endswith(".") and "Traceback" not in error["message"]


def test_error_messages_name_the_problem(server):
    _, _, body = call(server, "POST", CHAT, {"messages": USER, "temperature": 3})
    assert body["error"]["message"] == "'temperature' must be between 0 and 2, got 3."
    _, _, body = call(server, "POST", CHAT, {"messages": [{"role": "user", "content": LONG}]})
    assert re.fullmatch(r"the prompt has \d+ tokens but the model's context is 512 tokens\.",
                        body["error"]["message"])
    _, _, body = call(server, "POST", CHAT, {"model": "gpt-4", "messages": USER})
    assert body["error"]["message"] == "the model 'gpt-4' does not exist; this server serves 'tiny'."


def test_the_openai_client_raises_its_own_exceptions(server):
    c = client(server)
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-4", messages=USER)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=USER, top_p=2)
    assert e.value.body["param"] == "top_p"


def test_http_level_mistakes_are_json_too(server):
    status, _, body = call(server, "PUT", CHAT, {"messages": USER})
    assert status == 501 and body["error"]["code"] == "not_implemented"
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.putrequest("POST", CHAT)  # no Content-Length
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 411 and json.loads(r.read())["error"]["code"] == "length_required"


def test_a_generation_fault_is_a_500_and_the_server_goes_on(tokenizer):
    with running(endless_model(), tokenizer) as s:
        def broken():
            raise RuntimeError("simulated fault")

        s.worker.engine.next = broken
        status, _, body = call(s, "POST", CHAT, {"messages": USER, "max_tokens": 3})
        assert status == 500 and body["error"]["type"] == "server_error"
        assert body["error"]["message"] == "generation failed: RuntimeError: simulated fault"
        r = client(s).chat.completions.create(model="tiny", messages=USER, max_tokens=3)
        assert r.usage.completion_tokens == 3


def test_health_reports_the_batch(server):
    status, _, body = call(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["model"] == "tiny"
    assert body["running"] == 0 and body["waiting"] == 0


def test_a_full_queue_gets_429_with_retry_after(tokenizer):
    with running(endless_model(), tokenizer, max_batch=1, max_queue=1) as s:
        c = client(s)
        stream = c.chat.completions.create(model="tiny", messages=USER, max_tokens=450,
                                           stream=True)
        next(iter(stream))  # the one row of the batch is taken
        waiting = {}
        queued = threading.Thread(target=lambda: waiting.update(r=c.chat.completions.create(
            model="tiny", messages=USER, max_tokens=2)))
        queued.start()
        wait_for(lambda: health(s)["waiting"] == 1)
        status, headers, body = call(s, "POST", CHAT, {"messages": USER})
        assert status == 429 and headers["Retry-After"] == "1"
        assert (body["error"]["type"], body["error"]["code"]) == ("rate_limit_error", "queue_full")
        with pytest.raises(openai.RateLimitError):
            c.chat.completions.create(model="tiny", messages=USER)
        stream.close()  # the client goes away: the queued request gets its row
        queued.join(30)
        assert waiting["r"].usage.completion_tokens == 2
        assert health(s)["rejected"] == 2


def test_a_client_that_disconnects_mid_stream_frees_its_row(tokenizer):
    with running(endless_model(), tokenizer) as s:
        stream = client(s).chat.completions.create(model="tiny", messages=USER, max_tokens=450,
                                                   stream=True)
        chunks = iter(stream)
        next(chunks), next(chunks)
        assert health(s)["running"] == 1
        stream.close()
        wait_for(lambda: health(s)["running"] == 0)
        counts = health(s)
        assert counts.get("cancelled") == 1 and "completed" not in counts
        assert not s.worker.engine.rows and not s.worker.engine.joining


def rss_kb() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))


def test_32_concurrent_clients_are_all_answered_in_bounded_time_and_memory(tokenizer):
    clients, per_client, max_tokens = 32, 4, 8
    with running(endless_model(), tokenizer) as s:
        c = client(s, timeout=60)

        def ask(i):
            messages = [{"role": "user", "content": f"Tell me a story number {i}"}]
            if i % 2:
                chunks = list(c.chat.completions.create(
                    model="tiny", messages=messages, max_tokens=max_tokens, stream=True,
                    stream_options={"include_usage": True}))
                return chunks[-1].usage.completion_tokens, chunks[-1].model_extra["safety"]
            r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens)
            return r.usage.completion_tokens, r.model_extra["safety"]

        def client_run(k):
            return [ask(k * per_client + j) for j in range(per_client)]

        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(ask, range(clients)))  # warm-up: one request per client
            before = rss_kb()
            tic = time.monotonic()
            results = [r for rs in pool.map(client_run, range(clients), timeout=120) for r in rs]
        elapsed = time.monotonic() - tic
        assert len(results) == clients * per_client
        assert all(n == max_tokens and set(safety) == {"query_p", "refusal_inserted", "events"}
                   for n, safety in results)
        assert health(s)["completed"] == clients * (per_client + 1)
        assert elapsed < 120
        assert rss_kb() <= 1.2 * before


def test_sigterm_answers_the_request_in_flight_then_exits(tmp_path, tokenizer):
    path = write_model_dir(tmp_path / "m", endless_model(), tokenizer)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_safesig.cli", "server", "--model", str(path), "--port", "0",
         "--threshold", "0.999999"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in proc.stderr:
            m = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)
            if m:
                url = m.group(1)
                break
        assert url, "the server did not say where it listens"
        said = []  # the rest of its stderr, drained so a full pipe never blocks it
        drain = threading.Thread(target=lambda: said.extend(proc.stderr), daemon=True)
        drain.start()
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        stream = c.chat.completions.create(model=str(path), messages=USER, max_tokens=300,
                                           stream=True, stream_options={"include_usage": True})
        chunks = iter(stream)
        next(chunks)
        proc.send_signal(signal.SIGTERM)
        rest = list(chunks)
        assert rest[-1].usage.completion_tokens == 300
        assert rest[-2].choices[0].finish_reason == "length"
        with pytest.raises(openai.APIConnectionError):
            c.chat.completions.create(model=str(path), messages=USER, max_tokens=2)
        code = proc.wait(timeout=30)
        drain.join(timeout=10)
        assert code == 0, "".join(said[-20:])
    finally:
        proc.kill()
        proc.wait()


def test_server_command_refuses_no_safety(tmp_path, tokenizer):
    from click.testing import CliRunner

    from mlx_safesig.cli import main

    result = CliRunner().invoke(main, ["server", "--no-safety"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        "Error: the server runs with safety on (its responses carry the safety signal); for "
        "plain generation run mlx_lm.server on the same model directory.")


def test_server_command_warns_when_not_on_loopback(tmp_path, tokenizer, monkeypatch):
    from click.testing import CliRunner

    import mlx_safesig.server
    from mlx_safesig.cli import main

    path = write_model_dir(tmp_path / "m", endless_model(), tokenizer)
    calls = []
    monkeypatch.setattr(mlx_safesig.server, "serve", lambda *a, **kw: calls.append(kw))
    result = CliRunner().invoke(main, ["server", "--model", str(path), "--host", "0.0.0.0",
                                       "--port", "9999", "--temp", "0.5", "--max-tokens", "7"])
    assert result.exit_code == 0, result.output
    assert "warning: listening on 0.0.0.0, not loopback" in result.output
    (kw,) = calls
    assert (kw["host"], kw["port"], kw["model_id"]) == ("0.0.0.0", 9999, str(path))
    assert (kw["sampling"].temperature, kw["sampling"].max_tokens) == (0.5, 7)


def test_server_command_says_when_the_port_is_taken(tmp_path, tokenizer):
    import socket

    from click.testing import CliRunner

    from mlx_safesig.cli import main

    path = write_model_dir(tmp_path / "m", endless_model(), tokenizer)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["server", "--model", str(path), "--port", str(port)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"Error: cannot listen on 127.0.0.1:{port}: Address already in use.")
