"""Who is calling and through which door, per request: the call context the audit reads.

`CallContextMiddleware` gives every request a request id (the client's `X-Request-ID`
when it is a plain token, else a new one), echoes it in the response's `X-Request-ID`,
and sets `calling(request_id=..., surface=...)` for the request, the surface read from
the route. With an audit trail, a model route's request also runs in an audit scope: a
request refused before it reached the engine (an image that does not decode, a body
that does not validate, an unknown model) still leaves one record, with its outcome.
The app's error handlers name the outcome (`note_failure`).

With `access`, the request's API key is checked here, before anything reads the body:
a refusal is answered in the route's own dialect (401 with `WWW-Authenticate: Bearer`,
or 403), and on a model route it is audited too (outcome invalid_api_key or
permission_denied). The key's name is the call context's `client`.

Every layer here (and admission, metrics) reads the path the router matches, `route_path`:
without the `root_path` that a proxy prefix (`uvicorn --root-path`) or a mount
(`Mount("/x", app)`) puts in front of it. The raw `scope["path"]` would let a prefixed
request pass as "no known endpoint" while the router still serves it.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coheara.access.auth import CHALLENGE, OPEN, SCHEME, Access, Decision, granting, is_open
from coheara.audit import AuditLog, current_scope
from coheara.audit.observer import Scope as AuditScope
from coheara.context import calling
from coheara.errors import CohearaError
from coheara.server.errors import (
    Dialect,
    dialect_for_path,
    error_response,
    http_code,
    route_path,
)

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
MODEL_ROUTES = frozenset(
    {"/v1/generate", "/v1/extract", "/v1/chat/completions", "/api/chat", "/api/generate"}
)


def surface_for(path: str) -> str | None:
    """native, tasks, openai or ollama, by route; None for the others (health, docs)."""
    if path in ("/v1/generate", "/v1/extract"):
        return "native"
    if path == "/v1/tasks" or path.startswith("/v1/tasks/"):
        return "tasks"
    if path.startswith("/v1/"):
        return "openai"
    if path == "/api" or path.startswith("/api/"):
        return "ollama"
    return None


def endpoint_for(path: str) -> str | None:
    """What an API key must be allowed to call this route: its surface, or metrics."""
    return "metrics" if path == "/metrics" else surface_for(path)


def is_model_call(method: str, path: str) -> bool:
    return method == "POST" and (path in MODEL_ROUTES or path.startswith("/v1/tasks/"))


def request_id_from(headers: Headers) -> str:
    given = headers.get(REQUEST_ID_HEADER, "")
    return given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def _task_fields(path: str) -> dict[str, Any]:
    """A task route's task, only if it is a registered one (the path is the client's text)."""
    from coheara.tasks import get_task

    try:
        spec = get_task(path.removeprefix("/v1/tasks/"))
    except CohearaError:
        return {}
    return {"task_id": spec.id, "task_version": spec.version, "prompt_hash": spec.prompt_hash}


def note_failure(error: BaseException, outcome: str | None = None) -> None:
    """Tell the request's audit scope (if any) how the request failed: the stable code
    (`outcome`, else the error's own), and the error's class; never its message."""
    scope = current_scope()
    if scope is None:
        return
    if outcome is None:
        scope.failed_with(error)
    else:
        scope.failed(outcome, type(error).__name__)


def http_outcome(status: int) -> str:
    return http_code(status)


class CallContextMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        audit: AuditLog | None = None,
        backend: str | None = None,
        model: str | None = None,
        access: Access | None = None,
    ) -> None:
        self.app = app
        self.audit = audit
        self.backend, self.model = backend, model
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        headers = Headers(scope=scope)
        request_id = request_id_from(headers)
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, request_id)
            await send(message)

        decision = OPEN
        if self.access is not None:
            decision = self.access.decide(
                scope["method"], path, headers.get("authorization"), endpoint_for(path)
            )
        context: dict[str, Any] = {
            "request_id": request_id,
            "surface": surface_for(path),
            "client": decision.key.name if decision.key is not None else None,
        }
        if self.audit is None or not is_model_call(scope["method"], path):
            with calling(**context):
                await self._serve(decision, scope, receive, send_with_id, None)
            return
        if context["surface"] == "tasks":
            context.update(_task_fields(path))
        with self.audit.scope(backend=self.backend, model=self.model, **context) as audit_scope:
            await self._serve(decision, scope, receive, send_with_id, audit_scope)
            if status >= 400:
                audit_scope.failed(http_outcome(status), None)

    async def _serve(
        self,
        decision: Decision,
        scope: Scope,
        receive: Receive,
        send: Send,
        audit_scope: AuditScope | None,
    ) -> None:
        """The app, or the refusal in the route's own dialect (the body left unread)."""
        error = decision.error
        if error is None:
            with granting(decision.key):
                await self.app(scope, receive, send)
            return
        if audit_scope is not None:
            audit_scope.failed(error.code, type(error).__name__)
        response = error_response(dialect_for_path(route_path(scope)), error)
        if error.http_status == 401:
            response.headers.update(CHALLENGE)
        await response(scope, receive, send)


_ERROR_SCHEMAS = {
    Dialect.NATIVE: "NativeError",
    Dialect.OPENAI: "OpenAIError",
    Dialect.OLLAMA: "OllamaError",
}


def document_security(document: dict[str, Any]) -> None:
    """Declare the bearer scheme in the OpenAPI document, and the 401 and 403 of every
    protected operation in its dialect's error shape. The scheme is optional per operation:
    a loopback server with no active key needs none."""
    components = document.setdefault("components", {})
    components.setdefault("securitySchemes", {})[SCHEME] = {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key made with `coheara keys create NAME` (coh_...), needed on "
        "every route but health, readiness and docs once the server has an active key.",
    }
    for path, operations in document.get("paths", {}).items():
        for method, operation in operations.items():
            if not isinstance(operation, dict) or is_open(method.upper(), path):
                continue
            operation["security"] = [{SCHEME: []}, {}]
            name = _ERROR_SCHEMAS[dialect_for_path(path)]
            if name not in components.get("schemas", {}):
                continue
            body = {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}
            responses = operation.setdefault("responses", {})
            responses.setdefault(
                "401",
                {
                    "description": "No valid API key (missing, malformed, unknown or revoked)",
                    "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
                    "content": body,
                },
            )
            responses.setdefault(
                "403",
                {"description": "The key may not call this endpoint or task", "content": body},
            )
