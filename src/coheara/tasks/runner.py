"""One task request through the engine into a checked, traceable draft.

validate the input -> number its sources -> write the prompt (task instruction,
citation rules, SOURCES; images first for an imaging task) -> structured extraction
(constrained, repaired, or one field at a time: the engine's strategy) -> shared
checks (citations, numbers, gap markers) -> the task's own checks (which may correct
the draft in code) -> a bounded re-ask where the task wants one -> the response.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from coheara.backends.base import GenerationOptions
from coheara.context import call_context, calling
from coheara.engine.chat_format import InputMessage
from coheara.errors import (
    REFUSAL,
    InvalidRequestError,
    OutputValidationError,
    TaskRefusedError,
)
from coheara.tasks.envelope import (
    ArtifactContext,
    TaskMetadata,
    TaskRequest,
    TaskResponse,
    Validation,
)
from coheara.tasks.registry import get_task
from coheara.tasks.sources import Sources
from coheara.tasks.spec import CITATION_RULES, Review, TaskSpec
from coheara.tasks.trace import confidence, run_shared_checks

if TYPE_CHECKING:
    from coheara.engine import Engine, ExtractionResult
    from coheara.imaging.limits import ImageLimits
    from coheara.imaging.prepare import Prepared


def validate_input(spec: TaskSpec, data: dict[str, Any]) -> BaseModel:
    """The input against the task's model; the error names fields and rules, never values."""
    try:
        return spec.input_model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
        problems = [
            f"{'.'.join(str(p) for p in error['loc']) or 'input'}: {error['msg']}"
            for error in errors[:5]
        ]
        refused = all(error["type"] == REFUSAL for error in errors)
        raise (TaskRefusedError if refused else InvalidRequestError)(
            f"input for {spec.id} is invalid: " + "; ".join(problems),
            hint=f"see the input schema: coheara tasks {spec.id}",
        ) from None


def user_text(spec: TaskSpec, data: BaseModel, request: TaskRequest, sources: Sources) -> str:
    parts = [spec.instruction(data, request.context).strip()]
    context = request.context
    if context is not None:
        if context.purpose:
            parts.append(f"Purpose of this draft: {context.purpose}")
        if context.boundaries:
            parts.append(f"Boundaries: {context.boundaries}")
        if isinstance(context.template, str):
            parts.append(f"Template guidance: {context.template}")
    parts.append(CITATION_RULES)
    parts.append("SOURCES:\n" + (sources.render() or "(none)"))
    return "\n\n".join(parts)


async def run_task(
    engine: Engine,
    request: TaskRequest | dict[str, Any],
    *,
    task: str | TaskSpec | None = None,
    images: Sequence[Any] | Prepared = (),
) -> TaskResponse:
    """Run one task (an id, or a spec of the caller's own). `images`: paths, bytes or
    arrays (or an already prepared set) for an imaging task, besides any base64 `images`
    in the request."""
    started = time.perf_counter()
    if not isinstance(request, TaskRequest):
        try:
            request = TaskRequest.model_validate(request)
        except ValidationError as exc:
            first = exc.errors(include_input=False, include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"])
            raise InvalidRequestError(f"task request invalid: {where}: {first['msg']}") from None
    spec = task if isinstance(task, TaskSpec) else get_task(task or request.task or "")
    if request.fhir and spec.to_fhir is None:
        raise InvalidRequestError(f"{spec.id} has no FHIR form", hint="leave out fhir")
    data = validate_input(spec, request.input)
    sources = Sources.from_input(data, skip=spec.sources_skip)
    text = user_text(spec, data, request, sources)
    prepared = await asyncio.to_thread(_images, spec, request, images, engine)
    messages = _messages(prepared, text)
    if request.adapter is not None:
        _check_adapter_task(engine, spec, request.adapter)
    options = GenerationOptions(
        max_tokens=request.max_tokens or spec.max_tokens,
        temperature=spec.temperature,
        adapter=request.adapter,
    )

    # Over HTTP the call already carries the X-Request-ID (logs and audit join on it); the
    # body's own request_id names the call only where there is none (CLI, Python).
    with calling(
        request_id=None if call_context().request_id else request.request_id,
        task_id=spec.id,
        task_version=spec.version,
        prompt_hash=spec.prompt_hash,
    ):
        result, review, revisions = await _generate(
            engine, spec, data, sources, request, messages, options
        )
    try:  # the checks may have corrected the draft: it must still fit the output model
        final = spec.output_model.model_validate(review.draft)
    except ValidationError as exc:
        raise OutputValidationError(
            f"{spec.id}: the corrected draft no longer fits its schema",
            problems=[str(e["loc"]) for e in exc.errors(include_input=False)],
        ) from None
    elapsed_ms = (time.perf_counter() - started) * 1000.0
    target = spec.latency_target_ms
    response = TaskResponse(
        task_id=spec.id,
        request_id=request.request_id,
        clinical_event_id=request.clinical_event_id,
        patient_scope_id=request.patient_scope_id,
        draft=final.model_dump(mode="json"),
        confidence=confidence(review),
        gaps=review.gaps,
        trace=review.links,
        validation=Validation(
            passed=not any(f.severity == "error" for f in review.findings),
            findings=review.findings,
        ),
        metadata=TaskMetadata(
            task_version=spec.version,
            prompt_hash=spec.prompt_hash,
            model=result.model,
            backend=result.backend,
            adapter=request.adapter,
            strategy=result.strategy,
            revisions=revisions,
            processing_ms=round(elapsed_ms, 1),
            time_to_first_token_ms=(
                round(result.time_to_first_token_s * 1000.0, 1)
                if result.time_to_first_token_s is not None
                else None
            ),
            latency_target_ms=target,
            within_target=None if target is None else elapsed_ms <= target,
            prompt_tokens=result.prompt_tokens,
            output_tokens=result.output_tokens,
            attempts=result.attempts,
            warnings=result.warnings,
            images=result.images,
        ),
    )
    if request.fhir:
        assert spec.to_fhir is not None  # checked before the model was called
        response.fhir = spec.to_fhir(final, request)
    return response


async def _generate(
    engine: Engine,
    spec: TaskSpec,
    data: BaseModel,
    sources: Sources,
    request: TaskRequest,
    messages: list[InputMessage],
    options: GenerationOptions,
) -> tuple[ExtractionResult, Review, int]:
    """The extraction, its review, and the bounded re-asks the task wants."""
    result = await engine.extract(
        system=spec.system_prompt, messages=messages, schema=spec.output_model, options=options
    )
    review, revisions = _review(spec, data, sources, request, result), 0
    while spec.revise is not None and revisions < spec.max_revisions:
        follow_up = spec.revise(review)
        if follow_up is None:
            break
        revisions += 1
        messages = [
            *messages,
            InputMessage("assistant", result.text),
            InputMessage("user", follow_up),
        ]
        result = _add_usage(
            result,
            await engine.extract(
                system=spec.system_prompt,
                messages=messages,
                schema=spec.output_model,
                options=options,
            ),
        )
        review = _review(spec, data, sources, request, result)
    return result, review, revisions


def _review(
    spec: TaskSpec,
    data: BaseModel,
    sources: Sources,
    request: TaskRequest,
    result: ExtractionResult,
) -> Review:
    value = result.value
    draft = value.model_dump(mode="json") if isinstance(value, BaseModel) else dict(value)
    return review_draft(spec, data, draft, sources=sources, context=request.context)


def review_draft(
    spec: TaskSpec,
    data: BaseModel | dict[str, Any],
    draft: dict[str, Any],
    *,
    sources: Sources | None = None,
    context: ArtifactContext | None = None,
) -> Review:
    """Every check of `spec` on a draft, without a model call: what the runner does after
    generation, and what a test or an auditor runs on a stored or crafted draft."""
    if not isinstance(data, BaseModel):
        data = validate_input(spec, data)
    if sources is None:
        sources = Sources.from_input(data, skip=spec.sources_skip)
    review = Review(spec, data, sources, draft, context=context)
    run_shared_checks(review)
    for check in spec.checks:
        check(review)
    return review


def _add_usage(before: ExtractionResult, after: ExtractionResult) -> ExtractionResult:
    """The revised result, with the tokens and attempts of every call that led to it."""
    return after.model_copy(
        update={
            "prompt_tokens": before.prompt_tokens + after.prompt_tokens,
            "output_tokens": before.output_tokens + after.output_tokens,
            "attempts": before.attempts + after.attempts,
            "warnings": [*before.warnings, *after.warnings],
            "time_to_first_token_s": before.time_to_first_token_s,
        }
    )


def _check_adapter_task(engine: Engine, spec: TaskSpec, name: str) -> None:
    """An adapter learned one task's prompt and schema: refuse it for another task. A name
    the registry lacks is left to the backend (unknown there, or refused by a remote one).
    A damaged registry is a ConfigurationError naming its file."""
    from coheara.adapters import AdapterRegistry

    record = AdapterRegistry(engine.settings.adapters_dir).find(name)
    if record is not None and record.task != spec.id:
        raise InvalidRequestError(
            f"adapter {name!r} was trained for {record.task}, not {spec.id}",
            hint=f"use an adapter trained for {spec.id} (coheara adapters list), or none",
        )


def _images(
    spec: TaskSpec, request: TaskRequest, images: Sequence[Any] | Prepared, engine: Engine
) -> Prepared | None:
    from coheara.imaging import limits
    from coheara.imaging.image import base64_bytes
    from coheara.imaging.prepare import Prepared

    given = bool(request.images) or (
        len(images.images) > 0 if isinstance(images, Prepared) else len(images) > 0
    )
    if spec.mode == "image" and not given:
        raise InvalidRequestError(f"{spec.id} reads images: give at least one")
    if spec.mode != "image":
        if given:
            raise InvalidRequestError(f"{spec.id} takes no images")
        return None
    if isinstance(images, Prepared):
        if request.images:
            raise InvalidRequestError("give prepared images or base64 images, not both")
        return images
    items: list[Any] = list(images)
    with limits.applied(engine.settings.image_limits()):
        limits.check_image_count(len(items) + len(request.images))
    items += [base64_bytes(data, f"image {i + 1}") for i, data in enumerate(request.images)]
    prepare_images = spec.prepare_images or _prepare_default
    return prepare_images(items, engine.settings.image_limits())


def _prepare_default(items: list[Any], image_limits: ImageLimits) -> Prepared:
    from coheara.imaging.prepare import prepare

    return prepare(items if len(items) > 1 else items[0], image_limits=image_limits)


def _messages(prepared: Prepared | None, text: str) -> list[InputMessage]:
    if prepared is None:
        return [InputMessage("user", text)]
    return list(prepared.messages(text))
