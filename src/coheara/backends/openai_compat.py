"""OpenAI-compatible servers (vLLM, llama.cpp server, Ollama's /v1, TGI) via the `openai` client.

Structured output goes only through `response_format` `json_schema`: current
vLLM releases silently ignore the old `guided_*` keys. `max_tokens` is sent
rather than `max_completion_tokens`, which many local servers do not know. The
server owns its context window: a prompt over it is a 400 (vLLM), mapped to
`ContextOverflowError`, never a silent truncation.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator
from typing import Any

import openai

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

_VLLM_OVERFLOW = re.compile(
    r"maximum context length is (\d+) tokens.*?(?:requested|has) (\d+)", re.IGNORECASE | re.DOTALL
)


def _finish_reason(reason: str | None) -> FinishReason:
    return "length" if reason == "length" else "stop"


def _status_detail(exc: openai.APIError) -> str:
    """The server's own message from the error body (never `str(exc)`, which embeds the body)."""
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        if isinstance(error, str):
            return error
        if isinstance(body.get("message"), str):
            return body["message"]
        detail = body.get("detail")
        if isinstance(detail, str):
            return detail
        if isinstance(detail, list):
            # FastAPI validation errors: keep where and what, drop the echoed `input`.
            return "; ".join(
                f"{'.'.join(map(str, item.get('loc', ())))}: {item.get('msg', '')}"
                for item in detail[:5]
                if isinstance(item, dict)
            )
    if isinstance(body, str):
        return body
    return exc.message if isinstance(exc.message, str) else type(exc).__name__


class OpenAIBackend(Backend):
    """One OpenAI-compatible server and one served model."""

    name = "openai"

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str,
        context_length: int,
        timeout_s: float,
        connect_timeout_s: float,
        vision: bool = True,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.where = public_url(self.base_url)
        """The URL as messages, health reports and records show it: no credentials."""
        self.model = model
        self.configured_context_length = context_length
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.vision = vision
        self._client = openai.AsyncOpenAI(
            base_url=self.where,
            api_key=api_key or "not-needed",
            timeout=openai.Timeout(timeout_s, connect=connect_timeout_s),
            # A retried generation doubles the GPU work; the caller decides.
            max_retries=0,
        )
        self._capabilities: dict[str, Capabilities] = {}
        self._capabilities_lock = asyncio.Lock()

    # ----- the wire format ------------------------------------------------------------

    def arguments(self, request: ChatRequest) -> dict[str, Any]:
        """Keyword arguments for `chat.completions.create` (public so tools can show them)."""
        options = request.options
        messages: list[dict[str, Any]] = []
        for message in request.messages:
            if message.system:
                # The server's chat template folds it in front of the turn, images included.
                messages.append({"role": "system", "content": message.system})
            if message.images or message.parts:
                # In the message's own order: images first by default (as Gemma's own
                # examples), a CT volume's slices each followed by its label.
                parts: list[dict[str, Any]] = [
                    {"type": "text", "text": part}
                    if isinstance(part, str)
                    else {"type": "image_url", "image_url": {"url": part.data_uri()}}
                    for part in message.ordered_parts
                    if not isinstance(part, str) or part
                ]
                messages.append({"role": message.role, "content": parts})
            else:
                messages.append({"role": message.role, "content": message.text})
        arguments: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": options.max_tokens,
            "temperature": options.temperature,
        }
        if options.top_p is not None:
            arguments["top_p"] = options.top_p
        if options.seed is not None:
            arguments["seed"] = options.seed
        if options.stop:
            arguments["stop"] = list(options.stop)
        if options.top_k is not None:
            # Not in the OpenAI API; vLLM and llama.cpp read it from the body.
            arguments["extra_body"] = {"top_k": options.top_k}
        if request.json_schema is not None:
            arguments["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": request.json_schema, "strict": True},
            }
        return arguments

    # ----- generation -----------------------------------------------------------------

    async def stream(self, request: ChatRequest) -> AsyncGenerator[StreamEvent, None]:
        """Deltas, then one closing event with the usage the server reports (None if none)."""
        refuse_adapter(request, self.name)
        # PNG-encoding 896x896 images takes tens of milliseconds each: off the event loop.
        arguments = await asyncio.to_thread(self.arguments, request)
        stream: Any = None
        try:
            stream = await self._client.chat.completions.create(**arguments)
            finish: str | None = None
            usage: Any = None
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices[:1]:
                    text = choice.delta.content if choice.delta is not None else None
                    if text:
                        yield StreamEvent(text=text)
                    if choice.finish_reason:
                        finish = choice.finish_reason
            if finish is None:
                raise BackendError(
                    f"the server at {self.where} ended the stream before the model finished",
                    hint="check the server log",
                )
            yield StreamEvent(
                done=True,
                finish_reason=_finish_reason(finish),
                prompt_tokens=getattr(usage, "prompt_tokens", None),
                output_tokens=getattr(usage, "completion_tokens", None),
            )
        except CohearaError:
            raise
        except Exception as exc:
            raise await self._map_error(
                exc, request=request, streaming=stream is not None
            ) from None
        finally:
            if stream is not None:
                await stream.close()

    # ----- model facts and liveness -----------------------------------------------------

    async def capabilities(self) -> Capabilities:
        """GET /models once per model: is it served, with which window (vLLM's max_model_len)."""
        cached = self._capabilities.get(self.model)
        if cached is not None:
            return cached
        async with self._capabilities_lock:
            cached = self._capabilities.get(self.model)
            if cached is not None:
                return cached
            try:
                page = await self._client.models.list()
                entries = list(page.data)
            except Exception as exc:
                raise await self._map_error(exc) from None
            served = [entry.id for entry in entries]
            entry = next((e for e in entries if e.id == self.model), None)
            if entry is None:
                entry = next((e for e in entries if getattr(e, "root", None) == self.model), None)
            if entry is None:
                raise ModelNotFoundError(
                    f"model {self.model} is not served at {self.where}; it serves: "
                    + (", ".join(served) if served else "(nothing)"),
                    hint="set COHEARA_OPENAI_MODEL (or --model) to a served id, or start the "
                    "server with this model",
                    model=self.model,
                    served=served,
                )
            max_model_len = getattr(entry, "max_model_len", None)
            context_length = (
                max_model_len
                if isinstance(max_model_len, int) and max_model_len > 0
                else self.configured_context_length
            )
            capabilities = Capabilities(
                backend=self.name,
                model=self.model,
                vision=self.vision,
                context_length=context_length,
                constrained_decoding=True,
                exact_token_count=False,
                details={
                    "url": self.where,
                    "served_models": served,
                    "context_length_source": (
                        "server max_model_len"
                        if context_length == max_model_len
                        else "configuration"
                    ),
                    "owned_by": getattr(entry, "owned_by", None),
                    "vision_hint": "serve a vision-capable MedGemma build, or leave vision "
                    "enabled in the configuration if the server accepts images",
                },
            )
            self._capabilities[self.model] = capabilities
            return capabilities

    async def health(self) -> Health:
        """vLLM's `/health` (and `/version`) when present, else GET /models; never raises."""
        probe = self._client.with_options(
            timeout=openai.Timeout(
                min(self.timeout_s, HEALTH_TIMEOUT_S), connect=self.connect_timeout_s
            ),
            max_retries=0,
        )
        root = self.base_url.removesuffix("/v1")
        try:
            try:
                await probe.get(f"{root}/health", cast_to=str)
            except openai.NotFoundError:
                models = await probe.models.list()
                count = len(list(models.data))
                return Health(True, self.name, f"{count} model(s) served at {self.where}")
            version: str | None = None
            try:
                body = await probe.get(f"{root}/version", cast_to=object)
                if isinstance(body, dict) and isinstance(body.get("version"), str):
                    version = body["version"]
            except Exception:
                version = None
            return Health(True, self.name, f"healthy at {self.where}", version)
        except Exception as exc:
            error = exc if isinstance(exc, CohearaError) else await self._map_error(exc)
            return Health(False, self.name, str(error))

    def endpoints(self) -> list[EndpointStatus]:
        return [EndpointStatus(name=self.where, healthy=None)]

    async def aclose(self) -> None:
        await self._client.close()

    # ----- errors -----------------------------------------------------------------------

    async def _served_models(self) -> list[str] | None:
        """Best effort, for an error message: what the server does serve."""
        try:
            page = await self._client.with_options(
                max_retries=0, timeout=min(self.timeout_s, HEALTH_TIMEOUT_S)
            ).models.list()
            return [entry.id for entry in page.data]
        except Exception:
            return None

    async def _map_error(
        self, exc: BaseException, *, request: ChatRequest | None = None, streaming: bool = False
    ) -> CohearaError:
        """The client library's failure as one of ours, stating the fix and no prompt text."""
        if isinstance(exc, openai.APITimeoutError):
            waited = "while streaming" if streaming else "before answering"
            return BackendTimeoutError(
                f"the server at {self.where} sent nothing for {self.timeout_s:g}s ({waited})",
                hint="raise COHEARA_TIMEOUT_S, or check the server's load",
                url=self.where,
            )
        if isinstance(exc, openai.APIConnectionError):
            if streaming:
                return BackendError(
                    f"connection lost mid-stream to {self.where}",
                    hint="the server closed the connection; check its log (it may have crashed "
                    "or run out of memory)",
                    url=self.where,
                )
            return BackendUnavailableError(
                f"cannot connect to the OpenAI-compatible server at {self.where}",
                hint="start it (for example `vllm serve google/medgemma-1.5-4b-it`) or set "
                "COHEARA_OPENAI_URL",
                url=self.where,
            )
        if isinstance(exc, openai.APIStatusError):
            return await self._map_status_error(exc, request)
        if isinstance(exc, openai.APIError):
            # An error event inside a 200 stream.
            raw = _status_detail(exc)
            if is_context_overflow(raw):
                return self._overflow(raw, request, status=None)
            return BackendError(
                f"the server at {self.where} failed mid-stream: "
                f"{redact_server_detail(raw, request)}",
                hint="check the server log",
            )
        return BackendError(
            f"unexpected failure talking to {self.where}: {type(exc).__name__}",
            url=self.where,
        )

    def _overflow(
        self, raw: str, request: ChatRequest | None, *, status: int | None
    ) -> ContextOverflowError:
        numbers: dict[str, Any] = {}
        found = _VLLM_OVERFLOW.search(raw)
        if found:
            numbers = {"window": int(found.group(1)), "requested_tokens": int(found.group(2))}
        return ContextOverflowError(
            f"the server at {self.where} refused the prompt: it does not fit the model's "
            f"context window: {redact_server_detail(raw, request)}",
            hint="shorten the input, lower max_tokens, or start the server with a larger "
            "window (vLLM: --max-model-len)",
            status=status,
            **numbers,
        )

    async def _map_status_error(
        self, exc: openai.APIStatusError, request: ChatRequest | None
    ) -> CohearaError:
        status = exc.status_code
        raw = _status_detail(exc)
        detail = redact_server_detail(raw, request)
        if status in (400, 413, 422) and is_context_overflow(raw):
            return self._overflow(raw, request, status=status)
        if isinstance(exc, openai.NotFoundError):
            served = await self._served_models()
            if served is None:
                hint = (
                    "check COHEARA_OPENAI_URL: it usually ends in /v1 "
                    "(for example http://127.0.0.1:8000/v1)"
                )
            else:
                listing = ", ".join(served) or "(nothing)"
                hint = (
                    f"the server serves: {listing}; set COHEARA_OPENAI_MODEL (or --model) "
                    "to one of them"
                )
            return ModelNotFoundError(
                f"model {self.model} not found at {self.where}: {detail}",
                hint=hint,
                model=self.model,
                served=served,
            )
        if status in (400, 422):
            return InvalidRequestError(
                f"the server at {self.where} rejected the request (HTTP {status}): {detail}",
                status=status,
            )
        if status in (429, 503):
            return BackendOverloadedError(
                f"the server at {self.where} is busy (HTTP {status}): {detail}",
                hint="retry later",
                status=status,
            )
        if status in (401, 403):
            return BackendError(
                f"the server at {self.where} refused the credentials (HTTP {status})",
                hint="check COHEARA_OPENAI_API_KEY",
                status=status,
            )
        return BackendError(
            f"the server at {self.where} answered HTTP {status}: {detail}",
            hint="check the server log",
            status=status,
        )
