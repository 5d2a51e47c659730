"""A blocking twin of `Engine` for scripts and notebooks (where a loop may already run).

It owns one event loop on a daemon thread, so backend connections made on the
first call stay valid for later ones.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from coheara.engine.result import ExtractionResult, GenerationResult, StreamChunk

if TYPE_CHECKING:
    from coheara.engine.engine import Engine

_DONE = object()


class SyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def _run(self, coroutine: Any) -> Any:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except BaseException:  # Ctrl-C in the caller's thread stops the generation too
            future.cancel()
            raise

    def generate(self, prompt: str | None = None, **kwargs: Any) -> GenerationResult:
        return self._run(self.engine.generate(prompt, **kwargs))

    def extract(self, prompt: str | None = None, **kwargs: Any) -> ExtractionResult:
        return self._run(self.engine.extract(prompt, **kwargs))

    def run_task(self, task: str, request: Any, **kwargs: Any) -> Any:
        return self._run(self.engine.run_task(task, request, **kwargs))

    def stream(self, prompt: str | None = None, **kwargs: Any) -> Iterator[StreamChunk]:
        """Chunks as they come; breaking out of the loop cancels the generation."""
        items: queue.Queue[Any] = queue.Queue()
        agen: AsyncIterator[StreamChunk] = self.engine.stream(prompt, **kwargs)

        async def pump() -> None:
            try:
                async for chunk in agen:
                    items.put(chunk)
            except BaseException as exc:  # handed to the caller's thread
                items.put(exc)
            finally:
                items.put(_DONE)

        future = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while (item := items.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            future.cancel()

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self.engine.aclose())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    def __enter__(self) -> SyncEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
