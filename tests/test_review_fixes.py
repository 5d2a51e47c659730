"""Three holes a security review found in the production service, each shown over loopback.

1. A path prefix (a mount, or uvicorn's `root_path` behind a proxy) must not change what a
   key may call, nor skip admission, audit or metrics: every layer reads the route path
   the router matches.
2. A model call's body is read inside its admission slot, so it has a deadline: a client
   that sends its headers and then withholds or trickles the body gets a 408 and its slot
   goes back.
3. A replica that answers its health checks but never sends a first token is a failure of
   that replica: the call fails over, and the replica is taken out of rotation.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount

from coheara import Engine, Settings
from coheara.access.auth import Access
from coheara.access.keys import KeyStore
from coheara.audit import AuditLog, AuditRecord
from coheara.backends.selection import create_backend
from coheara.errors import BackendTimeoutError
from coheara.server import create_app
from coheara.server.admission import OLLAMA_BUSY, Admission
from fakes.faults import MODEL, Fault, FaultyOllama, replica_settings
from fakes.stand_in import StandIn
from servers import free_port, serve

WAIT_S = 15.0
PREFIX = "/coheara"
GENERATE = {"prompt": "ping"}
OPENAI_CHAT = {"model": "medgemma", "messages": [{"role": "user", "content": "ping"}]}
OLLAMA_CHAT = {"model": "medgemma", "messages": [{"role": "user", "content": "ping"}]}
OLLAMA_CHAT_WHOLE = {**OLLAMA_CHAT, "stream": False}


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def bearer(key: str | None, request_id: str | None = None) -> dict[str, str]:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    if request_id is not None:
        headers["X-Request-ID"] = request_id
    return headers


def records(audit: AuditLog, request_id: str) -> list[AuditRecord]:
    assert audit.flush(WAIT_S)
    store = audit.reader()
    try:
        return [r for r in store.iter_records() if r.request_id == request_id]
    finally:
        store.close()


@contextmanager
def serve_behind_proxy(app: Any, root_path: str) -> Iterator[str]:
    """`uvicorn --root-path`: what a proxy that strips `root_path` talks to."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", root_path=root_path
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), "uvicorn to start")
        assert server.started
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# ----- 1. the route path, under a prefix -------------------------------------------------


@dataclass
class Prefixed:
    mode: str
    base: str
    """Where a client (or the proxy) sends its requests."""
    backend: StandIn
    admission: Admission
    audit: AuditLog
    keys: dict[str, str]

    def rid(self, name: str) -> str:
        return f"{self.mode}-{name}"


@pytest.fixture(scope="module", params=["mount", "root_path"])
def prefixed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prefixed]:
    """The app with keys and an audit trail, one slot, no queue: mounted under /coheara in
    a Starlette app, or served by uvicorn with root_path /coheara."""
    folder = tmp_path_factory.mktemp("prefix")
    store = KeyStore(folder / "keys.json")
    keys = {
        "all": store.create("ward-app")[1],
        "ollama": store.create("ollama-only", endpoints=["ollama"])[1],
        "slm-01": store.create("slm-01-only", tasks=["SLM-01"], endpoints=["tasks"])[1],
    }
    settings = Settings(max_concurrency=1, max_queue=0, queue_timeout_s=5.0, max_output_tokens=8)
    backend = StandIn()
    with ExitStack() as stack:
        audit = stack.enter_context(AuditLog.open(folder / "a.sqlite3"))
        app = create_app(Engine(backend, settings), settings, audit=audit, access=Access(store))
        if request.param == "mount":
            url = stack.enter_context(serve(Starlette(routes=[Mount(PREFIX, app=app)])))
            base = url + PREFIX
        else:
            base = stack.enter_context(serve_behind_proxy(app, PREFIX))
        yield Prefixed(request.param, base, backend, app.state.admission, audit, keys)


def test_under_a_prefix_a_key_reaches_only_its_endpoints(prefixed: Prefixed) -> None:
    base, key = prefixed.base, prefixed.keys["ollama"]
    native = httpx.post(base + "/v1/generate", json=GENERATE, headers=bearer(key), timeout=WAIT_S)
    assert native.status_code == 403
    assert native.json()["error"]["code"] == "permission_denied"
    assert "may not call the native endpoints" in native.json()["error"]["message"]
    chat = httpx.post(base + "/v1/chat/completions", json=OPENAI_CHAT, headers=bearer(key))
    assert chat.status_code == 403  # in OpenAI's own shape: the dialect of the route path
    assert chat.json()["error"]["type"] == "invalid_request_error"
    assert chat.json()["error"]["code"] == "permission_denied"
    assert httpx.get(base + "/metrics", headers=bearer(key)).status_code == 403
    assert httpx.get(base + "/v1/models", headers=bearer(key)).status_code == 403
    allowed = httpx.post(base + "/api/chat", json=OLLAMA_CHAT_WHOLE, headers=bearer(key))
    assert allowed.status_code == 200 and allowed.json()["message"]["content"] == "pong ping"
    # Errors the app's handlers shape answer in the route's dialect under the prefix too.
    invalid = httpx.post(base + "/api/chat", json={"messages": 1}, headers=bearer(key))
    assert invalid.status_code == 400 and isinstance(invalid.json()["error"], str)


def test_under_a_prefix_a_task_limited_key_runs_only_its_task(prefixed: Prefixed) -> None:
    base, key = prefixed.base, prefixed.keys["slm-01"]
    other = httpx.get(base + "/v1/tasks/SLM-02", headers=bearer(key))
    assert other.status_code == 403
    assert "may not run task SLM-02" in other.json()["error"]["message"]
    rid = prefixed.rid("task-403")
    run = httpx.post(base + "/v1/tasks/SLM-02", json={}, headers=bearer(key, rid))
    assert run.status_code == 403
    own = httpx.get(base + "/v1/tasks/SLM-01", headers=bearer(key))
    assert own.status_code == 200 and own.json()["id"] == "SLM-01"
    assert httpx.post(base + "/v1/generate", json=GENERATE, headers=bearer(key)).status_code == 403
    [denied] = records(prefixed.audit, rid)
    assert (denied.outcome, denied.client) == ("permission_denied", "slm-01-only")
    assert (denied.surface, denied.task_id) == ("tasks", "SLM-02")


def test_under_a_prefix_open_routes_stay_open_and_the_rest_need_a_key(
    prefixed: Prefixed,
) -> None:
    base = prefixed.base
    assert httpx.get(base + "/healthz").status_code == 200
    assert httpx.get(base + "/readyz").json()["status"] == "ready"
    assert httpx.get(base + "/").status_code == 200
    refused = httpx.post(base + "/api/chat", json=OLLAMA_CHAT_WHOLE)
    assert refused.status_code == 401 and "WWW-Authenticate" in refused.headers
    assert set(refused.json()) == {"error"}  # Ollama's shape: one string
    assert httpx.get(base + "/metrics").status_code == 401


def test_under_a_prefix_model_calls_take_slots_and_are_audited(prefixed: Prefixed) -> None:
    base, key = prefixed.base, prefixed.keys["all"]
    held: list[httpx.Response] = []
    prefixed.backend.gate.clear()
    try:
        holder = threading.Thread(
            target=lambda: held.append(
                httpx.post(
                    base + "/v1/generate",
                    json=GENERATE,
                    headers=bearer(key, prefixed.rid("held")),
                    timeout=WAIT_S,
                )
            )
        )
        holder.start()
        wait_until(lambda: prefixed.backend.active == 1, "the call to reach the backend")
        assert prefixed.admission.in_flight == 1  # the one slot is taken
        busy_ollama = httpx.post(
            base + "/api/chat", json=OLLAMA_CHAT, headers=bearer(key, prefixed.rid("busy-ollama"))
        )
        assert busy_ollama.status_code == 503 and busy_ollama.json() == {"error": OLLAMA_BUSY}
        busy_openai = httpx.post(
            base + "/v1/chat/completions",
            json=OPENAI_CHAT,
            headers=bearer(key, prefixed.rid("busy-openai")),
        )
        assert busy_openai.status_code == 429 and "Retry-After" in busy_openai.headers
        assert busy_openai.json()["error"]["code"] == "server_busy"
    finally:
        prefixed.backend.release()
        holder.join(timeout=WAIT_S)
    assert held[0].status_code == 200 and held[0].json()["text"] == "pong ping"
    wait_until(lambda: prefixed.admission.in_flight == 0, "the slot to come back")

    [ok] = records(prefixed.audit, prefixed.rid("held"))
    assert (ok.outcome, ok.client, ok.surface) == ("ok", "ward-app", "native")
    for name, surface in (("busy-ollama", "ollama"), ("busy-openai", "openai")):
        [busy] = records(prefixed.audit, prefixed.rid(name))
        assert (busy.outcome, busy.client, busy.surface) == ("server_busy", "ward-app", surface)

    metrics = httpx.get(base + "/metrics", headers=bearer(key)).text
    assert 'coheara_http_responses_total{status="429",surface="openai"}' in metrics
    assert 'coheara_http_responses_total{status="503",surface="ollama"}' in metrics


# ----- 2. a body that does not arrive ----------------------------------------------------

BODY_DEADLINE_S = 0.5
DIALECTS = {
    "native": ("/v1/generate", GENERATE),
    "openai": ("/v1/chat/completions", OPENAI_CHAT),
    "ollama": ("/api/chat", OLLAMA_CHAT_WHOLE),
}


@dataclass
class Slow:
    url: str
    admission: Admission
    audit: AuditLog


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slow]:
    """One slot and one place in the queue. The body deadline is the queue timeout unless
    set apart; here it is shorter, so that a request waiting in line outlasts it."""
    folder = tmp_path_factory.mktemp("slow")
    settings = Settings(
        max_concurrency=1,
        max_queue=1,
        queue_timeout_s=WAIT_S,
        max_output_tokens=8,
        keys_path=folder / "keys.json",
    )
    with AuditLog.open(folder / "a.sqlite3") as audit:
        app = create_app(Engine(StandIn(), settings), settings, audit=audit)
        assert app.state.admission.body_timeout_s == WAIT_S
        app.state.admission.body_timeout_s = BODY_DEADLINE_S
        with serve(app) as url:
            yield Slow(url, app.state.admission, audit)


def head(path: str, length: int, request_id: str) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\nX-Request-ID: {request_id}\r\n\r\n"
    ).encode()


def read_reply(sock: socket.socket) -> tuple[int, dict[str, str], Any]:
    """The server's whole reply, up to its closing the connection (bounded by WAIT_S)."""
    sock.settimeout(WAIT_S)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    top, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = top.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
    return int(status_line.split(" ")[1]), headers, json.loads(body)


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_a_body_that_never_arrives_is_a_408_and_gives_its_slot_back(
    slow: Slow, dialect: str
) -> None:
    path, body = DIALECTS[dialect]
    port = int(slow.url.rsplit(":", 1)[1])
    rid = f"slow-{dialect}"
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        sock.sendall(head(path, 50, rid) + b"{")  # one byte of fifty, then nothing
        status, headers, reply = read_reply(sock)
    assert status == 408 and headers["connection"] == "close"
    message = f"the request body did not arrive within {BODY_DEADLINE_S:g} s"
    if dialect == "native":
        assert reply == {"error": {"code": "request_timeout", "message": message}}
    elif dialect == "openai":
        assert reply["error"]["message"] == message
        assert reply["error"]["type"] == "invalid_request_error"
    else:
        assert reply == {"error": message}
    wait_until(lambda: slow.admission.in_flight == 0, "the slot to come back")
    answer = httpx.post(slow.url + path, json=body, timeout=WAIT_S)
    assert answer.status_code == 200
    [record] = records(slow.audit, rid)
    assert (record.outcome, record.surface, record.mode) == ("request_timeout", dialect, None)


def test_a_trickled_body_is_held_to_one_deadline_for_the_whole_body(slow: Slow) -> None:
    """Every byte comes well within the deadline of the one before: only a bound on the
    whole body ends it."""
    body = json.dumps({"prompt": "ping " * 40}).encode()
    port = int(slow.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        sock.sendall(head("/v1/generate", len(body), "slow-trickle"))
        for byte in body:  # a byte every BODY_DEADLINE_S / 5 until the server answers
            readable, _, _ = select.select([sock], [], [], BODY_DEADLINE_S / 5)
            if readable:
                break
            sock.sendall(bytes([byte]))
        status, _, reply = read_reply(sock)
    assert status == 408 and reply["error"]["message"].startswith("the request body did not")
    wait_until(lambda: slow.admission.in_flight == 0, "the slot to come back")
    [record] = records(slow.audit, "slow-trickle")
    assert record.outcome == "request_timeout"


def test_a_withheld_body_does_not_keep_a_waiting_call_from_its_slot(slow: Slow) -> None:
    """The one slot held by a body that never comes, an official client's call waits in
    line: at the deadline the slot passes to it and it is served."""
    port = int(slow.url.rsplit(":", 1)[1])
    client = ollama.Client(host=slow.url, timeout=WAIT_S)
    replies: list[Any] = []
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        sock.sendall(head("/api/generate", 80, "slow-hold") + b'{"mo')
        wait_until(lambda: slow.admission.in_flight == 1, "the slot to be held")
        waiting = threading.Thread(
            target=lambda: replies.append(client.generate(model="medgemma", prompt="ping"))
        )
        waiting.start()
        wait_until(lambda: slow.admission.waiting == 1, "the call to wait in line")
        status, _, reply = read_reply(sock)
        waiting.join(timeout=WAIT_S)
    assert status == 408 and set(reply) == {"error"}
    assert [r.response for r in replies] == ["pong ping"]


# ----- 3. a replica that never sends a first token --------------------------------------


@contextmanager
def service(urls: list[str], tmp_path: Path, **overrides: Any) -> Iterator[tuple[str, AuditLog]]:
    """`coheara serve`'s app on these Ollama URLs (the first, then replicas), audited."""
    settings = replica_settings(
        urls, eject_after_failures=2, first_token_timeout_s=1.5, **overrides
    )
    engine = Engine(create_backend(settings), settings)
    with (
        AuditLog.open(tmp_path / "a.sqlite3") as audit,
        serve(create_app(engine, settings, audit=audit, close_engine=True)) as url,
    ):
        yield url, audit


@contextmanager
def faulty(*fakes: FaultyOllama) -> Iterator[list[str]]:
    with ExitStack() as stack:
        yield [stack.enter_context(fake.serve()) for fake in fakes]


@pytest.mark.parametrize("backend", ["ollama", "auto"])
def test_a_silent_replica_is_failed_over_then_taken_out_of_rotation(
    tmp_path: Path, backend: str
) -> None:
    silent, healthy = FaultyOllama(default=Fault("hang")), FaultyOllama()
    with (
        faulty(silent, healthy) as urls,
        service(urls, tmp_path, backend=backend) as (url, audit),
    ):
        answers: list[tuple[str, int]] = []
        for number in range(6):
            response = httpx.post(
                url + "/v1/generate",
                json={"prompt": "ping"},
                headers={"X-Request-ID": f"silent-{number}"},
                timeout=WAIT_S,
            )
            assert response.status_code == 200, response.text
            answers.append((response.json()["endpoint"], response.json()["failovers"]))
        chat = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=WAIT_S)
        reply = chat.chat.completions.create(
            model="medgemma", messages=[{"role": "user", "content": "ping"}]
        )
        assert reply.choices[0].message.content == "part0 part1 part2 end."
        ready = httpx.get(url + "/readyz", timeout=WAIT_S)
        trail = [records(audit, f"silent-{number}")[0] for number in range(6)]
    # Every call answered by the healthy replica; the silent one was tried twice, each
    # time its connection closed, and then left out.
    assert {endpoint for endpoint, _ in answers} == {urls[1]}
    assert sorted(failovers for _, failovers in answers) == [0, 0, 0, 0, 1, 1]
    assert len(silent.chats) == 2
    assert all(chat.client_closed.is_set() for chat in silent.chats)
    assert ready.status_code == 200
    report = {e["name"]: e for e in ready.json()["endpoints"]}
    assert (report[urls[0]]["healthy"], report[urls[0]]["consecutive_failures"]) == (False, 2)
    assert (report[urls[1]]["healthy"], report[urls[1]]["consecutive_failures"]) == (True, 0)
    assert [r.outcome for r in trail] == ["ok"] * 6
    assert [(r.endpoint, r.failovers) for r in trail] == [(e, f) for e, f in answers]


async def test_every_replica_silent_is_a_clean_first_token_timeout() -> None:
    """The pool's own bound fires on each replica (0.3 s each, both counted), not the
    engine's bound on the whole phase."""
    silent = [FaultyOllama(default=Fault("hang")), FaultyOllama(default=Fault("hang"))]
    with faulty(*silent) as urls:
        settings = Settings(
            backend="ollama",
            ollama_url=urls[0],
            backend_replicas=urls[1:],
            ollama_model=MODEL,
            health_interval_s=3600.0,
            first_token_timeout_s=0.3,
            max_output_tokens=8,
        )
        async with Engine(create_backend(settings), settings) as engine:
            with pytest.raises(BackendTimeoutError, match="first-token timeout") as caught:
                await engine.generate("ping")
            failures = [e.consecutive_failures for e in engine.backend.endpoints()]
    assert caught.value.details == {
        "phase": "first_token",
        "timeout_s": 0.3,
        "endpoints_tried": 2,
    }
    assert failures == [1, 1]
    assert [len(fake.chats) for fake in silent] == [1, 1]


def test_a_single_silent_backend_is_still_a_clean_504(tmp_path: Path) -> None:
    silent = FaultyOllama(default=Fault("hang"))
    with faulty(silent) as urls, service(urls, tmp_path) as (url, audit):
        response = httpx.post(
            url + "/v1/generate", json={"prompt": "ping"}, headers={"X-Request-ID": "single"}
        )
        [record] = records(audit, "single")
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "backend_timeout"
    assert "first-token timeout" in response.json()["error"]["message"]
    assert (record.outcome, record.error_class) == ("backend_timeout", "BackendTimeoutError")
