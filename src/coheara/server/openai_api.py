"""The OpenAI dialect: `POST /v1/chat/completions` and `GET /v1/models`, as vLLM serves them.

- Content is a string or parts: `text`, and `image_url` with a data URI or bare
  base64 (remote URLs are never fetched). System and developer messages are
  folded into the first user turn by the engine.
- `response_format` `json_schema` (or `json_object`, any object) switches to the
  engine's extraction mode: constrained, validated and repaired; a streamed
  structured reply is sent once it has validated, since a wire delta cannot be
  taken back.
- Sampling defaults to greedy (temperature 0), the clinical recommendation,
  where OpenAI's own default is 1.
- Streams are SSE `chat.completion.chunk` events ending `data: [DONE]`; with
  `stream_options.include_usage` a last chunk carries the usage. An error after
  the first event is sent as an `{"error": {...}}` event, which the official
  client raises as `APIError`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from coheara import __version__
from coheara.engine import GenerationResult
from coheara.errors import InvalidRequestError
from coheara.server.common import (
    PERMISSIVE_OBJECT_SCHEMA,
    EngineCall,
    Evidence,
    OpenedStream,
    ServerState,
    Turn,
    build_options,
    decode_turns,
    get_state,
    open_stream,
    run_once,
    sse,
    sse_response,
    structured_content,
    wire_finish_reason,
)
from coheara.server.errors import OPENAI_ERROR_RESPONSES, Dialect, as_coheara_error, openai_body

router = APIRouter(tags=["openai"])

_CREATED = int(time.time())


# ----- requests -----------------------------------------------------------------------


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str = Field(description="A data URI or bare base64; remote URLs are refused.")
    detail: str | None = Field(None, description="Accepted; every image is read at 896x896.")


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormatText(BaseModel):
    type: Literal["text"]


class ResponseFormatJSONObject(BaseModel):
    type: Literal["json_object"]


class ResponseFormatJSONSchema(BaseModel):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema,
    Field(discriminator="type"),
]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's request; unknown fields are ignored, as vLLM does."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1, description="Deprecated spelling; the other wins.")
    temperature: float | None = Field(None, ge=0, le=2, description="Default 0: greedy.")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, description="vLLM extension; -1 or 0: off.")
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1, description="Only 1.")
    logprobs: bool | None = Field(None, description="Not supported.")
    tools: list[dict[str, Any]] | None = Field(None, description="Not supported.")


# ----- responses ----------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str = Field(description="stop or length (a stopped loop reports length).")


class ChatCompletion(BaseModel):
    """OpenAI's `chat.completion`, every key present (nulls included), as strict clients expect."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None
    coheara: Evidence | None = Field(None, description="Coheara's evidence (extension).")


class Delta(BaseModel):
    """Only the keys that are set go on the wire: `role` on the first chunk, then `content`."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    """`logprobs` is always null; `finish_reason` null until the closing chunk."""

    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    """One SSE event's data; the stream ends with `data: [DONE]`.

    `usage` is present (null but on the last chunk) only with
    `stream_options.include_usage`; `coheara` only on the closing chunk.
    """

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChunkChoice]
    usage: Usage | None = None
    coheara: Evidence | None = None

    def wire(self, include_usage: bool) -> dict[str, Any]:
        """OpenAI's shape: every choice key present, the delta only with what it carries."""
        data = self.model_dump(mode="json")
        for choice in data["choices"]:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        if not include_usage:
            del data["usage"]
        if data["coheara"] is None:
            del data["coheara"]
        return data


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "coheara"
    root: str = Field(description="The backend's own id for the one model served.")
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ----- translation --------------------------------------------------------------------


def _refuse(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param)


def _turn(message: ChatMessage, index: int) -> Turn:
    if message.role in ("tool", "function"):
        raise _refuse("tool and function messages are not supported", f"messages[{index}].role")
    role: Literal["system", "user", "assistant"]
    if message.role in ("system", "developer"):
        role = "system"
    elif message.role == "assistant":
        role = "assistant"
    else:
        role = "user"
    content = message.content
    if content is None or isinstance(content, str):
        return Turn(role, content or "")
    texts = [part.text for part in content if isinstance(part, TextPart)]
    urls = [part.image_url.url for part in content if isinstance(part, ImagePart)]
    kinds = ["image" if isinstance(part, ImagePart) else "text" for part in content]
    if "text" not in kinds or "image" not in kinds[kinds.index("text") :]:
        return Turn(role, "\n".join(texts), urls)  # images (if any) then text: the plain form
    # A text before an image: keep the order, as a volume's slices each followed by its label.
    return Turn(
        role,
        parts=[
            ("text", part.text) if isinstance(part, TextPart) else ("image", part.image_url.url)
            for part in content
        ],
    )


def _schema(body: ChatCompletionRequest) -> dict[str, Any] | None:
    fmt = body.response_format
    if isinstance(fmt, ResponseFormatJSONSchema):
        return fmt.json_schema.json_schema or PERMISSIVE_OBJECT_SCHEMA
    if isinstance(fmt, ResponseFormatJSONObject):
        return PERMISSIVE_OBJECT_SCHEMA
    return None


async def _call(body: ChatCompletionRequest, state: ServerState) -> EngineCall:
    if body.n not in (None, 1):
        raise _refuse("only n=1 is supported", "n")
    if body.logprobs:
        raise _refuse("logprobs are not supported", "logprobs")
    if body.tools:
        raise _refuse("tools are not supported", "tools")
    turns = [_turn(message, index) for index, message in enumerate(body.messages)]
    top_k = body.top_k if body.top_k is not None and body.top_k > 0 else None
    return EngineCall(
        messages=await decode_turns(turns, state.settings),
        schema=_schema(body),
        options=build_options(
            state.settings,
            max_tokens=body.max_completion_tokens or body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=top_k,
            seed=body.seed,
            stop=body.stop,
        ),
    )


def _usage(result: GenerationResult) -> Usage:
    return Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.output_tokens,
        total_tokens=result.prompt_tokens + result.output_tokens,
    )


def _fingerprint(backend: str) -> str:
    """Which Coheara and which runtime answered; the same on every chunk of a stream."""
    return f"coheara-{__version__}-{backend}"


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses={
        200: {
            "description": "A chat.completion; with `stream: true`, SSE events whose data are "
            "ChatCompletionChunk objects, then `[DONE]`.",
            "content": {
                "text/event-stream": {
                    "schema": {"$ref": "#/components/schemas/ChatCompletionChunk"}
                }
            },
        },
        **OPENAI_ERROR_RESPONSES,
    },
    summary="Chat completions (OpenAI)",
)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    state: Annotated[ServerState, Depends(get_state)],
) -> Any:
    """OpenAI's chat completions over the engine: images, `response_format`, streaming, usage."""
    await state.check_model(body.model, Dialect.OPENAI)
    call = await _call(body, state)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    fingerprint = _fingerprint((await state.capabilities()).backend)
    structured = call.schema is not None
    if not body.stream:
        result = await run_once(request, state.engine, call)
        content = structured_content(result) if structured else result.text
        return ChatCompletion(
            id=completion_id,
            created=created,
            model=body.model,
            choices=[
                Choice(
                    message=AssistantMessage(content=content),
                    finish_reason=wire_finish_reason(result),
                )
            ],
            usage=_usage(result),
            system_fingerprint=fingerprint,
            coheara=Evidence.of(result),
        )
    opened = await open_stream(request, state.engine, call)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    head = {
        "id": completion_id,
        "created": created,
        "model": body.model,
        "system_fingerprint": fingerprint,
    }
    return sse_response(_events(opened, head, structured, include_usage))


async def _events(
    opened: OpenedStream, head: dict[str, Any], structured: bool, include_usage: bool
) -> AsyncIterator[bytes]:
    def chunk(
        delta: Delta, finish: str | None = None, result: GenerationResult | None = None
    ) -> bytes:
        event = ChatCompletionChunk(
            **head,
            choices=[ChunkChoice(delta=delta, finish_reason=finish)],
            coheara=Evidence.of(result) if result else None,
        )
        return sse(event.wire(include_usage))

    try:
        yield chunk(Delta(role="assistant", content=""))
        async for part in opened:
            if part.result is not None:
                result = part.result
                if structured:
                    yield chunk(Delta(content=structured_content(result)))
                yield chunk(Delta(), wire_finish_reason(result), result)
                if include_usage:
                    usage = ChatCompletionChunk(**head, choices=[], usage=_usage(result))
                    yield sse(usage.wire(include_usage))
            elif part.text and not structured:  # an empty chunk: the backend has answered
                yield chunk(Delta(content=part.text))
    except Exception as exc:
        yield sse(openai_body(as_coheara_error(exc)))
    finally:
        await opened.aclose()
    yield sse("[DONE]")


async def _cards(state: ServerState) -> list[ModelCard]:
    window = await state.engine.context_window()
    names = await state.model_names()
    return [
        ModelCard(id=name, created=_CREATED, root=names[0], max_model_len=window) for name in names
    ]


@router.get("/v1/models", response_model=ModelList, summary="Models served (OpenAI)")
async def list_models(state: Annotated[ServerState, Depends(get_state)]) -> ModelList:
    """Every accepted id; `root` is the same for all of them, since they are one model."""
    return ModelList(data=await _cards(state))


@router.get(
    "/v1/models/{model_id:path}",
    response_model=ModelCard,
    responses=OPENAI_ERROR_RESPONSES,
    summary="One model (OpenAI)",
)
async def retrieve_model(
    model_id: str, state: Annotated[ServerState, Depends(get_state)]
) -> ModelCard:
    await state.check_model(model_id, Dialect.OPENAI)
    cards = await _cards(state)
    return next((c for c in cards if c.id.lower() == model_id.lower()), cards[0])
