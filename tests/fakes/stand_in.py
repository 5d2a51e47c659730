"""An in-process stand-in runtime for load tests: answers in a set time, or when released.

It speaks the engine's own `Backend` interface (no wire format to fake): the reply is
`pong <prompt>`, so a test can check that every answer belongs to its request; it reads
prompt words + 3 tokens (chars / 4 + 3 for a long word) and writes the reply's words. With
`gated`, every call waits until `release()` (a `threading.Event`, set from the test's
thread), which pins calls in flight; it records how many are in flight, the peak, and
how many were cancelled. `endpoints` pretends to be a pool of that many replicas.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator

from coheara.backends.base import (
    Backend,
    Capabilities,
    ChatRequest,
    EndpointStatus,
    Health,
    StreamEvent,
)


class StandIn(Backend):
    name = "stand-in"
    model = "medgemma-stand-in"

    def __init__(self, *, delay_s: float = 0.0, gated: bool = False, endpoints: int = 1) -> None:
        self.delay_s = delay_s
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.replicas = endpoints
        self.fail_with: Exception | None = None
        """Raise this from every call (after the gate), instead of answering."""
        self.active = 0
        self.peak = 0
        self.started = 0
        self.cancelled = 0
        self.completed = 0

    def release(self) -> None:
        self.gate.set()

    async def wait_for_active(self, count: int, timeout_s: float = 10.0) -> None:
        """Until `count` calls are in flight (from the server's loop)."""
        async with asyncio.timeout(timeout_s):
            while self.active < count:
                await asyncio.sleep(0.005)

    async def stream(self, request: ChatRequest) -> AsyncGenerator[StreamEvent, None]:
        self.started += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        done = False
        try:
            while not self.gate.is_set():
                await asyncio.sleep(0.005)
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if self.fail_with is not None:
                raise self.fail_with
            prompt = request.messages[-1].text
            reply = f"pong {prompt}"
            yield StreamEvent(text=reply)
            done = True
            self.completed += 1  # the consumer may close the stream at the closing event
            yield StreamEvent(
                done=True,
                finish_reason="stop",
                prompt_tokens=max(len(prompt.split()), len(prompt) // 4) + 3,
                output_tokens=len(reply.split()),
            )
        except (asyncio.CancelledError, GeneratorExit):
            if not done:
                self.cancelled += 1
            raise
        finally:
            self.active -= 1

    async def capabilities(self) -> Capabilities:
        return Capabilities(
            backend=self.name,
            model=self.model,
            vision=False,
            context_length=8192,
            constrained_decoding=False,
            exact_token_count=True,
        )

    async def health(self) -> Health:
        return Health(ok=True, backend=self.name, detail="stand-in")

    def endpoints(self) -> list[EndpointStatus]:
        return [
            EndpointStatus(
                name=f"http://127.0.0.1:{11434 + i}",
                healthy=True,
                in_flight=self.active if i == 0 else 0,
            )
            for i in range(self.replicas)
        ]
