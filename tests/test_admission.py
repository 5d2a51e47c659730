"""Admission control over loopback: the cap, the queue, the refusals, and slots given back.

The backend is an in-process stand-in that holds every call until the test releases it,
so exactly how many calls are in flight and how many wait is known at each step. The
refusals are checked in each dialect's shape, the Ollama one with the official client.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest
from fastapi import FastAPI

from coheara import Engine, Settings
from coheara.audit import AuditLog
from coheara.errors import BackendError, ServerBusyError
from coheara.server import create_app
from coheara.server.admission import OLLAMA_BUSY, Admission
from fakes.stand_in import StandIn
from servers import serve

GENERATE = {"prompt": "ping"}
OPENAI_CHAT = {"model": "medgemma", "messages": [{"role": "user", "content": "ping"}]}
OLLAMA_CHAT = {
    "model": "medgemma",
    "messages": [{"role": "user", "content": "ping"}],
    "stream": False,
}


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


@contextmanager
def server(
    backend: StandIn, audit: AuditLog | None = None, **settings: Any
) -> Iterator[tuple[str, Admission]]:
    app: FastAPI = create_app(Engine(backend, Settings(**settings)), audit=audit)
    with serve(app) as url:
        yield url, app.state.admission


async def fill(url: str, count: int, path: str = "/v1/generate") -> list[asyncio.Task[Any]]:
    """`count` requests sent at once, left running (the client lives as long as they do)."""
    client = httpx.AsyncClient(base_url=url, timeout=30)

    async def one(i: int) -> httpx.Response:
        return await client.post(path, json={"prompt": f"ping {i}"})

    tasks = [asyncio.create_task(one(i)) for i in range(count)]
    closing = asyncio.create_task(_close_after(client, list(tasks)))
    await asyncio.sleep(0)
    return [*tasks, closing]


async def _close_after(client: httpx.AsyncClient, tasks: list[asyncio.Task[Any]]) -> None:
    await asyncio.gather(*tasks, return_exceptions=True)
    await client.aclose()


async def settle(admission: Admission, in_flight: int, waiting: int) -> None:
    async with asyncio.timeout(10):
        while (admission.in_flight, admission.waiting) != (in_flight, waiting):
            await asyncio.sleep(0.005)


async def occupy(
    url: str, admission: Admission, backend: StandIn, in_flight: int, waiting: int = 0
) -> list[asyncio.Task[Any]]:
    """Fill every slot (and `waiting` places in the queue) with held requests; the
    backend has them all in hand before this returns."""
    running = await fill(url, in_flight + waiting)
    await settle(admission, in_flight=in_flight, waiting=waiting)
    await backend.wait_for_active(in_flight)
    return running


# ----- the cap and the queue --------------------------------------------------------------


def test_slots_are_concurrency_times_endpoints_and_the_queue_is_bounded() -> None:
    backend = StandIn(gated=True, endpoints=2)

    async def scenario(url: str, admission: Admission) -> None:
        assert admission.slots == 4  # max_concurrency 2 x 2 endpoints
        running = await occupy(url, admission, backend, 4, waiting=3)
        await asyncio.sleep(0.05)
        assert backend.active == 4  # the 3 waiting have not reached the backend
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            refused = await client.post("/v1/generate", json=GENERATE)
            assert refused.status_code == 429
            assert int(refused.headers["Retry-After"]) >= 1
            assert refused.json()["error"]["code"] == "server_busy"
            assert refused.headers["X-Request-ID"]
            backend.release()
            answers = await asyncio.gather(*running[:-1])
        assert sorted(r.json()["text"] for r in answers) == [f"pong ping {i}" for i in range(7)]
        assert backend.peak == 4
        await settle(admission, in_flight=0, waiting=0)

    with server(backend, max_concurrency=2, max_queue=3) as (url, admission):
        asyncio.run(scenario(url, admission))


@pytest.mark.parametrize(
    ("path", "body", "shape"),
    [
        ("/v1/chat/completions", OPENAI_CHAT, {"message", "type", "param", "code"}),
        ("/v1/tasks/SLM-04", {"input": {}}, {"message", "type", "param", "code"}),
        ("/v1/extract", {"prompt": "x", "schema": {"type": "object"}}, {"code", "message"}),
    ],
)
def test_every_surface_refuses_with_429_and_retry_after(
    path: str, body: dict[str, Any], shape: set[str]
) -> None:
    backend = StandIn(gated=True)

    async def scenario(url: str, admission: Admission) -> None:
        running = await occupy(url, admission, backend, 1)
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            refused = await client.post(path, json=body)
        backend.release()
        await asyncio.gather(*running)
        assert refused.status_code == 429, refused.text
        assert refused.headers["Retry-After"].isdigit()
        assert refused.json()["error"]["code"] == "server_busy"
        assert set(refused.json()["error"]) == shape  # the dialect's own error shape

    with server(backend, max_concurrency=1, max_queue=0) as (url, admission):
        asyncio.run(scenario(url, admission))


def test_the_official_clients_see_429_and_ollamas_own_503() -> None:
    backend = StandIn(gated=True)

    async def scenario(url: str, admission: Admission) -> None:
        running = await occupy(url, admission, backend, 1)
        chat = ollama.AsyncClient(host=url)
        with pytest.raises(ollama.ResponseError) as ollama_error:
            await chat.chat(model="medgemma", messages=[{"role": "user", "content": "ping"}])
        assert ollama_error.value.status_code == 503
        assert ollama_error.value.error == OLLAMA_BUSY
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            raw = await client.post("/api/chat", json=OLLAMA_CHAT)
        assert raw.status_code == 503 and raw.headers["Retry-After"].isdigit()
        assert raw.json() == {"error": OLLAMA_BUSY}
        compatible = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError) as openai_error:
            await compatible.chat.completions.create(
                model="medgemma", messages=[{"role": "user", "content": "ping"}]
            )
        assert openai_error.value.status_code == 429
        assert openai_error.value.response.headers["Retry-After"].isdigit()
        await compatible.close()
        backend.release()
        await asyncio.gather(*running)

    with server(backend, max_concurrency=1, max_queue=0) as (url, admission):
        asyncio.run(scenario(url, admission))


def test_a_wait_past_the_queue_timeout_is_refused_and_leaves_the_line() -> None:
    backend = StandIn(gated=True)

    async def scenario(url: str, admission: Admission) -> None:
        running = await occupy(url, admission, backend, 1)
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            late = await client.post("/v1/generate", json=GENERATE)
        assert late.status_code == 429
        assert "no slot freed within 0.2 s" in late.json()["error"]["message"]
        assert (admission.in_flight, admission.waiting) == (1, 0)
        backend.release()
        (first,) = await asyncio.gather(*running[:-1])
        assert first.status_code == 200
        await settle(admission, in_flight=0, waiting=0)

    with server(backend, max_concurrency=1, max_queue=4, queue_timeout_s=0.2) as (url, admission):
        asyncio.run(scenario(url, admission))


def test_a_refusal_is_audited_as_server_busy_with_its_request_id(tmp_path: Path) -> None:
    backend = StandIn(gated=True)
    log = AuditLog.open(tmp_path / "a.sqlite3")

    async def scenario(url: str, admission: Admission) -> None:
        running = await occupy(url, admission, backend, 1)
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            refused = await client.post(
                "/api/chat", json=OLLAMA_CHAT, headers={"X-Request-ID": "busy-1"}
            )
        assert refused.status_code == 503 and refused.headers["X-Request-ID"] == "busy-1"
        backend.release()
        await asyncio.gather(*running)

    try:
        with server(backend, log, max_concurrency=1, max_queue=0) as (url, admission):
            asyncio.run(scenario(url, admission))
        log.flush()
        store = log.reader()
        records = list(store.iter_records())
        store.close()
    finally:
        log.close()
    busy = [r for r in records if r.outcome == "server_busy"]
    assert [(r.request_id, r.surface, r.error_class) for r in busy] == [
        ("busy-1", "ollama", "ServerBusyError")
    ]
    assert [r.outcome for r in records if r.request_id != "busy-1"] == ["ok"]


# ----- slots given back ------------------------------------------------------------------------


def test_a_client_that_hangs_up_gives_its_slot_back() -> None:
    backend = StandIn(gated=True)
    with server(backend, max_concurrency=1, max_queue=0) as (url, admission):
        host, port = url.removeprefix("http://").split(":")
        body = b'{"prompt": "ping"}'
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            wait_until(lambda: backend.active == 1)
            assert admission.in_flight == 1
        wait_until(lambda: admission.in_flight == 0)
        assert backend.cancelled == 1
        backend.release()
        answer = httpx.post(f"{url}/v1/generate", json=GENERATE, timeout=30)
        assert answer.status_code == 200 and answer.json()["text"] == "pong ping"


def test_a_stream_holds_its_slot_until_it_is_completely_sent() -> None:
    backend = StandIn(gated=True)

    async def scenario(url: str, admission: Admission) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:

            async def streamed() -> list[str]:
                body = {**OLLAMA_CHAT, "stream": True}
                async with client.stream("POST", "/api/chat", json=body) as response:
                    assert response.status_code == 200
                    return [line async for line in response.aiter_lines() if line]

            first = asyncio.create_task(streamed())
            await backend.wait_for_active(1)
            assert (await client.post("/api/chat", json=OLLAMA_CHAT)).status_code == 503
            backend.release()
            lines = await first
            assert '"done":true' in lines[-1].replace(" ", "")
            await settle(admission, in_flight=0, waiting=0)
            assert (await client.post("/api/chat", json=OLLAMA_CHAT)).status_code == 200

    with server(backend, max_concurrency=1, max_queue=0) as (url, admission):
        asyncio.run(scenario(url, admission))


@pytest.mark.parametrize(
    ("failure", "status"), [(BackendError("the runtime failed"), 502), (RuntimeError("boom"), 500)]
)
def test_a_failed_call_gives_its_slot_back(failure: Exception, status: int) -> None:
    backend = StandIn()
    backend.fail_with = failure
    with server(backend, max_concurrency=1, max_queue=0) as (url, admission):
        # A connection each: the ASGI server closes one after an unhandled error.
        for _ in range(3):  # with one slot, a leaked one would turn the next into a 429
            assert httpx.post(f"{url}/v1/generate", json=GENERATE).status_code == status
        assert admission.in_flight == 0
        backend.fail_with = None
        assert httpx.post(f"{url}/v1/generate", json=GENERATE).json()["text"] == "pong ping"


def test_a_body_over_the_limit_gives_its_slot_back() -> None:
    with (
        server(StandIn(), max_concurrency=1, max_queue=0, max_body_bytes=2048) as (url, admission),
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        for _ in range(2):
            big = client.post("/v1/generate", json={"prompt": "x" * 4096})
            assert big.status_code == 413
        assert admission.in_flight == 0
        assert client.post("/v1/generate", json=GENERATE).status_code == 200


# ----- the line itself --------------------------------------------------------------------------


def test_waiters_are_served_first_come_first_served_and_cancelled_ones_leak_nothing() -> None:
    async def scenario() -> None:
        admission = Admission(slots=1, max_queue=3, timeout_s=5)
        order: list[int] = []
        await admission.acquire()

        async def wait(i: int) -> None:
            await admission.acquire()
            order.append(i)
            admission.release()

        waiters = [asyncio.create_task(wait(i)) for i in range(3)]
        await asyncio.sleep(0.01)
        assert admission.waiting == 3
        with pytest.raises(ServerBusyError) as full:
            await admission.acquire()
        assert full.value.retry_after_s >= 1
        waiters[1].cancel()
        await asyncio.sleep(0)
        admission.release()
        await asyncio.gather(*waiters, return_exceptions=True)
        assert order == [0, 2]
        assert (admission.in_flight, admission.waiting) == (0, 0)

    asyncio.run(scenario())


# ----- limits -----------------------------------------------------------------------------------


LONG = "x" * 81


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/generate", {"prompt": LONG}),
        ("/v1/generate", {"system": "y" * 41, "messages": [{"role": "user", "content": "z" * 40}]}),
        (
            "/v1/chat/completions",
            {"model": "medgemma", "messages": [{"role": "user", "content": LONG}]},
        ),
        (
            "/v1/chat/completions",
            {
                "model": "medgemma",
                "messages": [{"role": "user", "content": [{"type": "text", "text": LONG}]}],
            },
        ),
        ("/api/chat", {"model": "medgemma", "messages": [{"role": "user", "content": LONG}]}),
        ("/api/generate", {"model": "medgemma", "prompt": LONG, "stream": False}),
        ("/v1/tasks/SLM-04", {"input": {"note": LONG}}),
    ],
)
def test_text_over_the_limit_is_a_413_on_every_surface(path: str, body: dict[str, Any]) -> None:
    backend = StandIn()
    with server(backend, max_text_chars=80) as (url, _):
        answer = httpx.post(f"{url}{path}", json=body, timeout=30)
    assert answer.status_code == 413, answer.text
    assert "characters of text; at most 80" in answer.text
    assert backend.started == 0  # refused before the model was called


def test_text_at_the_limit_is_served() -> None:
    with server(StandIn(), max_text_chars=80) as (url, _):
        answer = httpx.post(f"{url}/v1/generate", json={"prompt": "x" * 80}, timeout=30)
    assert answer.status_code == 200 and answer.json()["text"] == "pong " + "x" * 80
