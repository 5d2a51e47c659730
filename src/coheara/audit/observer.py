"""`AuditLog`: the engine observer that writes one audit record per call.

The observer only queues the call's record (microseconds, on the caller's thread: in
the server, the event loop). One writer thread computes the keyed digests (an image
is 2.4 MB of pixels to hash), links the records into the chain and commits them,
several per transaction when calls come faster than one commit. `flush()` waits for
what was queued; `close()` writes the rest and stops. The queue is bounded: a writer
that falls behind slows its callers down rather than letting records pile up.

Where content retention is on (a `ContentKey`), the writer also encrypts each call's
input and output into the content table, and purges content older than the retention
period: when it starts and then every `PURGE_INTERVAL_S`.

A request refused before it reached the engine (an image that does not decode, a
task input that does not validate) is a call attempt too: inside `scope()`, a block
that fails without any engine call leaves one record with its outcome.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coheara.audit import content
from coheara.audit.content import ContentKey
from coheara.audit.digest import AuditKey
from coheara.audit.record import build, iso_time
from coheara.audit.store import AuditStore
from coheara.context import CallContext, call_context, calling
from coheara.engine.engine import CallRecord
from coheara.errors import CohearaError
from coheara.settings import Settings

if TYPE_CHECKING:
    from coheara.engine import Engine

log = logging.getLogger("coheara.audit")

QUEUE_SIZE = 1024
BATCH = 256
LINGER_S = 0.01
"""How long the writer waits for more records before it commits: under load, one
transaction carries many records (a commit costs more than a record)."""
PURGE_INTERVAL_S = 3600.0
DEFAULT_RETENTION_DAYS = 30.0


def default_key_file(path: Path) -> Path:
    """`audit.key` beside `audit.sqlite3` (the database's name with `.key`)."""
    return path.expanduser().with_suffix(".key")


@dataclass
class Scope:
    """One request or command: counts its engine calls and notes how it failed."""

    log: AuditLog
    backend: str | None
    model: str | None
    context: CallContext
    started_at: float = field(default_factory=time.time)
    clock: float = field(default_factory=time.perf_counter)
    calls: int = 0
    outcome: str | None = None
    error_class: str | None = None

    def failed(self, outcome: str, error_class: str | None) -> None:
        """Note the request's failure (the first one noted stands)."""
        if self.outcome is None:
            self.outcome, self.error_class = outcome, error_class

    def failed_with(self, error: BaseException) -> None:
        self.failed(outcome_of(error), type(error).__name__)


_scope: ContextVar[Scope | None] = ContextVar("coheara_audit_scope", default=None)


def current_scope() -> Scope | None:
    return _scope.get()


def outcome_of(error: BaseException) -> str:
    """An error's stable code, never its message."""
    if isinstance(error, CohearaError):
        return error.code
    if isinstance(error, KeyboardInterrupt | GeneratorExit) or type(error).__name__ in (
        "CancelledError",
        "ClientGone",
    ):
        return "cancelled"
    return "internal_error"


class _Flush:
    def __init__(self) -> None:
        self.done = threading.Event()


_STOP = object()


class AuditLog:
    """The audit trail in `path`, digests keyed with `key`.

    Attach it to an engine (`attach`) or hand `observe` to `engine.observers` yourself.
    """

    def __init__(
        self,
        path: Path,
        key: AuditKey,
        *,
        queue_size: int = QUEUE_SIZE,
        content_key: ContentKey | None = None,
        retention_days: float = DEFAULT_RETENTION_DAYS,
        purge_interval_s: float = PURGE_INTERVAL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`content_key`: retain each call's content, encrypted (None: retain nothing);
        content older than `retention_days` (by `clock`, Unix time) is purged either way."""
        self.path = path.expanduser()
        self.key = key
        self.content_key = content_key
        self.retention_days = retention_days
        self.purge_interval_s = purge_interval_s
        self.clock = clock
        self.purged = 0
        self._store = AuditStore(self.path)  # migrated now: a bad path fails at start-up
        self._queue: queue.Queue[Any] = queue.Queue(queue_size)
        self._closed = False
        self._attached: dict[int, Callable[[CallRecord], None]] = {}
        self.written = 0
        self.errors = 0
        self.dropped = 0
        self.costs: deque[tuple[int, float, float]] = deque(maxlen=100_000)
        """Per committed batch: records, seconds building them (digests), seconds appending."""
        self._thread = threading.Thread(target=self._run, name="coheara-audit", daemon=True)
        self._thread.start()

    # ----- opening --------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, key_file: Path | None = None, **options: Any) -> AuditLog:
        """The trail in `path`, its key in `key_file` (default `audit.key` beside it),
        each created on first use; `options` as for the constructor."""
        key = AuditKey.load(key_file or default_key_file(path), create=True)
        return cls(path, key, **options)

    @classmethod
    def from_settings(cls, settings: Settings, *, default: bool) -> AuditLog | None:
        """The configured trail, or None where auditing is off; `default`: whether an
        unset `audit_enabled` means on (`coheara serve`) or off (the CLI, the Python API)."""
        enabled = settings.audit_enabled if settings.audit_enabled is not None else default
        if not enabled:
            return None
        content_key = ContentKey.required(settings) if settings.audit_retain_content else None
        return cls.open(
            settings.audit_path,
            settings.audit_key_file,
            content_key=content_key,
            retention_days=settings.audit_retention_days,
        )

    # ----- observing ------------------------------------------------------------------

    def observe(
        self, call: CallRecord, backend: str | None = None, model: str | None = None
    ) -> None:
        """The engine observer: queue one record for `call`; `backend` and `model` name the
        engine's runtime for a call that failed before it had a result."""
        scope = _scope.get()
        if scope is not None and scope.log is self:
            scope.calls += 1
        if self._closed:
            self.dropped += 1
            return
        self._queue.put((call, backend, model))

    def attach(self, engine: Engine) -> None:
        """Observe every call of `engine` until `detach`."""
        if id(engine) in self._attached:
            return
        backend, model = engine.backend.name, engine.backend.model or None

        def observer(call: CallRecord) -> None:
            self.observe(call, backend, model)

        self._attached[id(engine)] = observer
        engine.observers.append(observer)

    def detach(self, engine: Engine) -> None:
        observer = self._attached.pop(id(engine), None)
        if observer is not None:
            with contextlib.suppress(ValueError):
                engine.observers.remove(observer)

    @contextmanager
    def scope(
        self, *, backend: str | None = None, model: str | None = None, **context: Any
    ) -> Iterator[Scope]:
        """One request or command, with `context` (surface, request_id, ...) for its calls.

        If the block ends failed (an exception, or `Scope.failed`) without any engine call
        having been observed, one record of the refusal is written.
        """
        with calling(**context) as merged:
            scope = Scope(self, backend, model, merged)
            token = _scope.set(scope)
            try:
                yield scope
            except BaseException as error:
                scope.failed_with(error)
                raise
            finally:
                _scope.reset(token)
                if scope.calls == 0 and scope.outcome is not None:
                    self.observe(
                        CallRecord(
                            started_at=scope.started_at,
                            duration_s=time.perf_counter() - scope.clock,
                            outcome=scope.outcome,
                            error_class=scope.error_class,
                            context=call_context(),
                            turns=(),
                            schema=None,
                            result=None,
                        ),
                        backend,
                        model,
                    )

    # ----- writing --------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """Whether records are still written: not closed, the writer thread running."""
        return not self._closed and self._thread.is_alive()

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Wait until everything queued so far is written (or failed); False on timeout."""
        if self._closed or not self._thread.is_alive():
            return True
        marker = _Flush()
        self._queue.put(marker)
        return marker.done.wait(timeout)

    def close(self) -> None:
        """Write what is queued, then stop; later calls are counted in `dropped`."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout=60)
        self._store.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reader(self) -> AuditStore:
        """A store of its own for reading this trail (the writer's connection is its own)."""
        return AuditStore(self.path)

    def _run(self) -> None:
        self._purge()
        next_purge = time.monotonic() + self.purge_interval_s
        stop = False
        while not stop:
            try:
                first = self._queue.get(timeout=max(0.0, next_purge - time.monotonic()))
            except queue.Empty:
                first = None
            if time.monotonic() >= next_purge:
                self._purge()
                next_purge = time.monotonic() + self.purge_interval_s
            if first is None:
                continue
            batch = [first]
            deadline = time.monotonic() + LINGER_S
            while len(batch) < BATCH and isinstance(batch[-1], tuple):  # a flush, a stop: now
                try:
                    batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            flushes = [item for item in batch if isinstance(item, _Flush)]
            stop = any(item is _STOP for item in batch)
            calls = [item for item in batch if isinstance(item, tuple)]
            self._write(calls)
            for marker in flushes:
                marker.done.set()

    def _write(self, calls: list[tuple[CallRecord, str | None, str | None]]) -> None:
        if not calls:
            return
        started = time.perf_counter()
        records = []
        contents: list[bytes | None] | None = [] if self.content_key is not None else None
        for call, backend, model in calls:
            try:
                record = build(call, self.key, backend, model)
                retained = (
                    content.document(call, record.image_digest_list)
                    if contents is not None
                    else None
                )
            except Exception as exc:  # the class only: a message may quote the input
                self.errors += 1
                log.error("audit: cannot build a record (%s)", type(exc).__name__)
                continue
            records.append(record)
            if contents is not None:
                contents.append(retained)
        built = time.perf_counter()
        try:
            self._store.append(records, self.key, contents, self.content_key)
        except Exception as exc:
            self.errors += len(records)
            log.error("audit: cannot write %d record(s) (%s)", len(records), type(exc).__name__)
            return
        self.written += len(records)
        self.costs.append((len(records), built - started, time.perf_counter() - built))

    def purge(self) -> int:
        """Delete retained content older than the retention period, now (the writer does
        it on its own at start and every `purge_interval_s`); returns the rows deleted."""
        store = AuditStore(self.path)
        try:
            return store.purge_content(self._cutoff())
        finally:
            store.close()

    def _cutoff(self) -> str:
        return iso_time(self.clock() - self.retention_days * 86400.0)

    def _purge(self) -> None:
        try:
            self.purged += self._store.purge_content(self._cutoff())
        except Exception as exc:
            self.errors += 1
            log.error("audit: cannot purge retained content (%s)", type(exc).__name__)


def attach(engine: Engine, settings: Settings | None = None) -> AuditLog | None:
    """The Python API's door: audit `engine`'s calls where `audit_enabled` is true (an unset
    setting means off here). Close the returned log when done (it is a context manager)."""
    audit = AuditLog.from_settings(settings or engine.settings, default=False)
    if audit is not None:
        audit.attach(engine)
    return audit
