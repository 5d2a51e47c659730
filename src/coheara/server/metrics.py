"""Prometheus metrics for one app, in a registry of its own (never the global one).

Model calls are counted from an engine observer (`Metrics.observe`): by surface, task
and outcome, with time to first token, total latency and tokens in and out. HTTP
responses are counted by surface and status in a middleware outside every other layer,
so 401, 413 and 429 refusals count too; a task request that succeeds is held to its
task's latency target there (the whole request, as `TaskMetadata.within_target`). Queue
depth, requests in flight and each backend endpoint's state are read at scrape time.

Every label value comes from a closed set: registered task ids (else "none"), the fixed
surfaces, stable outcome codes, status codes and configured endpoint names. Request
text, client-sent model names and raw paths never become labels.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coheara.server.errors import route_path
from coheara.server.middleware import surface_for

if TYPE_CHECKING:
    from coheara.engine import Engine
    from coheara.engine.engine import CallRecord
    from coheara.server.admission import Admission

SURFACES = frozenset({"native", "tasks", "openai", "ollama", "cli", "python"})
NONE = "none"
_CODE = re.compile(r"[a-z][a-z0-9_]{0,47}")
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 120.0)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


def _task_targets() -> tuple[dict[str, int | None], dict[str, str]]:
    """Registered task id -> latency target (ms), and every accepted name -> task id."""
    from coheara.tasks import all_tasks

    targets: dict[str, int | None] = {}
    names: dict[str, str] = {}
    for spec in all_tasks().values():
        targets[spec.id] = spec.latency_target_ms
        names[spec.id.upper()] = spec.id
        names[spec.slug.upper()] = spec.id
    return targets, names


class Metrics:
    """The app's metrics; `observe` goes in `engine.observers`."""

    def __init__(self, engine: Engine, admission: Admission | None = None) -> None:
        self.engine = engine
        self.admission = admission
        self.targets, self._task_names = _task_targets()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "coheara_requests",
            "Model calls that reached the engine, by surface, task and outcome.",
            ["surface", "task", "outcome"],
            registry=r,
        )
        self.ttft = Histogram(
            "coheara_time_to_first_token_seconds",
            "Time to the backend's first token, per task (successful calls).",
            ["task"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "coheara_call_duration_seconds",
            "Total duration of a model call, per task (successful calls).",
            ["task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "coheara_tokens",
            "Tokens in (prompt) and out (output), per task.",
            ["direction", "task"],
            registry=r,
        )
        self.target_total = Counter(
            "coheara_latency_target_requests",
            "Successful task requests whose task has a latency target.",
            ["task"],
            registry=r,
        )
        self.target_met = Counter(
            "coheara_latency_target_met",
            "Successful task requests that met their task's latency target.",
            ["task"],
            registry=r,
        )
        self.http = Counter(
            "coheara_http_responses",
            "HTTP responses by surface and status, refusals (401, 413, 429, ...) included.",
            ["surface", "status"],
            registry=r,
        )
        r.register(_LiveState(self))

    # ----- feeding --------------------------------------------------------------------

    def task_label(self, task_id: str | None) -> str:
        return task_id if task_id in self.targets else NONE

    def observe(self, call: CallRecord) -> None:
        """The engine observer: one model call, whatever its outcome."""
        context = call.context
        surface = context.surface if context.surface in SURFACES else NONE
        task = self.task_label(context.task_id)
        outcome = call.outcome if _CODE.fullmatch(call.outcome) else "other"
        self.requests.labels(surface, task, outcome).inc()
        result = call.result
        if result is None:
            return
        self.tokens.labels("in", task).inc(max(0, result.prompt_tokens))
        self.tokens.labels("out", task).inc(max(0, result.output_tokens))
        if call.outcome == "ok":
            if result.time_to_first_token_s is not None:
                self.ttft.labels(task).observe(result.time_to_first_token_s)
            self.latency.labels(task).observe(call.duration_s)

    def response(self, method: str, path: str, status: int, duration_s: float) -> None:
        """One HTTP response (`path`: the route path, prefix removed); a successful task
        run is held to its latency target."""
        surface = surface_for(path) or NONE
        self.http.labels(surface, str(status)).inc()
        if status == 200 and surface == "tasks" and method == "POST":
            task = self._task_names.get(path.removeprefix("/v1/tasks/").strip().upper())
            target = self.targets.get(task) if task is not None else None
            if task is not None and target is not None:
                self.target_total.labels(task).inc()
                if duration_s * 1000.0 <= target:
                    self.target_met.labels(task).inc()

    # ----- exposing -------------------------------------------------------------------

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    async def endpoint(self, request: Request) -> Response:
        """`GET /metrics`: the Prometheus text format."""
        return Response(self.exposition(), media_type=CONTENT_TYPE_LATEST)


class _LiveState(Collector):
    """Gauges read when scraped: the admission queue and each backend endpoint."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        admission = self.metrics.admission
        if admission is not None:
            yield _gauge(
                "coheara_queue_depth", "Model calls waiting for a slot.", admission.waiting
            )
            yield _gauge(
                "coheara_requests_in_flight", "Model calls holding a slot.", admission.in_flight
            )
            yield _gauge("coheara_admission_slots", "Model calls allowed at once.", admission.slots)
        endpoints = self.metrics.engine.backend.endpoints()
        in_flight = GaugeMetricFamily(
            "coheara_backend_in_flight",
            "Calls in flight per backend endpoint.",
            labels=["endpoint"],
        )
        healthy = GaugeMetricFamily(
            "coheara_backend_healthy",
            "1 healthy, 0 out of rotation, -1 not checked yet.",
            labels=["endpoint"],
        )
        failures = GaugeMetricFamily(
            "coheara_backend_consecutive_failures",
            "Consecutive failures per backend endpoint.",
            labels=["endpoint"],
        )
        for endpoint in endpoints:
            in_flight.add_metric([endpoint.name], endpoint.in_flight)
            state = -1 if endpoint.healthy is None else int(endpoint.healthy)
            healthy.add_metric([endpoint.name], state)
            failures.add_metric([endpoint.name], endpoint.consecutive_failures)
        yield from (in_flight, healthy, failures)

    def describe(self) -> Iterable[Metric]:
        return []


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class HttpMetricsMiddleware:
    """Count every HTTP response by surface and status (outermost, so refusals count)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client sees if the app fails before answering

        async def send_noting(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_noting)
        finally:
            self.metrics.response(
                scope["method"], route_path(scope), status, time.perf_counter() - started
            )


def labels_of(registry: CollectorRegistry) -> Iterator[str]:
    """Every label value in `registry` (the tests look for canaries in them)."""
    for family in registry.collect():
        for sample in family.samples:
            yield from sample.labels.values()
