"""Who may call what: the decision `CallContextMiddleware` makes before any body is read.

With at least one active key (or `required`, which `coheara serve` sets for a
non-loopback bind), every route but the open ones needs `Authorization: Bearer <key>`:
none, malformed, unknown or revoked is a 401 with one message for all; a valid key that
may not call the route's endpoint, or the task of a task route, is a 403. With no active
key and a loopback bind the server stays open, as a single-user tool.

A key store that cannot be read (edited by hand into invalid JSON, made readable by
others) fails closed: every protected route is a 401 until it is fixed, and the reason
goes to the server log, once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from coheara.access.keys import KeyRecord, KeyStore
from coheara.errors import (
    AuthenticationError,
    CohearaError,
    ConfigurationError,
    PermissionDeniedError,
)

log = logging.getLogger("coheara.access")

OPEN_PATHS = frozenset(
    {"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
)
"""Liveness, readiness and the API's own documentation: never behind a key."""
SCHEME = "bearer"
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="coheara"'}


def is_open(method: str, path: str) -> bool:
    """Routes anyone may call: health, docs, and `GET`/`HEAD /` (Ollama clients' probe)."""
    return path in OPEN_PATHS or (path == "/" and method in ("GET", "HEAD"))


def task_for(path: str) -> str | None:
    """The registered task id of `/v1/tasks/{id}`, else None (the path is the client's text)."""
    if not path.startswith("/v1/tasks/"):
        return None
    from coheara.tasks import get_task

    try:
        return get_task(path.removeprefix("/v1/tasks/")).id
    except CohearaError:
        return None


def bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme in any case)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() or None if scheme.lower() == SCHEME else None


@dataclass(frozen=True)
class Decision:
    """`key`: the caller's key (also on a 403); `error`: why it is refused, if it is."""

    key: KeyRecord | None = None
    error: CohearaError | None = None


OPEN = Decision()

_granted: ContextVar[KeyRecord | None] = ContextVar("coheara_granted_key", default=None)


def granted_key() -> KeyRecord | None:
    """The key of the request being served (None when the server is open)."""
    return _granted.get()


@contextmanager
def granting(key: KeyRecord | None) -> Iterator[None]:
    token = _granted.set(key)
    try:
        yield
    finally:
        _granted.reset(token)


def refused() -> AuthenticationError:
    return AuthenticationError(
        "a valid API key is required", hint="send the header Authorization: Bearer <key>"
    )


class Access:
    """The decision for each request, over the key store at hand."""

    def __init__(self, store: KeyStore, *, required: bool = False) -> None:
        self.store = store
        self.required = required
        """Closed even with no active key: `coheara serve` on a non-loopback bind."""
        self._last_problem: str | None = None

    def decide(
        self, method: str, path: str, authorization: str | None, endpoint: str | None
    ) -> Decision:
        """`endpoint`: the route's (native, tasks, openai, ollama, metrics; None for others)."""
        if is_open(method, path):
            return OPEN
        try:
            ring = self.store.current()
        except ConfigurationError as problem:
            if str(problem) != self._last_problem:
                log.error("access: refusing every request: %s", problem)
                self._last_problem = str(problem)
            return Decision(error=refused())
        self._last_problem = None
        if not ring.records and not self.required:
            return OPEN  # no key was ever made (or the store was removed): open on loopback
        key = ring.verify(bearer(authorization))
        if key is None:
            return Decision(error=refused())
        if endpoint is not None and not key.allows_endpoint(endpoint):
            error = PermissionDeniedError(
                f"the key {key.name!r} may not call the {endpoint} endpoints"
            )
            return Decision(key, error)
        if endpoint == "tasks" and path.startswith("/v1/tasks/"):
            task = task_for(path)
            if not key.allows_task(task):
                what = f"task {task}" if task is not None else "this task"
                return Decision(
                    key, PermissionDeniedError(f"the key {key.name!r} may not run {what}")
                )
        return Decision(key)
