"""`create_app`: one engine behind the native, OpenAI and Ollama dialects.

Every route turns its wire format into an `EngineCall` and runs it through
`Engine.stream`, so the context budget, the degeneration guard and schema
validation apply to every dialect alike. Errors are mapped once, from
`coheara.errors`, into each dialect's shape (`server/errors.py`).

The app does not own the engine unless asked (`close_engine=True`): the CLI or
a test that built it closes it. With an audit trail (`audit=`), every engine call
and every model request refused before the engine writes one record; whoever
opened the trail closes it (the app flushes it at shutdown).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field, TypeAdapter
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coheara import __version__
from coheara.access.auth import Access
from coheara.access.keys import KeyStore
from coheara.audit import AuditLog
from coheara.engine import Engine
from coheara.errors import CohearaError
from coheara.logs import AccessLogMiddleware
from coheara.server import health, native, ollama_api, openai_api, tasks_api
from coheara.server.admission import Admission, AdmissionMiddleware
from coheara.server.common import ServerState
from coheara.server.errors import (
    ClientGone,
    coheara_error_handler,
    http_error_handler,
    unexpected_error_handler,
    validation_error_handler,
)
from coheara.server.metrics import HttpMetricsMiddleware, Metrics
from coheara.server.middleware import (
    CallContextMiddleware,
    document_security,
    http_outcome,
    note_failure,
)
from coheara.settings import Settings

DESCRIPTION = """\
Coheara runs MedGemma 1.5 4B on the site's own hardware and returns validated,
traceable drafts for a clinician to review. Every dialect goes through the same
engine: context budget, degeneration guard, structured-output validation.

* **native**: `/v1/generate`, `/v1/extract`, with all the evidence.
* **openai**: `/v1/chat/completions`, `/v1/models`.
* **ollama**: `/api/chat`, `/api/generate`, `/api/tags`, `/api/show`, `/api/ps`,
  `/api/version`.

Accepted model ids: the backend's own id, the configured names
(`COHEARA_MODEL`, `COHEARA_OLLAMA_MODEL`, `COHEARA_OPENAI_MODEL`) and
`medgemma`; case and Ollama's `:latest` tag are ignored. Any other id is a 404.
A local weights folder is listed by its folder name only (its full path is
still accepted). Sampling is greedy unless a request sets a temperature; the
output is capped at the model card's 8192 tokens.

A reply that stays invalid for the requested schema after the repair retries is
a 422 (`output_invalid`), not a 5xx: greedy decoding would fail the same way again.
"""

TAGS = [
    {"name": "native", "description": "The three modes with their evidence."},
    {"name": "openai", "description": "OpenAI-compatible (the official client works unchanged)."},
    {"name": "ollama", "description": "Ollama-compatible (the official client works unchanged)."},
    {"name": "health", "description": "Liveness (/healthz, cheap) and readiness (/readyz)."},
]


class HealthReport(BaseModel):
    status: Literal["ok", "unavailable"]
    version: str = Field(description="Coheara's version.")
    backend: str
    backend_ok: bool
    detail: str
    backend_version: str | None = None


def create_app(
    engine: Engine,
    settings: Settings | None = None,
    *,
    close_engine: bool = False,
    max_body_bytes: int | None = None,
    audit: AuditLog | None = None,
    access: Access | None = None,
) -> FastAPI:
    """The HTTP server for `engine`; `settings` defaults to the engine's own.

    With `close_engine` the app closes the engine (and its backend) at shutdown. With
    `audit` every model call through any dialect is recorded in that trail (`coheara
    serve` opens it from the settings); the app detaches and flushes it at shutdown.
    `access` decides who may call what (default: the keys at `settings.keys_path`, open
    while none is active).
    """
    if audit is not None:
        audit.attach(engine)
    settings = settings or engine.settings
    # Load: slots per backend endpoint, a bounded queue; /metrics fed by an engine observer.
    admission = Admission(
        settings.max_concurrency * max(1, len(engine.backend.endpoints())),
        settings.max_queue,
        settings.queue_timeout_s,
    )
    metrics = Metrics(engine, admission) if settings.metrics_enabled else None
    if metrics is not None:
        engine.observers.append(metrics.observe)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if close_engine:
            await engine.aclose()
        if audit is not None:
            audit.detach(engine)
            await asyncio.to_thread(audit.flush)
        if metrics is not None and metrics.observe in engine.observers:
            engine.observers.remove(metrics.observe)

    app = FastAPI(
        title="Coheara",
        version=__version__,
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes or settings.max_body_bytes)
    # Inside the call context: a refusal (429/503) carries the request id and is audited.
    app.add_middleware(AdmissionMiddleware, admission=admission)
    # Outermost: the request id and surface hold for everything inside, the 413 included.
    app.add_middleware(
        CallContextMiddleware,
        audit=audit,
        backend=engine.backend.name,
        model=engine.backend.model or None,
        access=access or Access(KeyStore(settings.keys_path)),
    )
    # Outside everything: every response, refusals included, is counted and logged.
    if metrics is not None:
        app.add_middleware(HttpMetricsMiddleware, metrics=metrics)
        app.add_api_route(
            "/metrics",
            metrics.endpoint,
            methods=["GET"],
            tags=["health"],
            summary="Prometheus metrics (an API key needs the metrics endpoint)",
            response_class=PlainTextResponse,
            responses={200: {"content": {"text/plain": {}}, "description": "Text format 0.0.4"}},
        )
    app.add_middleware(AccessLogMiddleware)
    app.state.admission = admission
    app.state.coheara = ServerState(engine, settings)
    app.include_router(native.router)
    app.include_router(openai_api.router)
    app.include_router(ollama_api.router)
    app.include_router(tasks_api.router)
    app.state.audit = audit  # /readyz checks its writer
    app.include_router(health.router)
    app.add_api_route(
        "/healthz",
        _healthz,
        methods=["GET"],
        response_model=HealthReport,
        responses={503: {"model": HealthReport, "description": "The backend is not healthy"}},
        tags=["health"],
        summary="Liveness and backend health",
    )
    for method, listed in (("GET", True), ("HEAD", False)):
        app.add_api_route(
            "/",
            _root,
            methods=[method],
            response_class=PlainTextResponse,
            tags=["ollama"],
            summary="Running probe (Ollama clients call it)",
            include_in_schema=listed,
        )
    app.add_exception_handler(
        RequestValidationError, _noting(validation_error_handler, lambda _: "validation_error")
    )
    app.add_exception_handler(CohearaError, _noting(coheara_error_handler))
    app.add_exception_handler(
        HTTPException,
        _noting(http_error_handler, lambda exc: http_outcome(getattr(exc, "status_code", 0))),
    )
    app.add_exception_handler(ClientGone, _noting(_client_gone, lambda _: "cancelled"))
    app.add_exception_handler(Exception, unexpected_error_handler)
    _document_streams(app)
    return app


Handler = Callable[[Request, Exception], Awaitable[Response]]


def _noting(handler: Handler, outcome: Callable[[Exception], str] | None = None) -> Handler:
    """`handler`, after telling the request's audit scope how the request failed."""

    async def noted(request: Request, exc: Exception) -> Response:
        note_failure(exc, outcome(exc) if outcome is not None else None)
        return await handler(request, exc)

    return noted


class BodyLimit:
    """Refuse a body over `max_bytes` with a 413 in the dialect's own error shape.

    The limit is enforced while the body is read (FastAPI re-raises an `HTTPException`
    raised there), so the app's error handlers shape the reply; a declared
    Content-Length over the limit is refused before any byte is read.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        too_large = HTTPException(413, f"request body is larger than {self.max_bytes} bytes")
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise too_large
            return message

        await self.app(scope, limited, send)


async def _healthz(request: Request) -> JSONResponse:
    """Cheap: the process answers, and the backend's own health check (bounded in time)."""
    state: ServerState = request.app.state.coheara
    backend = state.engine.backend
    try:
        health = await asyncio.wait_for(
            backend.health(), timeout=state.settings.connect_timeout_s + 1
        )
        report = HealthReport(
            status="ok" if health.ok else "unavailable",
            version=__version__,
            backend=health.backend,
            backend_ok=health.ok,
            detail=health.detail,
            backend_version=health.version,
        )
    except TimeoutError:
        report = HealthReport(
            status="unavailable",
            version=__version__,
            backend=backend.name,
            backend_ok=False,
            detail="the backend's health check timed out",
        )
    return JSONResponse(report.model_dump(), status_code=200 if report.backend_ok else 503)


async def _root() -> str:
    return "Coheara is running (Ollama- and OpenAI-compatible)"


async def _client_gone(request: Request, exc: Exception) -> Response:
    """Nobody is listening; 499 is what the access log shows (nginx's convention)."""
    return Response(status_code=499)


def _document_streams(app: FastAPI) -> None:
    """Add the stream-line models that the routes reference but FastAPI cannot infer."""
    extra: list[Any] = [native.NativeStreamLine, openai_api.ChatCompletionChunk]
    names = ["NativeStreamLine", "ChatCompletionChunk"]

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
            tags=app.openapi_tags,
        )
        components = document.setdefault("components", {}).setdefault("schemas", {})
        for name, item in zip(names, extra, strict=True):
            schema = TypeAdapter(item).json_schema(ref_template="#/components/schemas/{model}")
            for key, definition in schema.pop("$defs", {}).items():
                components.setdefault(key, definition)
            components.setdefault(name, schema)
        document_security(document)
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]
