"""Coheara's own API: the three modes with all their evidence.

`POST /v1/generate` covers text and image + text; `POST /v1/extract` adds a JSON
Schema and returns the validated `value`. With `"stream": true` both answer
NDJSON: `delta` lines (with the attempt number, since a structured reply
restarts on a repair retry or is rebuilt one field at a time), then one
`result` line, or an `error` line last.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from coheara import model_facts
from coheara.engine import ExtractionResult, GenerationResult, InputMessage
from coheara.errors import ImageError, InvalidRequestError
from coheara.imaging import limits
from coheara.imaging.image import base64_bytes
from coheara.imaging.prepare import prepare, prepare_pair
from coheara.server.common import (
    NDJSON,
    EngineCall,
    ServerState,
    Turn,
    build_options,
    decode_turns,
    get_state,
    ndjson,
    ndjson_response,
    open_stream,
    run_once,
)
from coheara.server.errors import (
    NATIVE_ERROR_RESPONSES,
    Dialect,
    NativeErrorDetail,
    as_coheara_error,
)

router = APIRouter(tags=["native"])


class NativeMessage(BaseModel):
    """One turn; system text is folded into the first user turn (Gemma has no system role)."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = ""
    images: list[str] = Field(
        default_factory=list, description="Base64 images or data URIs (user turns only)."
    )


class Study(BaseModel):
    """Images prepared together: a CT or MR series (one volume, slices ordered and labelled),
    a current and a prior radiograph (a labelled pair), or one DICOM with a chosen recipe."""

    model_config = ConfigDict(extra="forbid")

    files: list[str] = Field(
        min_length=1,
        description="Base64 files (DICOM or pictures): one image, or every file of one CT "
        "or MR series, in any order.",
    )
    prior: str | None = Field(
        None, description="Base64 prior study: `files` then holds the one current image."
    )
    modality: Literal["CT", "MR"] | None = Field(None, description="Force that DICOM recipe.")
    preset: str | None = Field(
        None, description="CT window preset: lung, mediastinum, bone, brain, liver."
    )
    window: tuple[float, float] | None = Field(None, description="Custom window (center, width).")
    max_slices: int = Field(85, ge=1, le=85, description="A series is sampled evenly to this.")
    instruction: str | None = Field(
        None, description="Replaces the default instruction that precedes the images."
    )
    header_fields: list[Literal["modality", "body_part", "view_position"]] = Field(
        default_factory=list,
        max_length=3,
        description="DICOM codes to show the model beside the pixels (none by default: "
        "no metadata reaches the prompt unless named here).",
    )


class GenerateRequest(BaseModel):
    """Modes 1 and 2. Give `prompt`, `messages`, or both (the prompt becomes the last turn)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"system": "You are a radiologist.", "prompt": "Describe the film.", "images": []}
            ]
        },
    )

    model: str | None = Field(None, description="Optional; when given it must be a served id.")
    prompt: str | None = None
    system: str | None = None
    messages: list[NativeMessage] | None = None
    images: list[str] = Field(
        default_factory=list, description="Base64 images or data URIs, attached to `prompt`."
    )
    study: Study | None = Field(
        None,
        description="Instead of `images`: a series, a pair or one DICOM with a recipe, sent "
        "with `prompt` as the question after the images and their labels.",
    )
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="Default COHEARA_MAX_OUTPUT_TOKENS; the engine caps it at the model "
        f"card's {model_facts.MAX_OUTPUT_TOKENS}.",
    )
    temperature: float | None = Field(None, ge=0, le=2, description="Default 0: greedy.")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: list[str] | None = None
    stream: bool = Field(False, description="NDJSON: delta lines, then a result or error line.")


class ExtractRequest(GenerateRequest):
    """Mode 3: the reply is constrained to, and validated against, `schema`."""

    json_schema: dict[str, Any] = Field(
        alias="schema", description="A JSON Schema for an object or array."
    )


class StreamDelta(BaseModel):
    type: Literal["delta"] = "delta"
    text: str
    attempt: int = Field(
        description="1 for the first try; a higher number is a repair retry or a one-field "
        "call, so only the `result` line's text and value are authoritative."
    )


class StreamResult(BaseModel):
    type: Literal["result"] = "result"
    result: ExtractionResult | GenerationResult


class StreamError(BaseModel):
    type: Literal["error"] = "error"
    error: NativeErrorDetail


NativeStreamLine = Annotated[StreamDelta | StreamResult | StreamError, Field(discriminator="type")]
"""One NDJSON line of a native stream (documented in the OpenAPI components)."""


STREAM_RESPONSES: dict[int | str, Any] = {
    200: {
        "description": "The result; with `stream: true`, NDJSON lines (see NativeStreamLine).",
        "content": {NDJSON: {"schema": {"$ref": "#/components/schemas/NativeStreamLine"}}},
    },
    **NATIVE_ERROR_RESPONSES,
}


async def _call(
    body: GenerateRequest, state: ServerState, schema: dict[str, Any] | None
) -> EngineCall:
    await state.check_model(body.model, Dialect.NATIVE)
    # The engine's own order: the system text, the messages, then the prompt and its images.
    turns = [Turn("system", body.system)] if body.system else []
    turns += [Turn(m.role, m.content, m.images) for m in body.messages or ()]
    if body.study is not None:
        if body.images or not body.prompt:
            raise InvalidRequestError(
                "a study goes with a prompt (the question) and without `images`"
            )
    elif body.prompt is not None or body.images:
        turns.append(Turn("user", body.prompt or "", body.images))
    messages = await decode_turns(turns, state.settings)
    if body.study is not None:
        assert body.prompt is not None
        messages += await asyncio.to_thread(_study_messages, body.study, body.prompt, state)
    return EngineCall(
        messages=messages,
        schema=schema,
        options=build_options(
            state.settings,
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop=body.stop,
        ),
    )


def _study_messages(study: Study, question: str, state: ServerState) -> list[InputMessage]:
    """Decode and prepare a study under the deployment's limits (in a worker thread)."""
    image_limits = state.settings.image_limits()
    with limits.applied(image_limits):
        limits.check_image_count(len(study.files) if study.prior is None else 2)
        files = [base64_bytes(data, f"study file {i + 1}") for i, data in enumerate(study.files)]
        options: dict[str, Any] = {"preset": study.preset, "window": study.window}
        if study.prior is not None:
            if len(files) != 1 or study.modality is not None:
                raise ImageError("a pair takes one current file and one prior, without modality")
            prepared = prepare_pair(files[0], base64_bytes(study.prior, "prior"), **options)
        else:
            source = files if len(files) > 1 else files[0]
            prepared = prepare(
                source, modality=study.modality, max_slices=study.max_slices, **options
            )
    return prepared.messages(
        question, instruction=study.instruction, header_fields=study.header_fields
    )


async def _answer(request: Request, state: ServerState, call: EngineCall, stream: bool) -> Any:
    if not stream:
        return await run_once(request, state.engine, call)
    opened = await open_stream(request, state.engine, call)

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in opened:
                if chunk.result is not None:
                    yield ndjson({"type": "result", "result": chunk.result.model_dump(mode="json")})
                elif chunk.text:  # an empty chunk only says the backend has answered
                    yield ndjson({"type": "delta", "text": chunk.text, "attempt": chunk.attempt})
        except Exception as exc:
            yield ndjson({"type": "error", "error": as_coheara_error(exc).to_dict()})
        finally:
            await opened.aclose()

    return ndjson_response(body())


@router.post(
    "/v1/generate",
    response_model=GenerationResult,
    responses=STREAM_RESPONSES,
    summary="Text, or images + text, to text",
)
async def generate(
    body: GenerateRequest, request: Request, state: Annotated[ServerState, Depends(get_state)]
) -> Any:
    """Modes 1 and 2, with the evidence: finish reason, token counts, timings, backend, warnings."""
    return await _answer(request, state, await _call(body, state, None), body.stream)


@router.post(
    "/v1/extract",
    response_model=ExtractionResult,
    responses=STREAM_RESPONSES,
    summary="Structured extraction: a schema-valid value",
)
async def extract(
    body: ExtractRequest, request: Request, state: Annotated[ServerState, Depends(get_state)]
) -> Any:
    """Mode 3: constrained where the backend can, validated always, repaired within bounds."""
    call = await _call(body, state, body.json_schema)
    return await _answer(request, state, call, body.stream)
