"""The engine: three inference modes over any backend, with the budget and the guards.

Every surface (Python API, CLI, each HTTP dialect) calls `Engine.stream`, so
the Gemma rules, the context budget, the degeneration guard and structured
output validation apply to all of them alike.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from pydantic import BaseModel

from coheara import model_facts
from coheara.backends.base import (
    Backend,
    Capabilities,
    ChatRequest,
    GenerationOptions,
    Message,
    StreamEvent,
)
from coheara.backends.pool import PooledBackend
from coheara.backends.selection import AutoBackend
from coheara.context import CallContext, call_context
from coheara.engine.budget import TokenEstimator, check_fits, check_not_truncated
from coheara.engine.chat_format import InputMessage, ReasoningFilter, to_gemma_turns
from coheara.engine.guard import RepetitionGuard
from coheara.engine.result import ExtractionResult, GenerationResult, StreamChunk
from coheara.engine.schema import OutputSchema, Problem
from coheara.errors import (
    BackendError,
    BackendTimeoutError,
    CohearaError,
    InvalidRequestError,
    OutputValidationError,
    UnsupportedCapabilityError,
)
from coheara.imaging import PreparedImage, limits, load_image
from coheara.settings import Settings, load_settings

if TYPE_CHECKING:
    from coheara.engine.sync import SyncEngine

ImageInput = str | Path | bytes | np.ndarray | Image.Image | PreparedImage
SchemaInput = dict[str, Any] | type[BaseModel]

JSON_INSTRUCTION = (
    "Reply with one JSON value only, no prose and no Markdown, that matches this JSON Schema:\n"
)


@dataclass
class _Attempt:
    """What one backend call produced, before it becomes a result."""

    text: str = ""
    finish_reason: str = "stop"
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    first_token_at: float | None = None
    prompt_exact: bool = False
    """Counted by a tokenizer or reported by the backend, not estimated."""
    reasoning_chars: int = 0
    warnings: list[str] = field(default_factory=list)
    endpoint: str | None = None
    failovers: int = 0

    def add(self, other: _Attempt) -> None:
        """Count another call's tokens (and failovers) into this running total."""
        self.failovers += other.failovers
        self.endpoint = other.endpoint or self.endpoint
        self.prompt_tokens = (self.prompt_tokens or 0) + (other.prompt_tokens or 0)
        produced = other.output_tokens
        if produced is None:
            produced = len(other.text) // 4
        self.output_tokens = (self.output_tokens or 0) + produced
        self.prompt_exact = other.prompt_exact


class Engine:
    """Run MedGemma in text, image + text and structured-extraction modes.

    Build it from a backend, or from the configuration with `Engine.from_config`.
    All methods are async; `Engine.sync()` gives a blocking twin for scripts.
    """

    def __init__(self, backend: Backend, settings: Settings | None = None) -> None:
        self.backend = backend
        self.settings = settings or load_settings()
        self._estimator = TokenEstimator()
        self._capabilities: Capabilities | None = None
        self.observers: list[Callable[[CallRecord], None]] = []
        """Called once per call, whatever its outcome (the audit trail, metrics)."""
        self.observer_errors = 0

    @classmethod
    def from_config(
        cls,
        *,
        backend: str | None = None,
        model: str | None = None,
        url: str | None = None,
        settings: Settings | None = None,
    ) -> Engine:
        """An engine for the configured backend; explicit arguments win over the settings."""
        from coheara.backends.selection import create_backend

        settings = settings or load_settings()
        if backend is not None:
            settings = settings.model_copy(update={"backend": backend})
        return cls(create_backend(settings, model=model, url=url), settings)

    def sync(self) -> SyncEngine:
        from coheara.engine.sync import SyncEngine

        return SyncEngine(self)

    async def aclose(self) -> None:
        await self.backend.aclose()

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def capabilities(self) -> Capabilities:
        if self._capabilities is None:
            self._capabilities = await self.backend.capabilities()
        return self._capabilities

    # ----- public modes -------------------------------------------------------------

    async def generate(
        self,
        prompt: str | None = None,
        *,
        system: str | None = None,
        images: Sequence[ImageInput] = (),
        messages: Sequence[InputMessage] | None = None,
        options: GenerationOptions | None = None,
        max_tokens: int | None = None,
    ) -> GenerationResult:
        """Modes 1 and 2: text (and images) in, text out."""
        result: GenerationResult | None = None
        async for chunk in self.stream(
            prompt,
            system=system,
            images=images,
            messages=messages,
            options=options,
            max_tokens=max_tokens,
        ):
            result = chunk.result or result
        assert result is not None
        return result

    async def extract(
        self,
        prompt: str | None = None,
        *,
        schema: SchemaInput,
        system: str | None = None,
        images: Sequence[ImageInput] = (),
        messages: Sequence[InputMessage] | None = None,
        options: GenerationOptions | None = None,
        max_tokens: int | None = None,
    ) -> ExtractionResult:
        """Mode 3: a schema-valid object, or `OutputValidationError` after the repair retries."""
        result: GenerationResult | None = None
        async for chunk in self.stream(
            prompt,
            system=system,
            images=images,
            messages=messages,
            schema=schema,
            options=options,
            max_tokens=max_tokens,
        ):
            result = chunk.result or result
        assert isinstance(result, ExtractionResult)
        return result

    async def run_task(
        self, task: str, request: dict[str, Any] | Any, *, images: Sequence[Any] = ()
    ) -> Any:
        """A clinical task (`SLM-01` ... , `IMG-...`, `EXT-...`) as a checked, traceable
        draft: a thin door to `coheara.tasks.run_task`, which sits above the engine."""
        from coheara.tasks.runner import run_task

        return await run_task(self, request, task=task, images=images)

    async def stream(
        self,
        prompt: str | None = None,
        *,
        system: str | None = None,
        images: Sequence[ImageInput] = (),
        messages: Sequence[InputMessage] | None = None,
        schema: SchemaInput | None = None,
        options: GenerationOptions | None = None,
        max_tokens: int | None = None,
    ) -> AsyncGenerator[StreamChunk, None]:
        """Every mode, streaming: text deltas, then one chunk whose `result` is set."""
        record = _Record(time.time(), time.perf_counter(), call_context(), schema)
        record.adapter = options.adapter if options is not None else None
        try:
            inner = self._stream(
                record, prompt, system, images, messages, schema, options, max_tokens
            )
            async with aclosing(inner):
                async for chunk in inner:
                    if chunk.result is not None:
                        record.result = chunk.result
                    yield chunk
        except BaseException as exc:
            record.error = exc
            raise
        finally:
            self._notify(record)

    def _notify(self, record: _Record) -> None:
        if not self.observers:
            return
        finished = record.finish()
        for observer in self.observers:
            try:
                observer(finished)
            except Exception:  # an observer's failure never changes the call's outcome
                self.observer_errors += 1

    async def _stream(
        self,
        record: _Record,
        prompt: str | None,
        system: str | None,
        images: Sequence[ImageInput],
        messages: Sequence[InputMessage] | None,
        schema: SchemaInput | None,
        options: GenerationOptions | None,
        max_tokens: int | None,
    ) -> AsyncGenerator[StreamChunk, None]:
        # Decoding and resizing a large scan takes a while: off the event loop.
        conversation = await asyncio.to_thread(self._conversation, prompt, system, images, messages)
        options = self._options(options, max_tokens)
        output_schema = (
            OutputSchema.build(
                schema,
                max_length=self.settings.extract_max_string,
                max_items=self.settings.extract_max_items,
            )
            if schema is not None
            else None
        )
        turns = to_gemma_turns(conversation)
        record.turns = turns
        capabilities = await self._check_capabilities(turns)
        deadline = time.monotonic() + self.settings.timeout_s
        inner = (
            self._stream_text(ChatRequest(turns, options), capabilities, deadline)
            if output_schema is None
            else self._stream_structured(turns, options, capabilities, output_schema, deadline)
        )
        evidence, image_warnings = _image_evidence(turns)
        # aclosing: a caller that stops early must stop the backend now, not at GC time.
        async with aclosing(inner):
            async for chunk in inner:
                if chunk.result is not None and evidence:
                    chunk.result.images = evidence
                    chunk.result.warnings[:0] = image_warnings
                yield chunk

    # ----- building the request -------------------------------------------------------

    def _conversation(
        self,
        prompt: str | None,
        system: str | None,
        images: Sequence[ImageInput],
        messages: Sequence[InputMessage] | None,
    ) -> list[InputMessage]:
        image_limits = self.settings.image_limits()
        with limits.applied(image_limits):
            # Counted before any is decoded; messages may carry prepared images already.
            already = sum(len(m.images) for m in messages or ())
            limits.check_image_count(already + len(images))
            prepared = tuple(
                load_image(image, label=f"image {i + 1}") for i, image in enumerate(images)
            )
        conversation: list[InputMessage] = []
        if system:
            conversation.append(InputMessage("system", system))
        conversation.extend(messages or ())
        if prompt is not None or prepared:
            conversation.append(InputMessage("user", prompt or "", prepared))
        if not conversation:
            raise InvalidRequestError("nothing to send: give a prompt or messages")
        return conversation

    def _options(
        self, options: GenerationOptions | None, max_tokens: int | None
    ) -> GenerationOptions:
        options = options or GenerationOptions(max_tokens=self.settings.max_output_tokens)
        if max_tokens is not None:
            options = replace(options, max_tokens=max_tokens)
        if options.max_tokens < 1:
            raise InvalidRequestError("max_tokens must be at least 1")
        if options.max_tokens > model_facts.MAX_OUTPUT_TOKENS:
            options = replace(options, max_tokens=model_facts.MAX_OUTPUT_TOKENS)
        if options.temperature < 0:
            raise InvalidRequestError("temperature must not be negative")
        return options

    async def _check_capabilities(self, turns: tuple[Message, ...]) -> Capabilities:
        capabilities = await self.capabilities()
        if any(t.images for t in turns) and not capabilities.vision:
            raise UnsupportedCapabilityError(
                f"model {capabilities.model} on {capabilities.backend} cannot read images "
                "(it has no vision capability); the request was not sent",
                hint=capabilities.details.get("vision_hint")
                or "configure a vision-capable MedGemma build",
            )
        return capabilities

    async def context_window(self) -> int:
        """The window in force: the deployment's, never more than the model was trained for."""
        return self._window(await self.capabilities())

    def _window(self, capabilities: Capabilities) -> int:
        declared = self.backend.context_window
        return (
            min(declared, capabilities.context_length) if declared else capabilities.context_length
        )

    # ----- running it -----------------------------------------------------------------

    async def _attempt(
        self,
        request: ChatRequest,
        capabilities: Capabilities,
        state: _Attempt,
        number: int,
        deadline: float,
    ) -> AsyncGenerator[StreamChunk, None]:
        """One backend call: budget, stream with reasoning filter and guard, truncation check."""
        window = self._window(capabilities)
        # Tokenizing a long prompt with images takes a while: keep the event loop free.
        exact = await asyncio.to_thread(self.backend.count_prompt_tokens, request)
        size = self._estimator.measure(request, exact)
        check_fits(size, request.options.max_tokens, window)
        reasoning = ReasoningFilter()
        guard = RepetitionGuard() if self.settings.guard_enabled else None
        visible: list[str] = []
        events, first_token_s = await self._backend_stream(request)
        stream = timed(
            events,
            backend=self.backend.name,
            first_token_s=first_token_s,
            total_s=self.settings.timeout_s,
            deadline=deadline,
        )
        answered = False
        async with aclosing(stream):
            async for event in stream:
                if event.text and state.first_token_at is None:
                    state.first_token_at = time.perf_counter()
                shown = reasoning.feed(event.text)
                if not answered and not shown:
                    # The backend has answered (perhaps with hidden reasoning): say so at
                    # once, so a server can send its headers before the visible text.
                    yield StreamChunk(text="", attempt=number)
                answered = True
                if event.done:
                    shown += reasoning.flush()
                if shown:
                    visible.append(shown)
                    loop = guard.feed(shown) if guard else None
                    if loop is not None:
                        text = "".join(visible)
                        state.text = text[: loop.start + loop.period]
                        state.finish_reason = "degenerate"
                        state.warnings.append(
                            f"generation stopped: a {loop.period}-character unit repeated "
                            f"from character {loop.start}"
                        )
                        yield StreamChunk(text=shown, attempt=number)
                        break
                    yield StreamChunk(text=shown, attempt=number)
                if event.done:
                    state.endpoint = event.endpoint
                    state.failovers += event.failovers
                    state.text = "".join(visible)
                    state.finish_reason = event.finish_reason or "stop"
                    state.prompt_tokens = event.prompt_tokens
                    state.output_tokens = event.output_tokens
                    break
            else:
                raise BackendError(f"{self.backend.name} ended the stream without finishing it")
        state.reasoning_chars += reasoning.hidden_chars
        if reasoning.hidden_chars:
            state.warnings.append(
                f"hidden reasoning stripped ({reasoning.hidden_chars} characters)"
            )
        if state.finish_reason != "degenerate":
            # Only a backend that fixes its window (Ollama) can silently fill and cut it.
            fixed = window if self.backend.context_window else None
            check_not_truncated(size, state.prompt_tokens, fixed)
            if state.prompt_tokens is not None:
                self._estimator.observe(size, state.prompt_tokens)
        state.prompt_exact = state.prompt_tokens is not None or size.exact
        if state.prompt_tokens is None:
            state.prompt_tokens = size.tokens
        if state.finish_reason == "length":
            state.warnings.append("output reached max_tokens: the draft may be cut short")

    async def _backend_stream(
        self, request: ChatRequest
    ) -> tuple[AsyncGenerator[StreamEvent, None], float]:
        """The backend's stream and the bound on its first event.

        A pool of replicas (also one that `auto` resolved to) gets the first-token timeout
        per endpoint, so that it counts a silent replica's failure and fails over; the
        engine's bound then covers the whole phase, every endpoint's try included, and
        never fires before the pool's own.
        """
        per_endpoint = self.settings.first_token_timeout_s
        backend = self.backend
        if isinstance(backend, AutoBackend):
            backend = await backend.resolve()  # resolved by capabilities() already
        if isinstance(backend, PooledBackend):
            events = backend.stream(request, first_token_s=per_endpoint)
            return events, backend.first_token_phase_s(per_endpoint)
        return self.backend.stream(request), per_endpoint

    def _result(
        self,
        cls: type[GenerationResult],
        state: _Attempt,
        started: float,
        attempts: int,
        capabilities: Capabilities,
        **extra: Any,
    ) -> Any:
        total = time.perf_counter() - started
        output_tokens = state.output_tokens
        if output_tokens is None:
            output_tokens = max(1, len(state.text) // 4) if state.text else 0
        decode_time = total - ((state.first_token_at or started) - started)
        return cls(
            text=state.text,
            finish_reason=state.finish_reason,
            prompt_tokens=state.prompt_tokens or 0,
            prompt_tokens_exact=state.prompt_exact,
            output_tokens=output_tokens,
            time_to_first_token_s=(
                state.first_token_at - started if state.first_token_at is not None else None
            ),
            total_s=total,
            tokens_per_s=output_tokens / decode_time if decode_time > 0 and output_tokens else None,
            backend=capabilities.backend,
            model=capabilities.model,
            reasoning_chars=state.reasoning_chars,
            attempts=attempts,
            endpoint=state.endpoint or self._endpoint_name(),
            failovers=state.failovers,
            warnings=state.warnings,
            **extra,
        )

    def _endpoint_name(self) -> str | None:
        """A single backend's one endpoint, for a result whose backend named none."""
        endpoints = self.backend.endpoints()
        return endpoints[0].name if len(endpoints) == 1 else None

    async def _stream_text(
        self, request: ChatRequest, capabilities: Capabilities, deadline: float
    ) -> AsyncGenerator[StreamChunk, None]:
        started = time.perf_counter()
        state = _Attempt()
        async with aclosing(self._attempt(request, capabilities, state, 1, deadline)) as attempt:
            async for chunk in attempt:
                yield chunk
        yield StreamChunk(result=self._result(GenerationResult, state, started, 1, capabilities))

    async def _stream_structured(
        self,
        turns: tuple[Message, ...],
        options: GenerationOptions,
        capabilities: Capabilities,
        schema: OutputSchema,
        deadline: float,
    ) -> AsyncGenerator[StreamChunk, None]:
        """Constrained attempt, repair retries, then (for objects) one field at a time."""
        started = time.perf_counter()
        attempts = 1 + self.settings.extract_retries
        warnings: list[str] = []
        problems: list[Problem] = []
        request = ChatRequest(_with_schema_instruction(turns, schema), options, schema.schema)
        spent = _Attempt()  # tokens of every call, which the result reports
        state = _Attempt()
        for number in range(1, attempts + 1):
            state = _Attempt(first_token_at=state.first_token_at, warnings=warnings)
            async with aclosing(
                self._attempt(request, capabilities, state, number, deadline)
            ) as attempt:
                async for chunk in attempt:
                    yield chunk
            spent.add(state)
            value, problems = _check_output(schema, state)
            if not problems:
                result = self._extraction(state, spent, started, number, capabilities, value)
                result.strategy = "whole" if number == 1 else "repaired"
                yield StreamChunk(result=result)
                return
            warnings.append(
                f"attempt {number} invalid: " + "; ".join(p.redacted() for p in problems[:3])
            )
            request = _repair_request(request, state.text, problems)
        fields = _field_schemas(schema) if self.settings.extract_field_fallback else None
        if fields is not None:
            values: dict[str, Any] = {}
            number = attempts
            for name, field_schema in fields:
                number += 1
                part = _Attempt(warnings=warnings)
                field_turns = _with_field_instruction(turns, name)
                field_request = ChatRequest(
                    _with_schema_instruction(field_turns, field_schema),
                    options,
                    field_schema.schema,
                )
                async with aclosing(
                    self._attempt(field_request, capabilities, part, number, deadline)
                ) as attempt:
                    async for chunk in attempt:
                        yield chunk
                spent.add(part)
                value, field_problems = _check_output(field_schema, part)
                if not field_problems and isinstance(value, dict) and name in value:
                    values[name] = value[name]
            merged = _Attempt(
                text=json.dumps(values, ensure_ascii=False),
                first_token_at=state.first_token_at,
                prompt_exact=spent.prompt_exact,
                warnings=warnings,
            )
            value, merged_problems = _check_output(schema, merged)
            if not merged_problems:
                warnings.append(
                    f"built one field at a time ({len(fields)} calls) after "
                    f"{attempts} invalid attempt(s)"
                )
                result = self._extraction(merged, spent, started, number, capabilities, value)
                result.strategy = "field_by_field"
                yield StreamChunk(result=result)
                return
        cut_short = problems and problems[0].keyword == "length"
        raise OutputValidationError(
            f"the model's output did not match the schema after {attempts} attempt(s)"
            + (" and field by field" if fields is not None else "")
            + ": "
            + "; ".join(p.redacted() for p in problems[:5]),
            hint="raise max_tokens"
            if cut_short
            else "simplify the schema or raise COHEARA_EXTRACT_RETRIES",
            problems=[p.redacted() for p in problems],
        )

    def _extraction(
        self,
        state: _Attempt,
        spent: _Attempt,
        started: float,
        attempts: int,
        capabilities: Capabilities,
        value: Any,
    ) -> ExtractionResult:
        """The accepted output, with the tokens (and failovers) of every call it took."""
        state.prompt_tokens, state.output_tokens = spent.prompt_tokens, spent.output_tokens
        state.failovers, state.endpoint = spent.failovers, state.endpoint or spent.endpoint
        return self._result(ExtractionResult, state, started, attempts, capabilities, value=value)


MAX_FALLBACK_FIELDS = 16


async def timed(
    events: AsyncGenerator[StreamEvent, None],
    *,
    backend: str,
    first_token_s: float,
    total_s: float,
    deadline: float,
) -> AsyncGenerator[StreamEvent, None]:
    """`events` with the per-phase timeouts of every backend alike: the first event within
    `first_token_s`, every event before `deadline` (monotonic; `total_s` after the call
    began). The connect phase is the HTTP clients' (`connect_timeout_s`). The backend's
    stream is awaited in this task, so a timeout cancels it where it waits and closing
    it closes its HTTP response."""
    first = True
    async with aclosing(events):
        while True:
            remaining = deadline - time.monotonic()
            limit, phase = remaining, "total"
            if first and first_token_s < remaining:
                limit, phase = first_token_s, "first_token"
            timer = asyncio.timeout(max(limit, 0.0))
            try:
                async with timer:
                    event = await anext(events)
            except StopAsyncIteration:
                return
            except TimeoutError:
                if not timer.expired():
                    raise
                seconds = total_s if phase == "total" else first_token_s
                raise _timeout(backend, phase, seconds) from None
            first = False
            yield event


def _timeout(backend: str, phase: str, seconds: float) -> BackendTimeoutError:
    if phase == "first_token":
        return BackendTimeoutError(
            f"{backend} sent no first token within {seconds:g}s (first-token timeout)",
            hint="raise COHEARA_FIRST_TOKEN_TIMEOUT_S, or check whether the model is still "
            "loading or the runtime is overloaded",
            phase=phase,
            timeout_s=seconds,
        )
    return BackendTimeoutError(
        f"the call to {backend} did not finish within {seconds:g}s (total timeout)",
        hint="raise COHEARA_TIMEOUT_S, or lower max_tokens",
        phase=phase,
        timeout_s=seconds,
    )


@dataclass(frozen=True)
class CallRecord:
    """One engine call as its observers see it. `turns` and the result's text are there so
    an observer can compute keyed digests; an observer must never store them in the clear."""

    started_at: float
    """Unix time."""
    duration_s: float
    outcome: str
    """"ok", "cancelled", or the error's stable code (e.g. context_length_exceeded)."""
    error_class: str | None
    context: CallContext
    turns: tuple[Message, ...]
    schema: Any
    result: GenerationResult | None
    adapter: str | None = None
    """The LoRA adapter the call asked for (`GenerationOptions.adapter`); None: the base."""


@dataclass
class _Record:
    started_at: float
    clock: float
    context: CallContext
    schema: Any
    turns: tuple[Message, ...] = ()
    result: GenerationResult | None = None
    error: BaseException | None = None
    adapter: str | None = None

    def finish(self) -> CallRecord:
        if self.result is not None and isinstance(
            self.error, GeneratorExit | asyncio.CancelledError
        ):
            self.error = None  # closed after its result was delivered: the call completed
        if self.error is None:
            outcome = "ok" if self.result is not None else "cancelled"
        elif isinstance(self.error, CohearaError):
            outcome = self.error.code
        elif isinstance(self.error, asyncio.CancelledError | GeneratorExit):
            outcome = "cancelled"
        else:
            outcome = "internal_error"
        return CallRecord(
            started_at=self.started_at,
            duration_s=time.perf_counter() - self.clock,
            outcome=outcome,
            error_class=type(self.error).__name__ if self.error is not None else None,
            context=self.context,
            turns=self.turns,
            schema=self.schema,
            result=self.result,
            adapter=self.adapter,
        )


def _image_evidence(turns: Sequence[Message]) -> tuple[list[dict[str, Any]], list[str]]:
    """Each image's provenance in prompt order, and their warnings once each."""
    evidence: list[dict[str, Any]] = []
    notes: list[str] = []
    for turn in turns:
        for image in turn.images:
            provenance = image.provenance
            evidence.append(provenance.to_dict() if provenance else {"kind": "picture"})
            for note in provenance.warnings if provenance else ():
                if note not in notes:
                    notes.append(note)
    return evidence, notes


def _field_schemas(schema: OutputSchema) -> list[tuple[str, OutputSchema]] | None:
    """One small schema per top-level property, for the field-at-a-time fallback."""
    root = schema.schema
    properties = root.get("properties")
    if not isinstance(properties, dict) or not 0 < len(properties) <= MAX_FALLBACK_FIELDS:
        return None
    shared: dict[str, Any] = {k: root[k] for k in ("$defs", "definitions") if k in root}
    required = set(root.get("required") or ())
    # An optional field stays optional: forcing it would make the model invent a value.
    return [
        (
            name,
            OutputSchema(
                {
                    "type": "object",
                    "properties": {name: sub},
                    "required": [name] if name in required else [],
                    "additionalProperties": False,
                    **shared,
                }
            ),
        )
        for name, sub in properties.items()
    ]


def _with_field_instruction(turns: tuple[Message, ...], name: str) -> tuple[Message, ...]:
    return (*turns[:-1], turns[-1].with_text_appended(f"Give only the field {json.dumps(name)}."))


def _check_output(schema: OutputSchema, state: _Attempt) -> tuple[Any, list[Problem]]:
    if state.finish_reason == "degenerate":
        return None, [Problem("(root)", "repetition", "the output repeated itself in a loop")]
    if state.finish_reason == "length":
        return None, [
            Problem("(root)", "length", "the output was cut at max_tokens; be much shorter")
        ]
    return schema.validate(state.text)


def _with_schema_instruction(
    turns: tuple[Message, ...], schema: OutputSchema
) -> tuple[Message, ...]:
    instruction = JSON_INSTRUCTION + json.dumps(schema.schema, separators=(",", ":"))
    return (*turns[:-1], turns[-1].with_text_appended(instruction))


def _repair_request(request: ChatRequest, output: str, problems: list[Problem]) -> ChatRequest:
    """Show the model its own reply and what was wrong with it, once per retry."""
    listing = "\n".join(f"- {p.path}: {p.message}" for p in problems[:10])
    fix = Message(
        "user",
        "Your reply did not match the schema:\n"
        f"{listing}\nReply again with the corrected JSON only.",
    )
    original = request.messages
    messages = (*original, Message("assistant", output[:4000] or "(empty)"), fix)
    return replace(request, messages=messages)
