"""Admission control: a bounded number of model calls in flight, a bounded FIFO queue.

Every model call (`is_model_call`) takes a slot before anything reads its body, so a
request that waits holds only its headers. Slots = `max_concurrency` x the backend's
endpoints (a pool of replicas has several). At most `max_queue` requests wait, first
come first served; one more, or a wait past `queue_timeout_s`, is refused with
`ServerBusyError`: 429 with Retry-After (native, tasks, OpenAI) or, as Ollama itself
answers when its queue is full, 503 with `{"error": ...}` and Retry-After. A slot is
held until the response is completely sent (streams included) or the client is gone,
and released whatever happens, cancellation included.

The body is read inside the slot, so it has a deadline: the whole body must arrive within
`body_timeout_s` of the slot being granted (by default the queue timeout, the bound the
operator already set on how long a call may wait without progress). A client that sends
its headers and then withholds or trickles the body gets a 408 (`Connection: close`, the
rest is never read) and its slot goes back; without it, a few such clients would hold
every slot for as long as they like.

The middleware sits inside `CallContextMiddleware`, so a refusal carries the request
id and is audited with outcome `server_busy` (`request_timeout` for a late body).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coheara.errors import ServerBusyError
from coheara.server.errors import Dialect, dialect_for_path, error_body, route_path
from coheara.server.middleware import is_model_call, note_failure

OLLAMA_BUSY = "server busy, please try again.  maximum pending requests exceeded"
"""What Ollama answers (with a 503) when its own queue is full; its clients know it."""
MAX_RETRY_AFTER_S = 60


class Admission:
    """Slots and a FIFO queue of waiters; one per app, used on the event loop only.

    A freed slot is handed straight to the first waiter (`in_flight` does not drop in
    between), so a newcomer can never overtake a request that is already waiting.
    """

    def __init__(
        self, slots: int, max_queue: int, timeout_s: float, body_timeout_s: float | None = None
    ) -> None:
        if slots < 1:
            raise ValueError("admission needs at least one slot")
        self.slots = slots
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.body_timeout_s = timeout_s if body_timeout_s is None else body_timeout_s
        """How long an admitted call may take to send its whole body (default: `timeout_s`)."""
        self.in_flight = 0
        self.refused = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._hold_s = 1.0
        """A moving average of how long a slot is held: the base of Retry-After."""

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        """Take a slot, waiting in line if need be; `ServerBusyError` when the line is full
        or the wait runs out."""
        if self.in_flight < self.slots and not self._waiters:
            self.in_flight += 1
            return
        if len(self._waiters) >= self.max_queue:
            raise self._busy(f"{self.in_flight} requests in flight and {self.waiting} waiting")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self.timeout_s):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot arrived as the wait ended: pass it on
            else:
                waiter.cancel()
                self._remove(waiter)
            if isinstance(exc, TimeoutError):
                raise self._busy(f"no slot freed within {self.timeout_s:g} s") from None
            raise

    def release(self, held_s: float | None = None) -> None:
        """Give a slot back: to the first live waiter, else to the pool."""
        if held_s is not None:
            self._hold_s = 0.9 * self._hold_s + 0.1 * held_s
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot changes hands; in_flight stays
                return
        self.in_flight = max(0, self.in_flight - 1)

    def retry_after_s(self) -> int:
        """About when a slot should be free for one more: the line ahead, at the recent
        pace; whole seconds, 1 to 60."""
        estimate = self._hold_s * (self.waiting + 1) / self.slots
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(estimate)))

    def _busy(self, why: str) -> ServerBusyError:
        self.refused += 1
        return ServerBusyError(
            f"the server is busy ({why}); retry later",
            retry_after_s=self.retry_after_s(),
        )

    def _remove(self, waiter: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):  # already handed a slot and dropped
            self._waiters.remove(waiter)


def body_deadline(receive: Receive, seconds: float) -> Receive:
    """`receive`, with the whole request body due within `seconds` from now.

    Past the deadline the read raises a 408 `HTTPException` (FastAPI re-raises one raised
    while it reads the body, so the app's handlers answer in the route's dialect), with
    `Connection: close`: the rest of the body is never read. Once the body is complete,
    `receive` passes through unbounded: a streaming response waits on it for the client's
    disconnect.
    """
    deadline = asyncio.get_running_loop().time() + seconds
    complete = False

    async def receive_in_time() -> Message:
        nonlocal complete
        if complete:
            return await receive()
        timer = asyncio.timeout_at(deadline)
        try:
            async with timer:
                message = await receive()
        except TimeoutError:
            if not timer.expired():
                raise
            raise HTTPException(
                408,
                f"the request body did not arrive within {seconds:g} s",
                headers={"Connection": "close"},
            ) from None
        if message["type"] != "http.request" or not message.get("more_body", False):
            complete = True
        return message

    return receive_in_time


def busy_response(path: str, error: ServerBusyError) -> JSONResponse:
    """429 with Retry-After in the dialect's error shape; Ollama's own 503 in its dialect."""
    headers = {"Retry-After": str(error.retry_after_s)}
    dialect = dialect_for_path(path)
    if dialect is Dialect.OLLAMA:
        return JSONResponse({"error": OLLAMA_BUSY}, status_code=503, headers=headers)
    return JSONResponse(error_body(dialect, error), status_code=error.http_status, headers=headers)


class AdmissionMiddleware:
    """Hold a slot around every model call's whole exchange; refuse the overflow."""

    def __init__(self, app: ASGIApp, admission: Admission) -> None:
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        if not is_model_call(scope["method"], path):
            await self.app(scope, receive, send)
            return
        try:
            await self.admission.acquire()
        except ServerBusyError as error:
            note_failure(error)
            await busy_response(path, error)(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            await self.app(scope, body_deadline(receive, self.admission.body_timeout_s), send)
        finally:
            self.admission.release(time.perf_counter() - started)
