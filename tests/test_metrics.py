"""Prometheus /metrics over loopback: the values after known requests, and no client text.

The backend is the in-process stand-in (its token counts are known: prompt words + 3 in,
reply words out), so every counter and histogram count below is an exact number.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from coheara import Engine, Settings
from coheara.context import calling
from coheara.errors import BackendError
from coheara.server import create_app
from coheara.server.admission import Admission
from coheara.server.metrics import Metrics
from fakes.stand_in import StandIn
from servers import serve

CANARY = "CANARY-7f3a9c"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(client: httpx.Client) -> tuple[Samples, str]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples, response.text


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape_until(client: httpx.Client, name: str, expected: float, **labels: str) -> Samples:
    """Engine calls are observed as their stream closes, just after the reply: wait a little."""
    deadline = time.monotonic() + 10
    while True:
        samples, _ = scrape(client)
        if value(samples, name, **labels) >= expected or time.monotonic() > deadline:
            return samples
        time.sleep(0.01)


@contextmanager
def server(backend: StandIn, **settings: Any) -> Iterator[tuple[httpx.Client, FastAPI]]:
    app = create_app(Engine(backend, Settings(**settings)))
    with serve(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client, app


def test_model_calls_are_counted_by_surface_task_and_outcome_with_tokens_and_latencies() -> None:
    backend = StandIn()
    with server(backend) as (client, _):
        for prompt in ("ping one", "ping two three"):
            assert client.post("/v1/generate", json={"prompt": prompt}).status_code == 200
        chat = {"model": "medgemma", "messages": [{"role": "user", "content": "ping"}]}
        assert client.post("/v1/chat/completions", json=chat).status_code == 200
        assert client.post("/api/chat", json={**chat, "stream": False}).status_code == 200
        backend.fail_with = BackendError("the runtime failed")
        assert client.post("/v1/generate", json={"prompt": "ping"}).status_code == 502
        samples = scrape_until(
            client,
            "coheara_requests_total",
            1,
            surface="native",
            task="none",
            outcome="backend_error",
        )
    requests = "coheara_requests_total"
    assert value(samples, requests, surface="native", task="none", outcome="ok") == 2
    assert value(samples, requests, surface="openai", task="none", outcome="ok") == 1
    assert value(samples, requests, surface="ollama", task="none", outcome="ok") == 1
    assert value(samples, requests, surface="native", task="none", outcome="backend_error") == 1
    # In: prompt words + 3 per call (2+3, 3+3, 1+3, 1+3); out: the reply "pong <prompt>".
    assert value(samples, "coheara_tokens_total", direction="in", task="none") == 5 + 6 + 4 + 4
    assert value(samples, "coheara_tokens_total", direction="out", task="none") == 3 + 4 + 2 + 2
    # The histograms count the successful calls only, each latency at or under the total.
    assert value(samples, "coheara_time_to_first_token_seconds_count", task="none") == 4
    assert value(samples, "coheara_call_duration_seconds_count", task="none") == 4
    assert value(samples, "coheara_call_duration_seconds_bucket", task="none", le="+Inf") == 4
    ttft = value(samples, "coheara_time_to_first_token_seconds_sum", task="none")
    assert 0 < ttft <= value(samples, "coheara_call_duration_seconds_sum", task="none")
    http = "coheara_http_responses_total"
    assert value(samples, http, surface="native", status="200") == 2
    assert value(samples, http, surface="native", status="502") == 1
    assert value(samples, http, surface="openai", status="200") == 1


def test_the_queue_in_flight_and_endpoint_gauges_read_the_live_state() -> None:
    backend = StandIn(gated=True, endpoints=2)

    async def fill(url: str) -> list[asyncio.Task[httpx.Response]]:
        client = httpx.AsyncClient(base_url=url, timeout=30)
        tasks = [
            asyncio.create_task(client.post("/v1/generate", json={"prompt": f"p {i}"}))
            for i in range(3)
        ]
        await backend.wait_for_active(2)
        return tasks

    with server(backend, max_concurrency=1, max_queue=4) as (client, app):
        admission: Admission = app.state.admission
        url = str(client.base_url).rstrip("/")

        async def scenario() -> list[int]:
            running = await fill(url)
            async with asyncio.timeout(10):
                while admission.waiting < 1:
                    await asyncio.sleep(0.005)
            samples, _ = await asyncio.to_thread(scrape, client)
            backend.release()
            answers = await asyncio.gather(*running)
            assert value(samples, "coheara_queue_depth") == 1
            assert value(samples, "coheara_requests_in_flight") == 2
            assert value(samples, "coheara_admission_slots") == 2  # 1 x 2 endpoints
            endpoint = "coheara_backend_in_flight"
            assert value(samples, endpoint, endpoint="http://127.0.0.1:11434") == 2
            assert value(samples, endpoint, endpoint="http://127.0.0.1:11435") == 0
            healthy = "coheara_backend_healthy"
            assert value(samples, healthy, endpoint="http://127.0.0.1:11435") == 1
            return [a.status_code for a in answers]

        assert asyncio.run(scenario()) == [200, 200, 200]
        samples, _ = scrape(client)
        assert value(samples, "coheara_queue_depth") == 0
        assert value(samples, "coheara_requests_in_flight") == 0


def test_refusals_are_counted_by_status() -> None:
    with server(StandIn(), max_body_bytes=2048) as (client, _):
        assert client.post("/v1/generate", json={"prompt": "x" * 4096}).status_code == 413
        assert client.get("/v1/nothing-here").status_code == 404
        too_long = client.post("/v1/generate", json={"prompt": "x", "max_tokens": 0})
        assert too_long.status_code == 422
        samples, _ = scrape(client)
    http = "coheara_http_responses_total"
    assert value(samples, http, surface="native", status="413") == 1
    assert value(samples, http, surface="openai", status="404") == 1
    assert value(samples, http, surface="native", status="422") == 1
    assert value(samples, http, surface="none", status="200") == 0  # /metrics: counted after


def test_no_label_carries_client_text() -> None:
    backend = StandIn()
    with server(backend) as (client, _):
        headers = {"X-Request-ID": CANARY}
        client.post("/v1/generate", json={"prompt": CANARY}, headers=headers)
        client.post(
            "/v1/chat/completions",
            json={"model": CANARY, "messages": [{"role": "user", "content": CANARY}]},
        )
        client.post(f"/v1/tasks/{CANARY}", json={"input": {"note": CANARY}})
        client.post(f"/api/{CANARY}?q={CANARY}", json={"prompt": CANARY})
        client.get(f"/{CANARY}")
        samples = scrape_until(
            client, "coheara_requests_total", 1, surface="native", task="none", outcome="ok"
        )
        _, text = scrape(client)
    assert value(samples, "coheara_requests_total", surface="native", task="none", outcome="ok")
    assert value(samples, "coheara_http_responses_total", surface="tasks", status="404") == 1
    assert CANARY.lower() not in text.lower()


def test_a_task_call_is_labelled_with_its_registered_id_only() -> None:
    backend = StandIn()
    engine = Engine(backend, Settings())
    metrics = Metrics(engine)
    engine.observers.append(metrics.observe)

    async def calls() -> None:
        with calling(surface="tasks", task_id="SLM-04"):
            await engine.generate("ping")
        with calling(surface=CANARY, task_id=CANARY):
            await engine.generate("ping")

    asyncio.run(calls())
    samples: Samples = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    requests = "coheara_requests_total"
    assert value(samples, requests, surface="tasks", task="SLM-04", outcome="ok") == 1
    assert value(samples, requests, surface="none", task="none", outcome="ok") == 1
    assert value(samples, "coheara_call_duration_seconds_count", task="SLM-04") == 1
    assert CANARY not in metrics.exposition().decode()


def test_task_requests_are_held_to_their_latency_target() -> None:
    metrics = Metrics(Engine(StandIn(), Settings()))
    target_s = metrics.targets["SLM-04"] / 1000  # a point-of-care task: 3 s
    assert metrics.targets["SLM-01"] is None  # best effort: never counted
    metrics.response("POST", "/v1/tasks/SLM-04", 200, target_s / 2)
    metrics.response("POST", "/v1/tasks/alert", 200, target_s * 2)  # by slug, too slow
    metrics.response("POST", "/v1/tasks/SLM-04", 502, 0.01)  # failed: not a latency sample
    metrics.response("POST", "/v1/tasks/SLM-01", 200, 0.01)
    metrics.response("POST", f"/v1/tasks/{CANARY}", 200, 0.01)
    text = metrics.exposition().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    assert value(samples, "coheara_latency_target_requests_total", task="SLM-04") == 2
    assert value(samples, "coheara_latency_target_met_total", task="SLM-04") == 1
    assert value(samples, "coheara_latency_target_requests_total", task="SLM-01") == 0
    assert CANARY not in text


@pytest.mark.parametrize("enabled", [True, False])
def test_metrics_can_be_turned_off(enabled: bool) -> None:
    with server(StandIn(), metrics_enabled=enabled) as (client, _):
        assert client.get("/metrics").status_code == (200 if enabled else 404)
