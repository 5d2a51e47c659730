"""Ollama, through the official `ollama` client (AsyncClient).

The client's `chat()` cannot send `truncate`/`shift`, so the `/api/chat`
payload is built here and sent through the client's own `_request`, which keeps
the official HTTP handling and error mapping (`ResponseError`). Every call
carries the one configured `num_ctx`: a different value per request would
reload the model, and a missing one lets Ollama fall back to its small default
and silently drop the front of the prompt.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import httpx
import ollama
import pydantic
from ollama import ChatResponse, ResponseError

from coheara import model_facts
from coheara.access.egress import public_url
from coheara.backends.base import (
    Backend,
    Capabilities,
    ChatRequest,
    EndpointStatus,
    FinishReason,
    Health,
    StreamEvent,
    refuse_adapter,
)
from coheara.backends.remote_errors import (
    HEALTH_TIMEOUT_S,
    is_context_overflow,
    redact_server_detail,
)
from coheara.errors import (
    BackendError,
    BackendOverloadedError,
    BackendTimeoutError,
    BackendUnavailableError,
    CohearaError,
    ContextOverflowError,
    InvalidRequestError,
    ModelNotFoundError,
)


def _finish_reason(done_reason: str | None) -> FinishReason:
    return "length" if done_reason == "length" else "stop"


class OllamaBackend(Backend):
    """One Ollama server and one model, with one context window for the deployment."""

    name = "ollama"

    def __init__(
        self,
        *,
        url: str,
        model: str,
        num_ctx: int,
        timeout_s: float,
        connect_timeout_s: float,
        keep_alive: str | None,
    ) -> None:
        self.url = url.rstrip("/")
        self.where = public_url(self.url)
        """The URL as messages, health reports and records show it: no credentials."""
        self.model = model
        self.num_ctx = num_ctx
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.keep_alive = keep_alive
        self._client = ollama.AsyncClient(
            host=self.url, timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s)
        )
        self._capabilities: dict[str, Capabilities] = {}
        self._capabilities_lock = asyncio.Lock()

    @property
    def context_window(self) -> int:
        """The one `num_ctx` sent on every call; the engine budgets against it."""
        return self.num_ctx

    # ----- the wire format ------------------------------------------------------------

    def payload(self, request: ChatRequest) -> dict[str, Any]:
        """The `/api/chat` body for `request` (public so that tools can show what is sent)."""
        options = request.options
        wire_options: dict[str, Any] = {
            "num_ctx": self.num_ctx,
            "num_predict": options.max_tokens,
            "temperature": options.temperature,
        }
        if options.top_p is not None:
            wire_options["top_p"] = options.top_p
        if options.top_k is not None:
            wire_options["top_k"] = options.top_k
        if options.seed is not None:
            wire_options["seed"] = options.seed
        if options.stop:
            wire_options["stop"] = list(options.stop)
        messages: list[dict[str, Any]] = []
        for message in request.messages:
            entry: dict[str, Any] = {"role": message.role, "content": message.folded_text}
            if message.images:
                # Ollama wants bare base64, no `data:` prefix.
                entry["images"] = [image.base64_png() for image in message.images]
            messages.append(entry)
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "stream": True,
            "options": wire_options,
            # Newer Ollama refuses an over-long prompt instead of dropping its front;
            # older servers ignore keys they do not know.
            "truncate": False,
            "shift": False,
        }
        if request.json_schema is not None:
            payload["format"] = request.json_schema
        if self.keep_alive is not None:
            payload["keep_alive"] = self.keep_alive
        return payload

    # ----- generation -----------------------------------------------------------------

    async def stream(self, request: ChatRequest) -> AsyncGenerator[StreamEvent, None]:
        """Deltas from `message.content`, then one closing event with Ollama's counts."""
        refuse_adapter(request, self.name)
        # PNG-encoding 896x896 images takes tens of milliseconds each: off the event loop.
        payload = await asyncio.to_thread(self.payload, request)
        parts: AsyncIterator[ChatResponse] | None = None
        received = False
        final: StreamEvent | None = None
        try:
            parts = await self._client._request(
                ChatResponse, "POST", "/api/chat", json=payload, stream=True
            )
            async for part in parts:
                received = True
                if final is not None:
                    continue  # nothing follows the closing chunk
                text = part.message.content or ""
                if part.done:
                    # Held until the body ends, so the connection goes back to the pool.
                    final = StreamEvent(
                        text=text,
                        done=True,
                        finish_reason=_finish_reason(part.done_reason),
                        prompt_tokens=part.prompt_eval_count,
                        output_tokens=part.eval_count,
                    )
                elif text:
                    yield StreamEvent(text=text)
            if final is None:
                raise BackendError(
                    f"Ollama at {self.where} ended the stream without its final chunk",
                    hint="check the Ollama server log",
                )
            yield final
        except CohearaError:
            raise
        except Exception as exc:
            raise self._map_error(exc, request=request, received=received) from None
        finally:
            # Closing the client's generator leaves its `async with` block, which closes
            # the HTTP response: Ollama sees the disconnect and stops generating.
            if parts is not None:
                await parts.aclose()  # type: ignore[attr-defined]

    # ----- model facts and liveness -----------------------------------------------------

    async def capabilities(self) -> Capabilities:
        """`/api/show`, read once per model: vision capability and trained context length."""
        cached = self._capabilities.get(self.model)
        if cached is not None:
            return cached
        async with self._capabilities_lock:
            cached = self._capabilities.get(self.model)
            if cached is not None:
                return cached
            try:
                response = await self._client._request_raw(
                    "POST", "/api/show", json={"model": self.model}
                )
                show = response.json()
            except CohearaError:
                raise
            except Exception as exc:
                raise self._map_error(exc) from None
            capabilities = self._parse_show(show if isinstance(show, dict) else {})
            self._capabilities[self.model] = capabilities
            return capabilities

    def _parse_show(self, show: dict[str, Any]) -> Capabilities:
        listed = show.get("capabilities")
        if isinstance(listed, list):
            vision = "vision" in listed
        else:
            # Servers older than the `capabilities` field name a projector instead.
            vision = bool(show.get("projector_info"))
        model_info = show.get("model_info") or {}
        context_length = model_facts.CONTEXT_LENGTH
        for key, value in model_info.items():
            if key.endswith(".context_length") and isinstance(value, int) and value > 0:
                context_length = value
                break
        details = show.get("details") or {}
        alternative = model_facts.VISION_OLLAMA_ALTERNATIVE
        return Capabilities(
            backend=self.name,
            model=self.model,
            vision=vision,
            context_length=context_length,
            constrained_decoding=True,
            exact_token_count=False,
            details={
                "url": self.where,
                "num_ctx": self.num_ctx,
                "capabilities": listed if isinstance(listed, list) else None,
                "family": details.get("family"),
                "parameter_size": details.get("parameter_size"),
                "quantization_level": details.get("quantization_level"),
                "vision_hint": (
                    f"for images use a vision-capable build: run `ollama pull {alternative}` "
                    f"and set COHEARA_OLLAMA_MODEL={alternative}"
                ),
            },
        )

    async def health(self) -> Health:
        """GET /api/version with a short timeout; never raises."""
        try:
            response = await self._client._request_raw(
                "GET",
                "/api/version",
                timeout=httpx.Timeout(
                    min(self.timeout_s, HEALTH_TIMEOUT_S), connect=self.connect_timeout_s
                ),
            )
            version = response.json().get("version")
        except Exception as exc:
            error = exc if isinstance(exc, CohearaError) else self._map_error(exc)
            return Health(False, self.name, str(error))
        return Health(True, self.name, f"Ollama {version} at {self.where}", version)

    def endpoints(self) -> list[EndpointStatus]:
        return [EndpointStatus(name=self.where, healthy=None)]

    async def aclose(self) -> None:
        await self._client.close()

    # ----- errors -----------------------------------------------------------------------

    def _map_error(
        self, exc: BaseException, *, request: ChatRequest | None = None, received: bool = False
    ) -> CohearaError:
        """The client library's failure as one of ours, stating the fix and no prompt text."""
        if isinstance(exc, ResponseError):
            return self._map_response_error(exc, request)
        if isinstance(exc, httpx.ConnectError | ConnectionError):
            return BackendUnavailableError(
                f"cannot connect to Ollama at {self.where}",
                hint="start Ollama (ollama serve), or point OLLAMA_HOST / COHEARA_OLLAMA_URL "
                "at a running server",
                url=self.where,
            )
        if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
            return BackendTimeoutError(
                f"Ollama at {self.where} did not accept a connection within "
                f"{self.connect_timeout_s:g}s",
                hint="check that Ollama is running and reachable",
                url=self.where,
            )
        if isinstance(exc, httpx.TimeoutException):
            waited = "between two tokens" if received else "for the first token"
            return BackendTimeoutError(
                f"Ollama at {self.where} sent nothing for {self.timeout_s:g}s ({waited})",
                hint="raise COHEARA_TIMEOUT_S, or check whether the model is still loading",
                url=self.where,
            )
        if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError):
            when = "mid-stream" if received else "before it answered"
            return BackendError(
                f"connection lost {when} to Ollama at {self.where}",
                hint="the server closed the connection; check the Ollama log (it may have "
                "crashed or run out of memory)",
                url=self.where,
            )
        if isinstance(exc, json.JSONDecodeError | pydantic.ValidationError):
            return BackendError(
                f"Ollama at {self.where} sent a line that is not a chat chunk",
                hint="check that the URL points at Ollama",
                url=self.where,
            )
        if isinstance(exc, httpx.HTTPError):
            return BackendError(
                f"HTTP failure talking to Ollama at {self.where}: {type(exc).__name__}",
                url=self.where,
            )
        return BackendError(
            f"unexpected failure talking to Ollama at {self.where}: {type(exc).__name__}",
            url=self.where,
        )

    def _map_response_error(self, exc: ResponseError, request: ChatRequest | None) -> CohearaError:
        status = exc.status_code
        raw = str(exc.error)
        detail = redact_server_detail(raw, request)
        if is_context_overflow(raw):
            return ContextOverflowError(
                f"Ollama refused the prompt: it does not fit the context window "
                f"(num_ctx {self.num_ctx}): {detail}",
                hint="shorten the input, lower max_tokens, or raise the window (COHEARA_NUM_CTX, "
                f"up to {model_facts.CONTEXT_LENGTH})",
                window=self.num_ctx,
                status=status,
            )
        names_model = "model" in raw.lower()
        if status == 404 or ("not found" in raw.lower() and names_model):
            hint = f"run `ollama pull {self.model}`"
            if not names_model:
                # A bare 404 ("404 page not found") is more likely a URL that is not Ollama.
                hint += f", and check that {self.where} is an Ollama server"
            return ModelNotFoundError(
                f"model {self.model} not found on Ollama at {self.where}",
                hint=hint,
                model=self.model,
                status=status,
            )
        if status in (429, 503):
            return BackendOverloadedError(
                f"Ollama at {self.where} is busy (HTTP {status}: {detail})",
                hint="retry later, or raise OLLAMA_MAX_QUEUE / OLLAMA_NUM_PARALLEL on the server",
                status=status,
            )
        if status == 400:
            return InvalidRequestError(
                f"Ollama rejected the request (HTTP 400): {detail}", status=status
            )
        if status == -1:
            # The client's marker for an `{"error": ...}` line after streaming began.
            return BackendError(
                f"Ollama failed mid-stream: {detail}",
                hint="check the Ollama server log",
                status=None,
            )
        return BackendError(
            f"Ollama at {self.where} answered HTTP {status}: {detail}",
            hint="check the Ollama server log",
            status=status,
        )
