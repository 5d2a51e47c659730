"""Replicas behind one backend, against real fake runtimes over loopback: least-busy
routing, failover before the first token, ejection and return, endpoints(), /readyz, the
egress guard on every replica URL."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from coheara import Engine, Settings, model_facts
from coheara.audit import AuditLog
from coheara.backends.pool import PooledBackend, public_url
from coheara.backends.selection import create_backend
from coheara.errors import (
    BackendError,
    BackendOverloadedError,
    ConfigurationError,
    ContextOverflowError,
    InvalidRequestError,
)
from coheara.server import create_app
from fakes import FakeOpenAI, OllamaModel, OpenAIModel
from fakes.fake_ollama import OVERFLOW_MESSAGE
from fakes.faults import ScriptedOllama, replica_settings, unresponsive_port
from servers import free_port, serve

MODEL = model_facts.DEFAULT_OLLAMA_MODEL
PROMPT = "Summarise: chest film, no findings."
WAIT_S = 10.0


def scripted() -> ScriptedOllama:
    return ScriptedOllama({MODEL: OllamaModel()})


@pytest.fixture(scope="module")
def replicas() -> Iterator[list[tuple[ScriptedOllama, str]]]:
    """Two healthy fake Ollama servers, reset before each test."""
    first, second = scripted(), scripted()
    with serve(first.app) as url_a, serve(second.app) as url_b:
        yield [(first, url_a), (second, url_b)]


@pytest.fixture
def a_b(replicas: list[tuple[ScriptedOllama, str]]) -> list[tuple[ScriptedOllama, str]]:
    for fake, _ in replicas:
        fake.reset()
    return replicas


def settings_for(urls: list[str], **overrides: Any) -> Settings:
    defaults = {"eject_after_failures": 2, "ollama_model": MODEL}
    return replica_settings(urls, **{**defaults, **overrides})


@pytest.fixture
async def make_engine() -> AsyncIterator[Callable[..., Engine]]:
    made: list[Engine] = []

    def make(urls: list[str], **overrides: Any) -> Engine:
        settings = settings_for(urls, **overrides)
        engine = Engine(create_backend(settings), settings)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        await engine.aclose()


def pool_of(engine: Engine) -> PooledBackend:
    assert isinstance(engine.backend, PooledBackend)
    return engine.backend


def chats(fake: ScriptedOllama) -> int:
    return len(fake.chat_bodies)


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


# ----- building the pool ---------------------------------------------------------------


def test_replicas_build_one_endpoint_per_url_in_order() -> None:
    settings = settings_for(
        ["http://127.0.0.1:1", "http://127.0.0.1:2", "127.0.0.1:3", "http://127.0.0.1:2"]
    )
    backend = create_backend(settings)
    assert isinstance(backend, PooledBackend)
    assert backend.name == "ollama" and backend.model == MODEL
    names = [e.name for e in backend.endpoints()]
    # The configured URL first, the replicas after, a repeated one once, host:port read
    # as Ollama reads it.
    assert names == ["http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"]
    assert all(e.healthy is None and e.in_flight == 0 for e in backend.endpoints())


def test_the_egress_guard_refuses_a_replica_url() -> None:
    urls = ["http://127.0.0.1:11434", "http://10.20.30.40:11434"]
    with pytest.raises(ConfigurationError, match=r"10\.20\.30\.40"):
        create_backend(settings_for(urls))
    with pytest.raises(ConfigurationError, match=r"10\.20\.30\.40"):
        create_backend(settings_for(urls, backend="openai", openai_url="http://127.0.0.1:8000/v1"))
    with pytest.raises(ConfigurationError, match=r"10\.20\.30\.40"):
        create_backend(settings_for(urls, backend="auto"))  # refused at start-up too
    allowed = create_backend(settings_for(urls, allowed_backend_hosts=["10.20.30.0/24"]))
    assert [e.name for e in allowed.endpoints()][1] == "http://10.20.30.40:11434"


def test_replicas_with_the_in_process_backend_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="backend_replicas"):
        urls = ["http://127.0.0.1:1", "http://127.0.0.1:2"]
        create_backend(settings_for(urls, backend="transformers", transformers_model="/m"))


def test_endpoint_names_never_carry_credentials() -> None:
    url = "http://clinic:s3cret-pass@127.0.0.1:8001/v1"
    assert public_url(url) == "http://127.0.0.1:8001/v1"
    settings = settings_for(
        ["http://127.0.0.1:8000/v1", url], backend="openai", openai_url="http://127.0.0.1:8000/v1"
    )
    backend = create_backend(settings)
    assert [e.name for e in backend.endpoints()] == [
        "http://127.0.0.1:8000/v1",
        "http://127.0.0.1:8001/v1",
    ]


# ----- routing ------------------------------------------------------------------------


async def test_least_busy_routing(
    a_b: list[tuple[ScriptedOllama, str]], make_engine: Callable[..., Engine]
) -> None:
    (a, url_a), (b, url_b) = a_b
    engine = make_engine([url_a, url_b])
    pool = pool_of(engine)
    a.gate = gate = threading.Event()
    try:
        held = asyncio.ensure_future(engine.generate(PROMPT))
        await wait_until(lambda: pool.endpoints()[0].in_flight == 1, "the first call on A")
        busy = {e.name: e.in_flight for e in pool.endpoints()}
        assert busy == {url_a: 1, url_b: 0}
        # A is busy: every further call goes to B, however often the turn comes round.
        results = [await engine.generate(PROMPT) for _ in range(3)]
        assert [r.endpoint for r in results] == [url_b] * 3
        assert chats(b) == 3
    finally:
        gate.set()
    first = await asyncio.wait_for(held, WAIT_S)
    assert first.endpoint == url_a and first.failovers == 0
    assert (chats(a), chats(b)) == (1, 3)
    assert [e.in_flight for e in pool.endpoints()] == [0, 0]
    # Concurrent calls, all held in flight: they spread two and two.
    a.gate = b.gate = gate = threading.Event()
    try:
        together = asyncio.gather(*(engine.generate(PROMPT) for _ in range(4)))
        await wait_until(
            lambda: sum(e.in_flight for e in pool.endpoints()) == 4, "four calls in flight"
        )
        assert [e.in_flight for e in pool.endpoints()] == [2, 2]
    finally:
        gate.set()
    results = await asyncio.wait_for(together, WAIT_S)
    assert sorted(r.endpoint or "" for r in results) == sorted([url_a, url_b] * 2)
    assert (chats(a), chats(b)) == (3, 5)


async def test_failover_on_connection_refused_is_transparent(
    a_b: list[tuple[ScriptedOllama, str]], make_engine: Callable[..., Engine]
) -> None:
    (_, url_b) = a_b[1]
    dead = closed_port_url()
    engine = make_engine([dead, url_b], eject_after_failures=5)
    result = await engine.generate(PROMPT)
    assert result.text == a_b[1][0].reply
    assert result.endpoint == url_b and result.failovers == 1
    status = {e.name: e for e in engine.backend.endpoints()}
    assert status[dead].consecutive_failures == 1 and status[url_b].consecutive_failures == 0
    assert status[url_b].healthy is True


async def test_failover_between_openai_compatible_replicas(
    make_engine: Callable[..., Engine],
) -> None:
    """The same for vLLM-style replicas, through the official `openai` client's errors."""
    fake = FakeOpenAI({"medgemma-vllm": OpenAIModel()})
    with serve(fake.app) as url:
        dead = closed_port_url() + "/v1"
        engine = make_engine(
            [dead, url + "/v1"],
            backend="openai",
            openai_url=dead,
            openai_model="medgemma-vllm",
        )
        result = await engine.generate(PROMPT)
        await engine.aclose()
    assert result.text == fake.reply
    assert (result.endpoint, result.failovers) == (url + "/v1", 1)
    assert len(fake.chat_bodies) == 1


async def test_failover_on_a_connect_timeout(
    a_b: list[tuple[ScriptedOllama, str]], make_engine: Callable[..., Engine]
) -> None:
    """connect_timeout_s really bounds the connect phase, and that phase fails over."""
    (b, url_b) = a_b[1]
    with unresponsive_port() as port:
        stuck = f"http://127.0.0.1:{port}"
        engine = make_engine([stuck, url_b], connect_timeout_s=0.3, timeout_s=60.0)
        result = await engine.generate(PROMPT)
    assert result.endpoint == url_b and result.failovers == 1
    assert chats(b) == 1


async def test_failover_on_a_5xx_burst(
    a_b: list[tuple[ScriptedOllama, str]], make_engine: Callable[..., Engine]
) -> None:
    (a, url_a), (b, url_b) = a_b
    a.fail_next = 3
    engine = make_engine([url_a, url_b], eject_after_failures=10)
    results = [await engine.generate(PROMPT) for _ in range(4)]
    assert all(r.text == b.reply for r in results)
    # The turn rotates: calls 1 and 3 started on A (500, failed over), 2 and 4 on B; A is
    # tried a third time only on call 5.
    assert [(r.endpoint, r.failovers) for r in results] == [(url_b, 1), (url_b, 0)] * 2
    assert (chats(a), chats(b)) == (2, 4)
    assert pool_of(engine).endpoints()[0].consecutive_failures == 2


async def test_every_endpoint_failing_returns_the_last_error(
    a_b: list[tuple[ScriptedOllama, str]], make_engine: Callable[..., Engine]
) -> None:
    (a, url_a), (b, url_b) = a_b
    a.fail_next = b.fail_next = 1
    engine = make_engine([url_a, url_b], eject_after_failures=10)
    with pytest.raises(BackendError, match="HTTP 500") as caught:
        await engine.generate(PROMPT)
    assert caught.value.details["endpoints_tried"] == 2
    assert (chats(a), chats(b)) == (1, 1)  # each endpoint at most once per call


async def test_ejection_after_failures_and_return_after_the_health_check(
    a_b: list[tuple[ScriptedOllama, str]], make_engine: Callable[..., Engine]
) -> None:
    (a, url_a), (_, url_b) = a_b
    a.down = True  # 503 on every route
    engine = make_engine([url_a, url_b], eject_after_failures=2)
    pool = pool_of(engine)
    for _ in range(3):
        result = await engine.generate(PROMPT)
        assert result.endpoint == url_b
    # Calls 1 and 3 started on A (the turn rotates); two failures took it out of rotation
    # before call 3, so A saw exactly two chats.
    assert chats(a) == 2
    status = pool.endpoints()[0]
    assert (status.healthy, status.consecutive_failures) == (False, 2)
    for _ in range(2):
        await engine.generate(PROMPT)
    assert chats(a) == 2
    # Back up: the next health check brings it back, and the rotation reaches it again.
    a.down = False
    await pool.refresh()
    status = pool.endpoints()[0]
    assert (status.healthy, status.consecutive_failures) == (True, 1)  # on probation
    endpoints = {(await engine.generate(PROMPT)).endpoint for _ in range(2)}
    assert endpoints == {url_a, url_b}
    assert pool.endpoints()[0].consecutive_failures == 0  # a call succeeded: cleared


async def test_a_replica_back_on_probation_is_out_again_after_one_failed_call(
    a_b: list[tuple[ScriptedOllama, str]], make_engine: Callable[..., Engine]
) -> None:
    (a, url_a), (_, url_b) = a_b
    engine = make_engine([url_a, url_b], eject_after_failures=3)
    pool = pool_of(engine)
    a.fail_next = 3  # its chats fail, its health check passes
    for _ in range(10):  # bounded: the rotation reaches A within a few calls
        assert (await engine.generate(PROMPT)).endpoint == url_b
        if pool.endpoints()[0].healthy is False:
            break
    assert chats(a) == 3 and pool.endpoints()[0].healthy is False
    a.fail_next = 1
    await pool.refresh()
    assert (pool.endpoints()[0].healthy, pool.endpoints()[0].consecutive_failures) == (True, 2)
    for _ in range(10):
        assert (await engine.generate(PROMPT)).endpoint == url_b  # failed over
        if chats(a) == 4:
            break
    assert pool.endpoints()[0].healthy is False  # one failure, not three, took it out


async def test_the_health_loop_takes_out_and_brings_back(
    a_b: list[tuple[ScriptedOllama, str]], make_engine: Callable[..., Engine]
) -> None:
    (a, url_a), (_, url_b) = a_b
    engine = make_engine([url_a, url_b], health_interval_s=0.05)
    pool = pool_of(engine)
    assert (await pool.health()).ok  # starts the loop inside this event loop
    a.down = True
    await wait_until(lambda: pool.endpoints()[0].healthy is False, "A taken out")
    assert pool.endpoints()[1].healthy is True
    a.down = False
    await wait_until(lambda: pool.endpoints()[0].healthy is True, "A brought back")
    await engine.aclose()  # stops the loop: no more checks
    await asyncio.sleep(0.1)
    checks = len(a.bodies("/api/version"))
    await asyncio.sleep(0.3)
    assert len(a.bodies("/api/version")) == checks


async def test_all_out_of_rotation_still_tries_the_one_that_failed_longest_ago(
    a_b: list[tuple[ScriptedOllama, str]], make_engine: Callable[..., Engine]
) -> None:
    (a, url_a), (b, url_b) = a_b
    engine = make_engine([url_a, url_b], eject_after_failures=1)
    pool = pool_of(engine)
    a.fail_next = 1
    b.fail_next = 1
    with pytest.raises(BackendError):
        await engine.generate(PROMPT)  # A fails first, then B: both out of rotation
    assert [e.healthy for e in pool.endpoints()] == [False, False]
    result = await engine.generate(PROMPT)
    assert result.endpoint == url_a and result.failovers == 0  # A failed longest ago
    assert [e.healthy for e in pool.endpoints()] == [True, False]


async def test_input_errors_are_not_retried(
    a_b: list[tuple[ScriptedOllama, str]], make_engine: Callable[..., Engine]
) -> None:
    (a, url_a), (b, url_b) = a_b
    engine = make_engine([url_a, url_b])
    a.fail_with = (400, "invalid options")
    b.fail_with = (400, OVERFLOW_MESSAGE)
    with pytest.raises(InvalidRequestError, match="HTTP 400"):
        await engine.generate(PROMPT)  # A's turn
    assert (chats(a), chats(b)) == (1, 0)
    with pytest.raises(ContextOverflowError):
        await engine.generate(PROMPT)  # B's turn
    assert (chats(a), chats(b)) == (1, 1)
    assert [e.consecutive_failures for e in pool_of(engine).endpoints()] == [0, 0]


async def test_an_error_after_the_first_token_is_not_resent(
    a_b: list[tuple[ScriptedOllama, str]], make_engine: Callable[..., Engine]
) -> None:
    (a, url_a), (b, url_b) = a_b
    a.error_after_chunks = (1, "model runner crashed")
    engine = make_engine([url_a, url_b])
    with pytest.raises(BackendError, match="mid-stream"):
        await engine.generate(PROMPT)
    assert (chats(a), chats(b)) == (1, 0)
    assert pool_of(engine).endpoints()[0].consecutive_failures == 1


async def test_overloaded_answer_fails_over(
    a_b: list[tuple[ScriptedOllama, str]], make_engine: Callable[..., Engine]
) -> None:
    (a, url_a), (b, url_b) = a_b
    a.fail_with = (503, "server busy, please try again. maximum pending requests exceeded")
    engine = make_engine([url_a, url_b])
    assert (await engine.generate(PROMPT)).endpoint == url_b
    b.fail_with = a.fail_with
    with pytest.raises(BackendOverloadedError):
        await engine.generate(PROMPT)


# ----- health and readiness ------------------------------------------------------------


async def test_health_is_cached_and_ok_with_one_healthy_endpoint(
    a_b: list[tuple[ScriptedOllama, str]], make_engine: Callable[..., Engine]
) -> None:
    url_b = a_b[1][1]
    engine = make_engine([closed_port_url(), url_b])
    health = await engine.backend.health()
    assert health.ok and health.detail == "1 of 2 endpoints healthy"
    checks = len(a_b[1][0].bodies("/api/version"))
    for _ in range(5):
        assert (await engine.backend.health()).ok
    assert len(a_b[1][0].bodies("/api/version")) == checks  # no probe per call


def get(url: str) -> httpx.Response:
    return httpx.get(url, timeout=WAIT_S)


def test_readyz_lists_the_endpoints(a_b: list[tuple[ScriptedOllama, str]], tmp_path: Path) -> None:
    (a, url_a), (b, url_b) = a_b
    dead = closed_port_url()
    settings = settings_for([url_a, dead, url_b])
    engine = Engine(create_backend(settings), settings)
    audit = AuditLog.open(tmp_path / "a.sqlite3")
    try:
        with serve(create_app(engine, settings, audit=audit, close_engine=True)) as url:
            response = get(url + "/readyz")
            assert response.status_code == 200
            body = response.json()
            assert body["status"] == "ready" and body["audit_ok"] is True
            assert [(e["name"], e["healthy"]) for e in body["endpoints"]] == [
                (url_a, True),
                (dead, False),
                (url_b, True),
            ]
            assert all(e["in_flight"] == 0 for e in body["endpoints"])
            a.down = b.down = True
            # Cached: still ready until the health loop (or a call) says otherwise.
            assert get(url + "/readyz").status_code == 200
            # Calls fail on every endpoint: each is taken out (eject_after_failures=2).
            for _ in range(2):
                reply = httpx.post(url + "/v1/generate", json={"prompt": PROMPT}, timeout=WAIT_S)
                assert reply.status_code == 503
            response = get(url + "/readyz")
            assert response.status_code == 503
            body = response.json()
            assert body["status"] == "unavailable"
            assert [e["healthy"] for e in body["endpoints"]] == [False, False, False]
            # Each call: A, then B, then (nothing in rotation left) the one out of rotation.
            assert [e["consecutive_failures"] for e in body["endpoints"]] == [2, 2, 2]
            assert get(url + "/healthz").status_code == 503
    finally:
        audit.close()


def test_readyz_single_backend_and_a_dead_audit_writer(
    a_b: list[tuple[ScriptedOllama, str]], tmp_path: Path
) -> None:
    (a, url_a) = a_b[0]
    settings = settings_for([url_a])
    assert not settings.backend_replicas
    engine = Engine(create_backend(settings), settings)
    audit = AuditLog.open(tmp_path / "a.sqlite3")
    with serve(create_app(engine, settings, audit=audit, close_engine=True)) as url:
        body = get(url + "/readyz").json()
        assert body["status"] == "ready"
        [endpoint] = body["endpoints"]
        assert endpoint["name"] in ("ollama", url_a) and endpoint["healthy"] is True
        a.down = True
        response = get(url + "/readyz")
        assert response.status_code == 503 and response.json()["endpoints"][0]["healthy"] is False
        a.down = False
        assert get(url + "/readyz").status_code == 200
        audit.close()  # the writer stops: calls could no longer be audited
        response = get(url + "/readyz")
        assert response.status_code == 503 and response.json()["audit_ok"] is False


def test_readyz_and_healthz_are_documented(a_b: list[tuple[ScriptedOllama, str]]) -> None:
    settings = settings_for([a_b[0][1]])
    app = create_app(Engine(create_backend(settings), settings))
    document = app.openapi()
    for path in ("/readyz", "/healthz"):
        operation = document["paths"][path]["get"]
        assert operation["tags"] == ["health"]
        assert {"200", "503"} <= set(operation["responses"])
    schema = document["components"]["schemas"]["ReadinessReport"]
    assert {"status", "endpoints", "audit_ok"} <= set(schema["properties"])
