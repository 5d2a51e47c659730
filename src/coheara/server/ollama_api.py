"""The Ollama dialect: what an application written for Ollama sends, answered the way Ollama does.

- `/api/chat` and `/api/generate` stream NDJSON unless `"stream": false`; the last
  line has `done: true`, `done_reason` and integer-nanosecond timings. An error
  after the first line is sent as a last line `{"error": "..."}`, as Ollama does.
- `format` ("json" or a JSON Schema) switches to the engine's extraction mode:
  constrained, validated and repaired. Since an invalid attempt cannot be taken
  back on this wire, a structured reply is sent once it has validated.
- `options`: num_predict, temperature, top_p, top_k, seed, stop. `num_ctx` is
  accepted and ignored: one window per deployment, and the engine's budget
  refuses what does not fit instead of truncating it.
- An empty prompt (or no messages) is Ollama's "load the model" call.
- Errors are `{"error": "..."}` with the error's own status (404 unknown model).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from coheara import model_facts
from coheara.backends.base import Capabilities, GenerationOptions
from coheara.engine import GenerationResult
from coheara.errors import InvalidRequestError
from coheara.server.common import (
    NDJSON,
    PERMISSIVE_OBJECT_SCHEMA,
    EngineCall,
    Evidence,
    OpenedStream,
    ServerState,
    Turn,
    build_options,
    decode_turns,
    get_state,
    ndjson,
    ndjson_response,
    open_stream,
    run_once,
    structured_content,
    wire_finish_reason,
)
from coheara.server.errors import OLLAMA_ERROR_RESPONSES, Dialect, as_coheara_error

router = APIRouter(tags=["ollama"])

OLLAMA_API_VERSION = "0.6.8"
"""The Ollama release whose API this server matches: vision, `format` schemas, `capabilities`."""

_STARTED = datetime.now(UTC)


def _timestamp(moment: datetime | None = None) -> str:
    return (moment or datetime.now(UTC)).isoformat().replace("+00:00", "Z")


# ----- requests -----------------------------------------------------------------------


class OllamaOptions(BaseModel):
    """The runner options that mean something here; any other option is ignored, as Ollama does."""

    model_config = ConfigDict(extra="allow")

    num_predict: int | None = Field(None, description="Output tokens; -1 or -2: the default.")
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = None
    stop: list[str] | str | None = None
    num_ctx: int | None = Field(None, description="Accepted; the deployment's window applies.")


Format = Literal["", "json"] | dict[str, Any] | None


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    images: list[str] | None = Field(None, description="Plain base64, no data: prefix.")


class _OllamaBase(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    format: Format = Field(None, description='"json" or a JSON Schema: structured extraction.')
    options: OllamaOptions | None = None
    stream: bool = Field(True, description="NDJSON by default, as in Ollama.")
    keep_alive: float | str | None = Field(None, description="Accepted; the model stays loaded.")
    think: bool | str | None = Field(None, description="Accepted; reasoning is always hidden.")


class OllamaChatRequest(_OllamaBase):
    messages: list[OllamaMessage] | None = None
    tools: list[dict[str, Any]] | None = None


class OllamaGenerateRequest(_OllamaBase):
    prompt: str | None = None
    system: str | None = None
    images: list[str] | None = None
    suffix: str | None = None
    raw: bool | None = Field(None, description="Accepted; the Gemma template always applies.")
    template: str | None = Field(None, description="Accepted; the Gemma template always applies.")
    context: list[int] | None = Field(None, description="Accepted and ignored.")


class OllamaShowRequest(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    model: str | None = None
    name: str | None = Field(None, description="Older clients' spelling of `model`.")
    verbose: bool | None = None


# ----- responses ----------------------------------------------------------------------


class OllamaChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class _OllamaFinal(BaseModel):
    model: str
    created_at: str
    done: bool
    done_reason: str | None = None
    total_duration: int | None = Field(None, description="Nanoseconds.")
    load_duration: int | None = Field(None, description="Nanoseconds; 0: the model is loaded.")
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = Field(None, description="Nanoseconds to the first token.")
    eval_count: int | None = None
    eval_duration: int | None = Field(None, description="Nanoseconds after the first token.")
    coheara: Evidence | None = None


class OllamaChatResponse(_OllamaFinal):
    """One object (`stream: false`) or one NDJSON line; the last line has `done: true`."""

    message: OllamaChatMessage


class OllamaGenerateResponse(_OllamaFinal):
    response: str


class ModelDetails(BaseModel):
    parent_model: str = ""
    format: str
    family: str = "gemma3"
    families: list[str] = ["gemma3"]
    parameter_size: str
    quantization_level: str


class ModelEntry(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails


class TagsResponse(BaseModel):
    models: list[ModelEntry]


class RunningModel(ModelEntry):
    expires_at: str
    size_vram: int
    context_length: int


class PsResponse(BaseModel):
    models: list[RunningModel]


class ShowResponse(BaseModel):
    license: str = ""
    modelfile: str
    parameters: str
    template: str
    details: ModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class VersionResponse(BaseModel):
    version: str


# ----- model description --------------------------------------------------------------


def _tagged(name: str) -> str:
    """Ollama lists every name with a tag; an untagged name means ":latest".

    Advertised names are never paths (`ServerState.model_names`), so each takes a tag.
    """
    if ":" in name.rsplit("/", 1)[-1]:
        return name
    return f"{name}:latest"


def _is_test_model(capabilities: Capabilities) -> bool:
    """The tiny random-weight model must never pass for MedGemma in a model listing."""
    return bool(capabilities.details.get("tiny_test_model"))


def _details(capabilities: Capabilities) -> ModelDetails:
    info = capabilities.details
    count = info.get("parameter_count")
    size = info.get("parameter_size") or (_human_count(count) if isinstance(count, int) else "4.3B")
    if _is_test_model(capabilities):
        size = "tiny (random weights, for tests)"
    return ModelDetails(
        format=str(
            info.get("format") or ("gguf" if capabilities.backend == "ollama" else "safetensors")
        ),
        parameter_size=str(size),
        quantization_level=str(
            info.get("quantization_level") or info.get("dtype") or "BF16"
        ).upper(),
    )


def _human_count(count: int) -> str:
    if count >= 1_000_000_000:
        return f"{count / 1e9:.1f}B"
    if count >= 1_000_000:
        return f"{count / 1e6:.1f}M"
    return f"{count / 1e3:.1f}K"


def _size(capabilities: Capabilities) -> int:
    size = capabilities.details.get("size_bytes") or capabilities.details.get("size")
    return int(size) if isinstance(size, int | float) else 0


async def _entries(state: ServerState) -> list[ModelEntry]:
    capabilities = await state.capabilities()
    digest = hashlib.sha256(capabilities.model.encode()).hexdigest()
    details = _details(capabilities)
    return [
        ModelEntry(
            name=_tagged(name),
            model=_tagged(name),
            modified_at=_timestamp(_STARTED),
            size=_size(capabilities),
            digest=digest,
            details=details,
        )
        for name in await state.model_names()
    ]


# Config keys a backend may report in `Capabilities.details`, as Ollama names them.
_MODEL_INFO_KEYS = {
    "num_hidden_layers": "gemma3.block_count",
    "hidden_size": "gemma3.embedding_length",
    "intermediate_size": "gemma3.feed_forward_length",
    "num_attention_heads": "gemma3.attention.head_count",
    "num_key_value_heads": "gemma3.attention.head_count_kv",
    "head_dim": "gemma3.attention.key_length",
    "sliding_window": "gemma3.attention.sliding_window",
    "vocab_size": "gemma3.vocab_size",
}


def _model_info(capabilities: Capabilities) -> dict[str, Any]:
    info: dict[str, Any] = {
        "general.architecture": "gemma3",
        "general.basename": "coheara-tiny-test" if _is_test_model(capabilities) else "medgemma",
        "general.size_label": "tiny" if _is_test_model(capabilities) else "4B",
        "gemma3.context_length": capabilities.context_length,
    }
    count = capabilities.details.get("parameter_count")
    if isinstance(count, int):
        info["general.parameter_count"] = count
    config = capabilities.details.get("config")
    source = config if isinstance(config, dict) else capabilities.details
    for key, name in _MODEL_INFO_KEYS.items():
        value = source.get(key, capabilities.details.get(key))
        if isinstance(value, int):
            info[name] = value
    if capabilities.vision:
        info["gemma3.vision.image_size"] = model_facts.IMAGE_SIZE
        info["gemma3.mm.tokens_per_image"] = model_facts.IMAGE_SOFT_TOKENS
    return info


# ----- the calls ----------------------------------------------------------------------


def _schema(fmt: Format) -> dict[str, Any] | None:
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return PERMISSIVE_OBJECT_SCHEMA
    assert isinstance(fmt, dict)
    return fmt


def _options(state: ServerState, options: OllamaOptions | None) -> GenerationOptions:
    options = options or OllamaOptions.model_validate({})
    predict = options.num_predict
    return build_options(
        state.settings,
        max_tokens=None if predict is None or predict < 0 else predict,
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k or None,
        seed=options.seed,
        stop=options.stop,
    )


def _durations(result: GenerationResult) -> dict[str, int]:
    total = int(result.total_s * 1e9)
    first = min(total, int((result.time_to_first_token_s or 0.0) * 1e9))
    return {
        "total_duration": total,
        "load_duration": 0,
        "prompt_eval_count": result.prompt_tokens,
        "prompt_eval_duration": first,
        "eval_count": result.output_tokens,
        "eval_duration": total - first,
    }


def _final(model: str, result: GenerationResult) -> dict[str, Any]:
    return {
        "model": model,
        "created_at": _timestamp(),
        "done": True,
        "done_reason": wire_finish_reason(result),
        **_durations(result),
        "coheara": Evidence.of(result).model_dump(mode="json"),
    }


def _load_reply(model: str, keep_alive: float | str | None, key: str, empty: Any) -> JSONResponse:
    """Ollama's answer to a call with nothing to generate: load (or unload) the model."""
    unload = keep_alive in (0, "0", "0s", "0m")
    return JSONResponse(
        {
            "model": model,
            "created_at": _timestamp(),
            key: empty,
            "done": True,
            "done_reason": "unload" if unload else "load",
        }
    )


async def _answer(
    request: Request,
    state: ServerState,
    call: EngineCall,
    stream: bool,
    model: str,
    wrap: Any,
) -> Any:
    """Run the call; `wrap(text)` puts text in the endpoint's own field (message or response)."""
    structured = call.schema is not None
    if not stream:
        result = await run_once(request, state.engine, call)
        text = structured_content(result) if structured else result.text
        return JSONResponse({**_final(model, result), **wrap(text)})
    opened = await open_stream(request, state.engine, call)
    return ndjson_response(_lines(opened, model, structured, wrap))


async def _lines(
    opened: OpenedStream, model: str, structured: bool, wrap: Any
) -> AsyncIterator[bytes]:
    try:
        async for chunk in opened:
            if chunk.result is not None:
                if structured:
                    text = structured_content(chunk.result)
                    yield ndjson(
                        {"model": model, "created_at": _timestamp(), **wrap(text), "done": False}
                    )
                yield ndjson({**_final(model, chunk.result), **wrap("")})
            elif chunk.text and not structured:  # an empty chunk: the backend has answered
                yield ndjson(
                    {"model": model, "created_at": _timestamp(), **wrap(chunk.text), "done": False}
                )
    except Exception as exc:
        yield ndjson({"error": str(as_coheara_error(exc))})
    finally:
        await opened.aclose()


def _stream_doc(model: type[BaseModel]) -> dict[int | str, Any]:
    return {
        200: {
            "description": f"NDJSON lines of {model.__name__} by default; one object with "
            "`stream: false`. An error after the first line arrives as a last line "
            '`{"error": "..."}`.',
            "content": {NDJSON: {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        },
        **OLLAMA_ERROR_RESPONSES,
    }


@router.post(
    "/api/chat",
    response_model=OllamaChatResponse,
    responses=_stream_doc(OllamaChatResponse),
    summary="Chat (Ollama)",
)
async def chat(
    body: OllamaChatRequest, request: Request, state: Annotated[ServerState, Depends(get_state)]
) -> Any:
    """Ollama's chat: messages with plain-base64 `images`, `format`, `options`."""
    await state.check_model(body.model, Dialect.OLLAMA)
    if body.tools:
        raise InvalidRequestError(f'"{body.model}" does not support tools')
    if not body.messages:
        return _load_reply(
            body.model, body.keep_alive, "message", {"role": "assistant", "content": ""}
        )
    turns: list[Turn] = []
    for message in body.messages:
        if message.role == "tool":
            raise InvalidRequestError(f'"{body.model}" does not support tools')
        turns.append(Turn(message.role, message.content or "", message.images or ()))
    call = EngineCall(
        messages=await decode_turns(turns, state.settings),
        schema=_schema(body.format),
        options=_options(state, body.options),
    )
    return await _answer(
        request,
        state,
        call,
        body.stream,
        body.model,
        lambda text: {"message": {"role": "assistant", "content": text}},
    )


@router.post(
    "/api/generate",
    response_model=OllamaGenerateResponse,
    responses=_stream_doc(OllamaGenerateResponse),
    summary="Generate (Ollama)",
)
async def generate(
    body: OllamaGenerateRequest,
    request: Request,
    state: Annotated[ServerState, Depends(get_state)],
) -> Any:
    """Ollama's completion: `prompt`, `system`, plain-base64 `images`, `format`, `options`."""
    await state.check_model(body.model, Dialect.OLLAMA)
    if body.suffix:
        raise InvalidRequestError(f'"{body.model}" does not support insert')
    if not body.prompt and not body.images:
        return _load_reply(body.model, body.keep_alive, "response", "")
    turns = [Turn("system", body.system)] if body.system else []
    turns.append(Turn("user", body.prompt or "", body.images or ()))
    call = EngineCall(
        messages=await decode_turns(turns, state.settings),
        schema=_schema(body.format),
        options=_options(state, body.options),
    )
    return await _answer(
        request, state, call, body.stream, body.model, lambda text: {"response": text}
    )


@router.get("/api/tags", response_model=TagsResponse, summary="Models served (Ollama)")
async def tags(state: Annotated[ServerState, Depends(get_state)]) -> TagsResponse:
    """Every accepted name, tagged; one digest for all of them, since they are one model."""
    return TagsResponse(models=await _entries(state))


@router.get("/api/ps", response_model=PsResponse, summary="Loaded models (Ollama)")
async def ps(state: Annotated[ServerState, Depends(get_state)]) -> PsResponse:
    """The one model, loaded for as long as the server runs."""
    capabilities = await state.capabilities()
    entry = (await _entries(state))[0]
    window = await state.engine.context_window()
    on_gpu = str(capabilities.details.get("device", "")).startswith("cuda")
    return PsResponse(
        models=[
            RunningModel(
                **entry.model_dump(),
                expires_at=_timestamp(datetime.now(UTC) + timedelta(days=365 * 100)),
                size_vram=entry.size if on_gpu else 0,
                context_length=window,
            )
        ]
    )


@router.post(
    "/api/show",
    response_model=ShowResponse,
    responses=OLLAMA_ERROR_RESPONSES,
    summary="Model details and capabilities (Ollama)",
)
async def show(
    body: OllamaShowRequest, state: Annotated[ServerState, Depends(get_state)]
) -> ShowResponse:
    """`capabilities` ("completion", and "vision" when images work) and `model_info`."""
    name = body.model or body.name
    if not name:
        raise InvalidRequestError("model is required")
    names = await state.model_names()
    await state.check_model(name, Dialect.OLLAMA)
    capabilities = await state.capabilities()
    window = await state.engine.context_window()
    return ShowResponse(
        modelfile=f"# Served by Coheara from {capabilities.backend}\nFROM {names[0]}\n",
        parameters=f"num_ctx {window}\ntemperature 0\nstop {model_facts.END_OF_TURN}",
        template="{{ .Prompt }}",
        details=_details(capabilities),
        model_info=_model_info(capabilities),
        capabilities=["completion", "vision"] if capabilities.vision else ["completion"],
        modified_at=_timestamp(_STARTED),
    )


@router.get("/api/version", response_model=VersionResponse, summary="API version (Ollama)")
async def version() -> VersionResponse:
    """The Ollama API version this server is compatible with (for clients that gate on it)."""
    return VersionResponse(version=OLLAMA_API_VERSION)
