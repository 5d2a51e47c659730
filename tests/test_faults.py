"""Fault injection through the HTTP server, over loopback, with the official clients.

Each fault (a backend killed mid-stream, one that hangs, one that closes the connection,
5xx bursts, a slow client, a client that goes away) must end in a clean error in the
client's dialect or a transparent failover, never a hang or a traceback; and every
request leaves exactly one audit record with the right outcome.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from coheara import Engine, Settings
from coheara.audit import AuditLog, AuditRecord
from coheara.backends.selection import create_backend
from coheara.errors import BackendTimeoutError
from coheara.server import create_app
from fakes import FakeOllama, OllamaModel
from fakes.faults import MODEL, Fault, FaultyOllama, replica_settings
from servers import serve

PROMPT = "Summarise: chest film, no findings."
MESSAGES = [{"role": "user", "content": PROMPT}]
WAIT_S = 15.0


def settings_for(urls: list[str], **overrides: Any) -> Settings:
    return replica_settings(urls, **overrides)


@contextmanager
def service(urls: list[str], tmp_path: Path, **overrides: Any) -> Iterator[tuple[str, AuditLog]]:
    """`coheara serve`'s app on the given backend URLs, with an audit trail."""
    settings = settings_for(urls, **overrides)
    engine = Engine(create_backend(settings), settings)
    audit = AuditLog.open(tmp_path / "a.sqlite3")
    try:
        with serve(create_app(engine, settings, audit=audit, close_engine=True)) as url:
            yield url, audit
    finally:
        audit.close()


@contextmanager
def faulty(*fakes: FaultyOllama) -> Iterator[list[str]]:
    with ExitStack() as stack:
        yield [stack.enter_context(fake.serve()) for fake in fakes]


def records(audit: AuditLog, expected: int) -> list[AuditRecord]:
    """The trail once it holds `expected` records (a stream's record is written when its
    generator closes, just after the client saw the end), read twice to catch a late one."""
    deadline = time.monotonic() + WAIT_S
    while True:
        assert audit.flush(WAIT_S)
        store = audit.reader()
        try:
            found = list(store.iter_records())
        finally:
            store.close()
        if len(found) >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    time.sleep(0.1)
    assert audit.flush(WAIT_S)
    store = audit.reader()
    try:
        return list(store.iter_records())
    finally:
        store.close()


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def ollama_client(url: str) -> ollama.Client:
    return ollama.Client(host=url, timeout=WAIT_S)


def openai_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=WAIT_S)


# ----- the backend fails ----------------------------------------------------------------


def test_a_backend_killed_mid_stream_ends_the_stream_with_an_error_line(tmp_path: Path) -> None:
    backend = FaultyOllama(default=Fault("cut", chunks=3))
    with faulty(backend) as urls, service(urls, tmp_path) as (url, audit):
        texts: list[str] = []
        with pytest.raises(ollama.ResponseError, match="connection lost mid-stream"):
            for part in ollama_client(url).chat(model="medgemma", messages=MESSAGES, stream=True):
                texts.append(part.message.content or "")
        assert "".join(texts) == "part0 part1 part2 "
        deltas: list[str] = []
        stream = openai_client(url).chat.completions.create(
            model="medgemma", messages=MESSAGES, stream=True
        )
        with pytest.raises(openai.APIError, match="connection lost mid-stream"):
            for chunk in stream:
                deltas.extend(c.delta.content or "" for c in chunk.choices)
        assert "".join(deltas) == "part0 part1 part2 "
        # The native dialect: the same error as its last NDJSON line.
        with httpx.stream(
            "POST", url + "/v1/generate", json={"prompt": PROMPT, "stream": True}, timeout=WAIT_S
        ) as response:
            assert response.status_code == 200
            lines = [json.loads(line) for line in response.iter_lines() if line]
        assert lines[-1]["error"]["code"] == "backend_error"
        trail = records(audit, 3)
    assert [(r.surface, r.outcome, r.error_class) for r in trail] == [
        ("ollama", "backend_error", "BackendError"),
        ("openai", "backend_error", "BackendError"),
        ("native", "backend_error", "BackendError"),
    ]
    assert len(backend.chats) == 3


def test_a_hanging_backend_is_a_first_token_timeout_504(tmp_path: Path) -> None:
    backend = FaultyOllama(default=Fault("hang"))
    with (
        faulty(backend) as urls,
        service(urls, tmp_path, first_token_timeout_s=0.3) as (url, audit),
    ):
        with pytest.raises(ollama.ResponseError, match="first-token timeout") as caught:
            ollama_client(url).chat(model="medgemma", messages=MESSAGES)
        assert caught.value.status_code == 504
        with pytest.raises(ollama.ResponseError) as caught:
            list(ollama_client(url).chat(model="medgemma", messages=MESSAGES, stream=True))
        assert caught.value.status_code == 504  # a stream fails before its status line
        with pytest.raises(openai.APIStatusError) as failed:
            openai_client(url).chat.completions.create(model="medgemma", messages=MESSAGES)
        assert failed.value.status_code == 504
        assert (
            isinstance(failed.value.body, dict) and failed.value.body["code"] == "backend_timeout"
        )
        # Each hung call was cancelled through to the backend's socket.
        wait_until(lambda: all(c.client_closed.is_set() for c in backend.chats), "closes")
        trail = records(audit, 3)
    assert len(backend.chats) == 3
    assert [(r.outcome, r.error_class) for r in trail] == [
        ("backend_timeout", "BackendTimeoutError")
    ] * 3


def test_a_backend_closing_without_an_answer_is_a_clean_502(tmp_path: Path) -> None:
    backend = FaultyOllama(default=Fault("close"))
    with faulty(backend) as urls, service(urls, tmp_path) as (url, audit):
        with pytest.raises(openai.APIStatusError) as failed:
            openai_client(url).chat.completions.create(model="medgemma", messages=MESSAGES)
        assert failed.value.status_code == 502
        assert "before it answered" in failed.value.message
        response = httpx.post(url + "/api/generate", json={"model": "medgemma", "prompt": PROMPT})
        assert response.status_code == 502 and "error" in response.json()
        trail = records(audit, 2)
    assert [(r.outcome, r.error_class) for r in trail] == [("backend_error", "BackendError")] * 2


def test_a_backend_closing_without_an_answer_fails_over_to_a_replica(tmp_path: Path) -> None:
    closing, healthy = FaultyOllama(default=Fault("close")), FaultyOllama()
    with faulty(closing, healthy) as urls, service(urls, tmp_path) as (url, audit):
        response = httpx.post(url + "/v1/generate", json={"prompt": PROMPT}, timeout=WAIT_S)
        assert response.status_code == 200
        body = response.json()
        assert body["text"] == "part0 part1 part2 end."
        assert (body["endpoint"], body["failovers"]) == (urls[1], 1)
        reply = ollama_client(url).chat(model="medgemma", messages=MESSAGES)
        assert reply.message.content == "part0 part1 part2 end."
        trail = records(audit, 2)
    assert [r.outcome for r in trail] == ["ok", "ok"]
    assert (len(closing.chats), len(healthy.chats)) == (1, 2)


def test_5xx_bursts_fail_over(tmp_path: Path) -> None:
    bursting = FaultyOllama(script=[Fault("status", status=500)] * 3)
    healthy = FaultyOllama()
    with (
        faulty(bursting, healthy) as urls,
        service(urls, tmp_path, eject_after_failures=3) as (url, audit),
    ):
        bodies = [
            httpx.post(url + "/v1/generate", json={"prompt": PROMPT}, timeout=WAIT_S).json()
            for _ in range(6)
        ]
        client = openai_client(url)
        replies = [client.chat.completions.create(model="medgemma", messages=MESSAGES)]
        ready = httpx.get(url + "/readyz", timeout=WAIT_S).json()
        trail = records(audit, 7)
    # Calls 1, 3 and 5 start on the bursting replica and fail over; its third failure in a
    # row takes it out of rotation, so the last calls all go to the healthy one.
    assert [b["failovers"] for b in bodies] == [1, 0, 1, 0, 1, 0]
    assert {b["endpoint"] for b in bodies} == {urls[1]}
    assert replies[0].choices[0].message.content == "part0 part1 part2 end."
    assert (len(bursting.chats), len(healthy.chats)) == (3, 7)
    assert [(e["healthy"], e["consecutive_failures"]) for e in ready["endpoints"]] == [
        (False, 3),
        (True, 0),
    ]
    assert [r.outcome for r in trail] == ["ok"] * 7


# ----- the client misbehaves -----------------------------------------------------------


def test_a_slow_client_does_not_block_other_requests(tmp_path: Path) -> None:
    backend = FaultyOllama(script=[Fault("ok", chunks=4000)])
    with faulty(backend) as urls, service(urls, tmp_path) as (url, audit):
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps({"model": "medgemma", "messages": MESSAGES, "stream": True}).encode()
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.settimeout(WAIT_S)
        try:
            slow.connect(("127.0.0.1", port))
            slow.sendall(
                b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            received = slow.recv(1024)
            assert received.startswith(b"HTTP/1.1 200")
            # The slow client reads nothing more (its 4 KiB window holds a fraction of the
            # half-megabyte reply): its stream stalls in the server's send, while another
            # request is served.
            wait_until(lambda: len(backend.chats) == 1, "the slow stream to start")
            reply = ollama_client(url).chat(model="medgemma", messages=MESSAGES)
            assert reply.message.content == "part0 part1 part2 end."
            # Now it reads to the end: nothing was lost.
            chunks = [received]
            while not b"".join(chunks[-2:]).endswith(b"0\r\n\r\n"):
                chunk = slow.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            slow.close()
        text = b"".join(chunks)
        # 4000 parts and the closing text, then the final line: nothing lost.
        assert text.count(b'"done":false') == 4001 and b'"done":true' in text
        assert b'"content":"part3999 "' in text
        trail = records(audit, 2)
    assert [r.outcome for r in trail] == ["ok", "ok"]


def test_a_client_that_disconnects_cancels_the_backend_call(tmp_path: Path) -> None:
    backend = FaultyOllama(default=Fault("slow", chunks=400, delay_s=0.05))
    with faulty(backend) as urls, service(urls, tmp_path) as (url, audit):
        with httpx.stream(
            "POST",
            url + "/api/chat",
            json={"model": "medgemma", "messages": MESSAGES},
            timeout=WAIT_S,
        ) as response:
            lines = response.iter_lines()
            assert json.loads(next(lines))["done"] is False
            assert json.loads(next(lines))["done"] is False
        wait_until(backend.chats[0].client_closed.is_set, "the backend to see the disconnect")
        stream = openai_client(url).chat.completions.create(
            model="medgemma", messages=MESSAGES, stream=True
        )
        iterator = iter(stream)
        next(iterator), next(iterator)
        stream.close()
        wait_until(lambda: len(backend.chats) == 2, "the second call")
        wait_until(backend.chats[1].client_closed.is_set, "the backend to see the disconnect")
        trail = records(audit, 2)
    assert not any(chat.finished for chat in backend.chats)
    assert [(r.surface, r.outcome) for r in trail] == [
        ("ollama", "cancelled"),
        ("openai", "cancelled"),
    ]


# ----- the phases, on the engine --------------------------------------------------------


async def test_the_total_timeout_bounds_the_whole_call() -> None:
    backend = FaultyOllama(default=Fault("slow", chunks=400, delay_s=0.05))
    with faulty(backend) as urls:
        settings = settings_for(urls, timeout_s=0.5)
        async with Engine(create_backend(settings), settings) as engine:
            with pytest.raises(BackendTimeoutError, match="total timeout") as caught:
                await engine.generate(PROMPT)
        assert caught.value.details == {"phase": "total", "timeout_s": 0.5}
        assert backend.chats[0].client_closed.wait(WAIT_S)
    assert not backend.chats[0].finished


async def test_the_first_token_timeout_applies_to_the_in_process_backend(
    tiny_model_dir: Path,
) -> None:
    from coheara.backends.transformers_backend import TransformersBackend

    settings = Settings(max_output_tokens=4, first_token_timeout_s=1e-6)
    async with Engine(TransformersBackend(str(tiny_model_dir)), settings) as engine:
        with pytest.raises(BackendTimeoutError, match="first-token timeout") as caught:
            await engine.generate(PROMPT)
        assert caught.value.details["phase"] == "first_token"
        engine.settings = Settings(max_output_tokens=4)
        result = await engine.generate(PROMPT)  # the cancelled call left nothing behind
        assert result.output_tokens > 0 and result.endpoint == "transformers"


async def test_a_result_names_its_single_endpoint() -> None:
    fake = FakeOllama({MODEL: OllamaModel()})
    with serve(fake.app) as url:
        settings = settings_for([url])
        async with Engine(create_backend(settings), settings) as engine:
            result = await engine.generate(PROMPT)
    assert result.failovers == 0 and result.endpoint in ("ollama", url)
