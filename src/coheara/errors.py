"""Every error Coheara raises, grouped by what the caller can do about it.

Each class carries its HTTP status, its CLI exit code and a stable machine code,
so the server and the CLI map an error once, here, and never invent their own.
Messages never contain patient text: they state numbers, model ids and fixes.

    CohearaError                      exit 1   500
    ├── ConfigurationError            exit 3   500  fix the settings
    ├── InvalidRequestError           exit 4   400  fix the request
    │   ├── ImageError                exit 4   400
    │   ├── UnsupportedCapabilityError exit 4  400  e.g. image to a text-only model
    │   ├── TaskNotFoundError         exit 4   404  no task with that id
    │   ├── TaskRefusedError          exit 4   400  the task declines this request by policy
    │   ├── RequestTooLargeError      exit 4   413  body, text or image count over a limit
    │   └── ContextOverflowError      exit 5   400  shorten the input or raise the window
    │       └── SilentTruncationError exit 5   400  the backend dropped part of the prompt
    ├── AuthenticationError           exit 12  401  no API key, or not a valid one
    ├── PermissionDeniedError         exit 12  403  the key may not call this
    ├── ServerBusyError               exit 7   429  this server's queue is full: retry after
    ├── ModelNotFoundError            exit 6   404  pull or configure the model
    ├── BackendUnavailableError       exit 7   503  start the runtime, or retry later
    │   └── BackendOverloadedError    exit 7   503  its queue is full: retry later
    ├── BackendTimeoutError           exit 8   504
    ├── BackendError                  exit 9   502  the runtime failed
    ├── OutputError                   exit 10  422  the model's output was unusable
    │   └── OutputValidationError     exit 10  422  invalid after the repair retries
    ├── AuditIntegrityError           exit 11  500  the audit trail was altered
    └── EvaluationRegressionError     exit 13  -    `coheara eval --gate`: a metric dropped
"""

from __future__ import annotations

from typing import Any, ClassVar


class CohearaError(Exception):
    """Root of the tree; `str(error)` is the one line a user sees."""

    http_status: ClassVar[int] = 500
    exit_code: ClassVar[int] = 1
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, hint: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = details

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": str(self)}
        if self.details:
            body["details"] = self.details
        return body


class ConfigurationError(CohearaError):
    exit_code = 3
    code = "configuration_error"


class InvalidRequestError(CohearaError):
    http_status = 400
    exit_code = 4
    code = "invalid_request"


class ImageError(InvalidRequestError):
    code = "invalid_image"


class UnsupportedCapabilityError(InvalidRequestError):
    code = "unsupported_capability"


class TaskNotFoundError(InvalidRequestError):
    http_status = 404
    code = "task_not_found"


class TaskRefusedError(InvalidRequestError):
    """A well-formed request the task declines by design (SLM-05 writes English only): a
    refusal `coheara eval` counts as such, unlike a malformed request."""

    code = "task_refused"


REFUSAL = "task_refused"
"""The pydantic error type an input validator raises (`PydanticCustomError(REFUSAL, ...)`)
for a policy refusal, so that `validate_input` raises `TaskRefusedError`."""


class RequestTooLargeError(InvalidRequestError):
    http_status = 413
    code = "request_too_large"


class ContextOverflowError(InvalidRequestError):
    exit_code = 5
    code = "context_length_exceeded"


class SilentTruncationError(ContextOverflowError):
    code = "prompt_truncated"


class AuthenticationError(CohearaError):
    """No API key, or one that is unknown or revoked; never says which."""

    http_status = 401
    exit_code = 12
    code = "invalid_api_key"


class PermissionDeniedError(CohearaError):
    """A valid key that may not call this endpoint or task."""

    http_status = 403
    exit_code = 12
    code = "permission_denied"


class ServerBusyError(CohearaError):
    """This server's admission queue is full. `retry_after_s` goes out as Retry-After;
    the Ollama dialect answers 503 (what Ollama itself answers when its queue is full)."""

    http_status = 429
    exit_code = 7
    code = "server_busy"

    def __init__(self, message: str, *, retry_after_s: int = 1, **details: Any) -> None:
        super().__init__(message, **details)
        self.retry_after_s = retry_after_s


class ModelNotFoundError(CohearaError):
    http_status = 404
    exit_code = 6
    code = "model_not_found"


class BackendUnavailableError(CohearaError):
    http_status = 503
    exit_code = 7
    code = "backend_unavailable"


class BackendOverloadedError(BackendUnavailableError):
    code = "backend_overloaded"


class BackendTimeoutError(CohearaError):
    http_status = 504
    exit_code = 8
    code = "backend_timeout"


class BackendError(CohearaError):
    http_status = 502
    exit_code = 9
    code = "backend_error"


class OutputError(CohearaError):
    # 422, not 5xx: greedy decoding would fail the same way again, and clients retry 5xx.
    http_status = 422
    exit_code = 10
    code = "output_error"


class OutputValidationError(OutputError):
    code = "output_invalid"


class AuditIntegrityError(CohearaError):
    """The audit trail's hash chain or head seal does not verify (`coheara audit verify`)."""

    exit_code = 11
    code = "audit_integrity"


class EvaluationRegressionError(CohearaError):
    """`coheara eval --gate`: a metric fell below the baseline beyond its tolerance."""

    exit_code = 13
    code = "evaluation_regression"
