"""Replicas of one runtime behind one backend (`COHEARA_BACKEND_REPLICAS`).

Routing: among the endpoints in rotation, the one with the fewest calls in flight; ties
rotate. Failover: a failure of the endpoint before its first event (it cannot be reached,
resets or closes the connection, does not accept one within the connect timeout, answers
5xx or busy) moves the call to the next endpoint, each endpoint at most once per call. An
input error (4xx: the prompt does not fit, the model is unknown, ...) is the caller's: it
is returned as is, never retried. After the first event an error ends the call: half an
answer is never sent again.

First-token bound: with `first_token_timeout_s` (the engine passes its setting with each
call), an endpoint that sends no first event within it (connect included) is a failure of
that endpoint, counted towards ejection, and the call fails over: nothing has reached the
caller yet. A replica that answers its health checks but never generates is taken out
of rotation this way; bounded only from outside, its calls would be cancelled and it
would stay in rotation. The engine's own bound then covers the whole first-token phase,
every endpoint's try included (`first_token_phase_s`).

`eject_after_failures` consecutive failures take an endpoint out of rotation; a health
loop (every `health_interval_s`, started lazily inside the running event loop, stopped by
`aclose`) checks every endpoint, takes out one that fails its check and brings one back
when its check passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace

import httpx

from coheara.access.egress import public_url
from coheara.backends.base import (
    Backend,
    Capabilities,
    ChatRequest,
    EndpointStatus,
    Health,
    StreamEvent,
)
from coheara.errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    CohearaError,
    ConfigurationError,
)

HEALTH_TIMEOUT_S = 10.0
"""Bound on one endpoint's health check (each backend bounds its own probe too)."""
FIRST_TOKEN_GRACE_S = 1.0
"""How much longer than every endpoint's first-token bound together the caller's own
bound on the phase runs, so that the pool's timer on its last try fires first."""


def connect_phase(error: BaseException) -> bool:
    """Whether a timeout happened while connecting (nothing was sent, so another endpoint
    may take the call), read from the error itself or the client exception behind it."""
    if isinstance(error, CohearaError) and error.details.get("phase") == "connect":
        return True
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, httpx.ConnectTimeout | httpx.PoolTimeout):
            return True
        current = current.__cause__ or current.__context__
    return False


def fails_over(error: CohearaError) -> bool:
    """An endpoint failure that another endpoint may not share (before the first event):
    for a timeout, one while connecting or the pool's own first-token bound."""
    if isinstance(error, BackendTimeoutError):
        return error.details.get("phase") == "first_token" or connect_phase(error)
    return isinstance(error, BackendUnavailableError | BackendError)


def first_token_timeout(backend: str, seconds: float) -> BackendTimeoutError:
    """One endpoint sent nothing within the first-token bound (worded as the engine's)."""
    return BackendTimeoutError(
        f"{backend} sent no first token within {seconds:g}s (first-token timeout)",
        hint="raise COHEARA_FIRST_TOKEN_TIMEOUT_S, or check whether the model is still "
        "loading or the runtime is overloaded",
        phase="first_token",
        timeout_s=seconds,
    )


def endpoint_fault(error: CohearaError) -> bool:
    """A failure that counts against the endpoint (towards taking it out of rotation)."""
    return isinstance(error, BackendUnavailableError | BackendError | BackendTimeoutError)


class _NoFirstEvent(Exception):
    """An endpoint's first event did not come within the pool's bound."""


@dataclass
class _Endpoint:
    index: int
    name: str
    backend: Backend
    healthy: bool | None = None
    in_flight: int = 0
    consecutive_failures: int = 0
    failed_at: float = float("-inf")
    """Monotonic time of its last failure (a call or a health check)."""
    last_health: Health | None = None

    @property
    def in_rotation(self) -> bool:
        return self.healthy is not False

    def status(self) -> EndpointStatus:
        return EndpointStatus(
            name=self.name,
            healthy=self.healthy,
            in_flight=self.in_flight,
            consecutive_failures=self.consecutive_failures,
        )


class PooledBackend(Backend):
    """One runtime and one model on several endpoints; speaks as the runtime it pools.

    If no endpoint in rotation is left to try (all ejected, or the ones in rotation have
    failed this call), the call still tries one endpoint that is out of rotation, the one
    whose last failure is the oldest, rather than refusing outright: a replica that has
    recovered since its last check then answers at once, and a call never fails without
    a try. That fallback is used at most once per call.
    """

    def __init__(
        self,
        endpoints: Sequence[tuple[str, Backend]],
        *,
        health_interval_s: float = 10.0,
        eject_after_failures: int = 3,
        health_timeout_s: float = HEALTH_TIMEOUT_S,
        first_token_timeout_s: float | None = None,
    ) -> None:
        if not endpoints:
            raise ConfigurationError("a pool of replicas needs at least one endpoint")
        self._endpoints = [
            _Endpoint(index, public_url(url), backend)
            for index, (url, backend) in enumerate(endpoints)
        ]
        first = self._endpoints[0].backend
        self.name = first.name
        self.model = first.model
        self.health_interval_s = health_interval_s
        self.eject_after_failures = eject_after_failures
        self.health_timeout_s = health_timeout_s
        self.first_token_timeout_s = first_token_timeout_s
        """Per endpoint, for a call that names none (None: unbounded here)."""
        self._turn = 0
        self._capabilities: Capabilities | None = None
        self._capabilities_lock: asyncio.Lock | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._refreshing: asyncio.Task[None] | None = None
        self._closed = False

    # ----- what the engine reads -------------------------------------------------------

    @property
    def context_window(self) -> int | None:
        return self._endpoints[0].backend.context_window

    def count_prompt_tokens(self, request: ChatRequest) -> int | None:
        return self._endpoints[0].backend.count_prompt_tokens(request)

    def endpoints(self) -> list[EndpointStatus]:
        return [endpoint.status() for endpoint in self._endpoints]

    def first_token_phase_s(self, per_endpoint_s: float) -> float:
        """The bound for a whole call's first-token phase when each endpoint gets
        `per_endpoint_s`: every endpoint tried once (at most), and a grace."""
        return per_endpoint_s * len(self._endpoints) + FIRST_TOKEN_GRACE_S

    # ----- routing ----------------------------------------------------------------------

    def _choose(self, tried: set[int], fallback: bool) -> _Endpoint | None:
        """Least busy in rotation, ties taking turns; the turn moves on a call's first
        choice only, so a failing endpoint does not get every call's first try."""
        candidates = [e for e in self._endpoints if e.index not in tried and e.in_rotation]
        if candidates:
            least = min(e.in_flight for e in candidates)
            count = len(self._endpoints)
            chosen = min(
                (e for e in candidates if e.in_flight == least),
                key=lambda e: (e.index - self._turn) % count,
            )
            if not tried:
                self._turn = (chosen.index + 1) % count
            return chosen
        if not fallback:
            return None
        rest = [e for e in self._endpoints if e.index not in tried]
        return min(rest, key=lambda e: e.failed_at, default=None)

    def _succeeded(self, endpoint: _Endpoint) -> None:
        endpoint.consecutive_failures = 0
        endpoint.healthy = True

    def _failed(self, endpoint: _Endpoint) -> None:
        endpoint.consecutive_failures += 1
        endpoint.failed_at = time.monotonic()
        if endpoint.consecutive_failures >= self.eject_after_failures:
            endpoint.healthy = False

    async def stream(
        self, request: ChatRequest, *, first_token_s: float | None = None
    ) -> AsyncGenerator[StreamEvent, None]:
        """The least busy endpoint's stream; its closing event names it and the failovers.

        `first_token_s` (default `first_token_timeout_s`) bounds each endpoint's wait for
        its first event; past it the endpoint has failed and the call moves on. A call
        cancelled or closed by its caller (a client gone, the engine's total timeout) does
        not count against the endpoint.
        """
        bound = self.first_token_timeout_s if first_token_s is None else first_token_s
        self._ensure_health_loop()
        tried: set[int] = set()
        fallback = True
        failovers = 0
        last_error: CohearaError | None = None
        while True:
            endpoint = self._choose(tried, fallback)
            if endpoint is None:
                assert last_error is not None
                last_error.details["endpoints_tried"] = len(tried)
                raise last_error
            if not endpoint.in_rotation:
                fallback = False
            tried.add(endpoint.index)
            started = False
            endpoint.in_flight += 1
            events = endpoint.backend.stream(request)
            try:
                async with aclosing(events):
                    while True:
                        try:
                            event = await self._next(events, None if started else bound)
                        except StopAsyncIteration:
                            break
                        except _NoFirstEvent:
                            assert bound is not None
                            raise first_token_timeout(endpoint.backend.name, bound) from None
                        started = True
                        if event.done:
                            self._succeeded(endpoint)
                            event = replace(event, endpoint=endpoint.name, failovers=failovers)
                        yield event
                return
            except CohearaError as error:
                if not endpoint_fault(error):
                    raise
                self._failed(endpoint)
                if started or not fails_over(error):
                    raise
                last_error = error
                failovers += 1
            finally:
                endpoint.in_flight -= 1

    @staticmethod
    async def _next(events: AsyncGenerator[StreamEvent, None], bound: float | None) -> StreamEvent:
        """The next event; `_NoFirstEvent` when `bound` runs out first. The stream is
        awaited in this task, so the timeout cancels it where it waits."""
        if bound is None:
            return await anext(events)
        timer = asyncio.timeout(bound)
        try:
            async with timer:
                return await anext(events)
        except TimeoutError:
            if timer.expired():
                raise _NoFirstEvent() from None
            raise

    # ----- model facts and health -------------------------------------------------------

    async def capabilities(self) -> Capabilities:
        """The first endpoint that answers, healthy ones first; read once."""
        if self._capabilities is not None:
            return self._capabilities
        self._ensure_health_loop()
        if self._capabilities_lock is None:
            self._capabilities_lock = asyncio.Lock()
        async with self._capabilities_lock:
            if self._capabilities is not None:
                return self._capabilities
            order = sorted(self._endpoints, key=lambda e: {True: 0, None: 1, False: 2}[e.healthy])
            last_error: CohearaError | None = None
            for endpoint in order:
                try:
                    capabilities = await endpoint.backend.capabilities()
                except CohearaError as error:
                    if not fails_over(error):
                        raise
                    last_error = error
                    continue
                details = {**capabilities.details, "endpoints": [e.name for e in self._endpoints]}
                self._capabilities = replace(capabilities, details=details)
                return self._capabilities
            assert last_error is not None
            raise last_error

    async def health(self) -> Health:
        """Cheap: the cached state of the endpoints (probed once if never checked); ok when
        at least one endpoint is healthy."""
        self._ensure_health_loop()
        if any(e.healthy is None for e in self._endpoints):
            await self.refresh()
        healthy = [e for e in self._endpoints if e.healthy]
        count = len(self._endpoints)
        version = next((e.last_health.version for e in healthy if e.last_health is not None), None)
        if healthy:
            return Health(True, self.name, f"{len(healthy)} of {count} endpoints healthy", version)
        return Health(False, self.name, f"none of {count} endpoints is healthy")

    async def readiness(self, timeout_s: float) -> list[EndpointStatus]:
        """The cached state; endpoints never checked are checked now (within `timeout_s`)."""
        self._ensure_health_loop()
        if any(e.healthy is None for e in self._endpoints):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.refresh()), timeout=timeout_s)
        return self.endpoints()

    async def refresh(self) -> None:
        """Check every endpoint now, concurrently; one check at a time for the whole pool."""
        running = self._refreshing
        if running is None or running.done() or running.get_loop() is not _loop():
            running = asyncio.ensure_future(self._check_all())
            self._refreshing = running
        await asyncio.shield(running)

    async def _check_all(self) -> None:
        await asyncio.gather(*(self._check(endpoint) for endpoint in self._endpoints))

    async def _check(self, endpoint: _Endpoint) -> None:
        try:
            health = await asyncio.wait_for(
                endpoint.backend.health(), timeout=self.health_timeout_s
            )
        except TimeoutError:
            health = Health(False, endpoint.backend.name, "the health check timed out")
        endpoint.last_health = health
        if health.ok:
            if endpoint.healthy is False:
                # Back on probation: its health check passes, but its calls failed; one
                # more failed call takes it out again, a successful one clears it. (A
                # replica that answers checks but not calls would otherwise cost
                # `eject_after_failures` failed calls every health interval.)
                endpoint.consecutive_failures = min(
                    endpoint.consecutive_failures, self.eject_after_failures - 1
                )
            endpoint.healthy = True
        else:
            endpoint.healthy = False
            endpoint.failed_at = time.monotonic()

    def _ensure_health_loop(self) -> None:
        if self._closed:
            return
        loop = _loop()
        if loop is None:
            return
        task = self._health_task
        if task is not None and not task.done() and task.get_loop() is loop:
            return
        self._health_task = loop.create_task(self._health_loop(), name="coheara-pool-health")

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            with contextlib.suppress(Exception):  # health() never raises; the loop lives on
                await self.refresh()

    async def aclose(self) -> None:
        self._closed = True
        for task in (self._health_task, self._refreshing):
            if task is not None and not task.done() and task.get_loop() is _loop():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._health_task = self._refreshing = None
        for endpoint in self._endpoints:
            await endpoint.backend.aclose()


def _loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
