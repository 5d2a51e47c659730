"""One error, three wire shapes: native, OpenAI and Ollama.

Every failure is a `coheara.errors.CohearaError` (or is turned into one here),
so its status and machine code come from `errors.py` and are never invented
per route. Only the body differs by dialect:

    native  {"error": {"code", "message", "details"}}    status = error.http_status
    openai  {"error": {"message", "type", "param", "code"}}
    ollama  {"error": "message"}

Request-validation failures keep FastAPI's status in the native dialect (422)
and become 400 in the compatible ones, as OpenAI and Ollama answer. The input
values Pydantic quotes are dropped: they may be patient text. An unexpected
exception becomes a 500 with a generic message; the traceback goes to the log only.
"""

from __future__ import annotations

import enum
import logging
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette._utils import get_route_path
from starlette.exceptions import HTTPException
from starlette.types import Scope

from coheara.errors import CohearaError, InvalidRequestError, ModelNotFoundError
from coheara.logs import route_template

log = logging.getLogger("coheara.server")


class Dialect(enum.Enum):
    NATIVE = "native"
    OPENAI = "openai"
    OLLAMA = "ollama"


NATIVE_PATHS = ("/v1/generate", "/v1/extract", "/healthz")


def route_path(scope: Scope) -> str:
    """The path as the router matches it: `scope["path"]` less the app's `root_path`.

    Starlette has no public API for it; its router and FastAPI's call this same helper,
    so what access, admission, audit, metrics and error shapes see is what gets routed.
    """
    return get_route_path(scope)


_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "request_too_large",
}


def http_code(status: int) -> str:
    """The stable code of a framework-level refusal (unknown route, slow body, ...)."""
    return _HTTP_CODES.get(status, "http_error")


def dialect_for_path(path: str) -> Dialect:
    """Which wire shape a path answers in, also for unknown paths under a dialect's prefix."""
    if path.startswith("/api/") or path == "/api":
        return Dialect.OLLAMA
    if path.startswith("/v1/") and not path.startswith(NATIVE_PATHS):
        return Dialect.OPENAI
    return Dialect.NATIVE


# ----- the documented bodies ----------------------------------------------------------


class NativeErrorDetail(BaseModel):
    code: str = Field(description="Stable machine code, e.g. context_length_exceeded.")
    message: str = Field(description="One line for a person; never contains patient text.")
    details: dict[str, Any] | None = Field(
        None, description="Numbers behind the error (token counts, window, ...)."
    )


class NativeError(BaseModel):
    """The native dialect's error body."""

    error: NativeErrorDetail


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error for 4xx, server_error for 5xx.")
    param: str | None = None
    code: str | None = Field(None, description="Coheara's machine code (OpenAI's where equal).")


class OpenAIError(BaseModel):
    """OpenAI's error body, which the official clients parse."""

    error: OpenAIErrorDetail


class OllamaError(BaseModel):
    """Ollama's error body: one string."""

    error: str


def _responses(model: type[BaseModel], statuses: dict[int, str]) -> dict[int | str, Any]:
    return {status: {"model": model, "description": text} for status, text in statuses.items()}


_OUTPUT_UNUSABLE = (
    "The model's output was unusable (invalid for the schema after the repair retries); "
    "not worth retrying unchanged: greedy decoding fails the same way again"
)
_COMMON = {
    404: "Unknown model",
    500: "Internal error",
    502: "The backend failed",
    503: "The backend is unavailable or overloaded",
    504: "The backend timed out",
}
NATIVE_ERROR_RESPONSES = _responses(
    NativeError,
    {
        400: "Invalid request, invalid image, unsupported capability or context overflow",
        422: "The body does not match the request schema (validation_error), or "
        f"(output_invalid): {_OUTPUT_UNUSABLE}",
        **_COMMON,
    },
)
OPENAI_ERROR_RESPONSES = _responses(
    OpenAIError,
    {400: "Invalid request or context overflow", 422: _OUTPUT_UNUSABLE, **_COMMON},
)
OLLAMA_ERROR_RESPONSES = _responses(
    OllamaError, {400: "Invalid request", 422: _OUTPUT_UNUSABLE, **_COMMON}
)


# ----- mapping ------------------------------------------------------------------------


class ClientGone(Exception):
    """The client closed the connection; the generation was cancelled and nobody is listening."""


def openai_error_type(status: int) -> str:
    return "invalid_request_error" if status < 500 else "server_error"


def native_body(error: CohearaError) -> dict[str, Any]:
    return {"error": error.to_dict()}


def openai_body(error: CohearaError, param: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": str(error),
            "type": openai_error_type(error.http_status),
            "param": param if param is not None else error.details.get("param"),
            "code": error.code,
        }
    }


def ollama_body(error: CohearaError) -> dict[str, Any]:
    return {"error": str(error)}


def error_body(dialect: Dialect, error: CohearaError) -> dict[str, Any]:
    if dialect is Dialect.OPENAI:
        return openai_body(error)
    if dialect is Dialect.OLLAMA:
        return ollama_body(error)
    return native_body(error)


def error_response(dialect: Dialect, error: CohearaError) -> JSONResponse:
    return JSONResponse(error_body(dialect, error), status_code=error.http_status)


def internal_error() -> CohearaError:
    return CohearaError("internal server error; see the server log")


def _validation_summary(exc: RequestValidationError) -> tuple[str, list[dict[str, Any]], str]:
    """Where and which rule failed, without the offending values."""
    errors: list[dict[str, Any]] = []
    for item in exc.errors()[:20]:
        loc = [str(part) for part in item.get("loc", ()) if part != "body"]
        errors.append({"loc": loc, "type": item.get("type"), "msg": item.get("msg")})
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(first["loc"]) or "body"
    return f"invalid request body: {where}: {first['msg']}", errors, where


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    dialect = dialect_for_path(route_path(request.scope))
    message, errors, where = _validation_summary(exc)
    if dialect is Dialect.NATIVE:
        body = {
            "error": {"code": "validation_error", "message": message, "details": {"errors": errors}}
        }
        return JSONResponse(body, status_code=422)
    error = InvalidRequestError(message)
    if dialect is Dialect.OPENAI:
        return JSONResponse(openai_body(error, param=where), status_code=400)
    return JSONResponse(ollama_body(error), status_code=400)


async def coheara_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CohearaError)
    return error_response(dialect_for_path(route_path(request.scope)), exc)


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Unknown route, wrong method, body too large: the framework's own errors, in our shapes."""
    assert isinstance(exc, HTTPException)
    dialect = dialect_for_path(route_path(request.scope))
    detail = exc.detail if isinstance(exc.detail, str) else "request refused"
    code = http_code(exc.status_code)
    body: dict[str, Any]
    if dialect is Dialect.NATIVE:
        body = {"error": {"code": code, "message": detail}}
    elif dialect is Dialect.OPENAI:
        kind = openai_error_type(exc.status_code)
        body = {"error": {"message": detail, "type": kind, "param": None, "code": code}}
    else:
        body = {"error": detail.lower()}
    return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """The catch-all: a bare 500 in the client's dialect.

    Starlette re-raises the exception after this reply, so the ASGI server logs the
    traceback once; only the route is noted here.
    """
    route = route_template(request.scope)  # never the raw path: it may carry client text
    log.error("unhandled %s on %s %s", type(exc).__name__, request.method, route)
    return error_response(dialect_for_path(route_path(request.scope)), internal_error())


def as_coheara_error(exc: BaseException) -> CohearaError:
    """For errors that happen after a stream began: log the unexpected ones, never leak them."""
    if isinstance(exc, CohearaError):
        return exc
    log.error("unhandled error while streaming", exc_info=exc)
    return internal_error()


def unknown_model(dialect: Dialect, name: str, served: list[str]) -> ModelNotFoundError:
    """Each dialect's own wording, so clients that match on it keep working."""
    listing = ", ".join(f'"{n}"' for n in served)
    if dialect is Dialect.OLLAMA:
        message = f'model "{name}" not found, try pulling it first'
    elif dialect is Dialect.OPENAI:
        message = f"The model `{name}` does not exist or you do not have access to it."
    else:
        message = f'model "{name}" is not served here'
    return ModelNotFoundError(
        message, hint=f"this server serves {listing}", model=name, param="model"
    )
