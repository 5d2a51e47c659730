"""Logging for `coheara serve`: JSON lines or readable text, with request ids, no PHI.

`configure_logging(settings)` puts one handler on the root logger (stderr), in
`settings.log_format` ("json": one object per line with time, level, logger, message
and the request id of the call in progress; "text": readable lines) at
`settings.log_level`. uvicorn's own loggers go through it and its access log is off:
it prints raw paths and query strings, which can carry client text. Instead
`AccessLogMiddleware` writes one access line per request with the route TEMPLATE
(`/v1/tasks/{task_id}`), never the raw path.

An exception's message can quote its input (a parser quoting the text it choked on),
so a logged exception shows its class and stack frames, never its message.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coheara.context import call_context

if TYPE_CHECKING:
    from coheara.settings import Settings

ACCESS_LOGGER = "coheara.access"
ACCESS_FIELDS = ("method", "route", "status", "duration_ms", "client")
UNMATCHED_ROUTE = "-"
"""The access line's route for a path that matched no route (the raw path may be text)."""
_HANDLER_NAME = "coheara"


def exception_summary(record: logging.LogRecord) -> str | None:
    """The exception's class and stack, without its message (which may quote input)."""
    if not record.exc_info or record.exc_info[0] is None:
        return None
    kind, _, tb = record.exc_info
    stack = "".join(traceback.format_tb(tb)) if tb is not None else ""
    return f"{stack}{kind.__module__}.{kind.__qualname__} (message withheld)"


def _request_id(record: logging.LogRecord) -> str | None:
    given = getattr(record, "request_id", None)
    return given if isinstance(given, str) else call_context().request_id


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": _request_id(record),
        }
        for name in ACCESS_FIELDS:
            if hasattr(record, name):
                line[name] = getattr(record, name)
        error = exception_summary(record)
        if error is not None:
            line["exception"] = error
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """`time level logger [request id] message`, exceptions without their message."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(rid)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        request_id = _request_id(record)
        record.rid = f" [{request_id}]" if request_id else ""
        saved = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None  # formatted below, message withheld
        try:
            line = super().format(record)
        finally:
            record.exc_info, record.exc_text = saved
        error = exception_summary(record)
        return f"{line}\n{error}" if error is not None else line


def configure_logging(settings: Settings, stream: TextIO | None = None) -> logging.Handler:
    """Route every log line (uvicorn's included) through one handler; returns it.

    Calling it again replaces the handler it installed before.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # The HTTP and runtime clients log each backend call (its URL, credentials included)
    # and at debug its request body (patient text): never below warning, whatever the level.
    for name in ("httpx", "httpcore", "openai", "ollama"):
        logging.getLogger(name).setLevel("WARNING")
    access = logging.getLogger("uvicorn.access")
    access.handlers.clear()
    access.propagate = False
    access.disabled = True  # ours is AccessLogMiddleware
    return handler


def route_template(scope: Scope) -> str:
    """The matched route's template (`/v1/tasks/{task_id}`), never the raw path."""
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    return template if isinstance(template, str) else UNMATCHED_ROUTE


class AccessLogMiddleware:
    """One access line per request, after the response: route template, status, time.

    Outermost, so refusals (401, 413, 429) are logged too; the request id is the one
    the response carries in X-Request-ID.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.log = logging.getLogger(ACCESS_LOGGER)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.log.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        request_id: str | None = None

        async def send_noting(message: Message) -> None:
            nonlocal status, request_id
            if message["type"] == "http.response.start":
                status = int(message["status"])
                for name, value in message.get("headers", ()):
                    if name.lower() == b"x-request-id":
                        request_id = value.decode("latin-1")
            await send(message)

        try:
            await self.app(scope, receive, send_noting)
        finally:
            duration_ms = round((time.perf_counter() - started) * 1000.0, 2)
            method, route = scope["method"], route_template(scope)
            client = scope.get("client")
            self.log.info(
                "%s %s %d %.1fms",
                method,
                route,
                status,
                duration_ms,
                extra={
                    "method": method,
                    "route": route,
                    "status": status,
                    "duration_ms": duration_ms,
                    "client": client[0] if client else None,
                    "request_id": request_id,
                },
            )
