"""Gold-set cases -> training examples: the prompt exactly as inference writes it, the
accepted draft as the answer, and the loss on the answer only.

The prompt is not rebuilt here: each case runs through the real task layer and engine
(`coheara.tasks.run_task` -> `Engine.extract`) over a backend that records the request
it is sent and answers with the accepted draft. The first request it records is the one
a live run sends (system text, instruction, citation rules, SOURCES, the schema
instruction), and the Transformers backend's own `render_prompt` and
`prompt_token_ids` turn it into text and ids. Training and inference therefore share
one code path; a change to a task's prompt changes both.

The answer is the draft as the engine expects it back: compact JSON (no whitespace, as
the grammar writes it), keys in the schema's order, only the fields the model is asked
for (a field the layer computes, such as SLM-05's readability, is left out), then the
`<end_of_turn>` token. Labels are -100 on every prompt token.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jsonschema

from coheara import model_facts
from coheara.backends.base import (
    Backend,
    Capabilities,
    ChatRequest,
    Health,
    StreamEvent,
)
from coheara.engine.schema import OutputSchema
from coheara.errors import CohearaError, InvalidRequestError
from coheara.settings import Settings
from coheara.tasks.registry import get_task
from coheara.tasks.spec import TaskSpec

if TYPE_CHECKING:
    from coheara.backends.transformers_backend import TransformersBackend
    from coheara.evaluation.gold import GoldCase

IGNORE = -100
"""The label PyTorch's cross entropy skips."""


@dataclass(frozen=True)
class Example:
    """One training sequence: prompt ids then answer ids and `<end_of_turn>`."""

    case_id: str
    prompt: str
    """The rendered prompt text, as the backend renders it for generation."""
    answer: str
    """The compact JSON the model is taught to write."""
    input_ids: list[int]
    labels: list[int]

    @property
    def prompt_tokens(self) -> int:
        return sum(1 for label in self.labels if label == IGNORE)


class RecordingBackend(Backend):
    """Answers every call with the accepted draft and keeps the requests it is sent."""

    name = "finetune-recorder"

    def __init__(self, answer: str, context_length: int) -> None:
        self.model = "recorder"
        self.answer = answer
        self.context_length = context_length
        self.requests: list[ChatRequest] = []

    async def stream(self, request: ChatRequest) -> AsyncGenerator[StreamEvent, None]:
        self.requests.append(request)
        yield StreamEvent(text=self.answer)
        yield StreamEvent(done=True, finish_reason="stop")

    async def capabilities(self) -> Capabilities:
        return Capabilities(
            backend=self.name,
            model=self.model,
            vision=True,
            context_length=self.context_length,
            constrained_decoding=True,
            exact_token_count=False,
        )

    async def health(self) -> Health:
        return Health(True, self.name, "records requests")


def output_schema(spec: TaskSpec, settings: Settings) -> OutputSchema:
    """The task's output schema bounded as the engine bounds it for this deployment."""
    return OutputSchema.build(
        spec.output_model,
        max_length=settings.extract_max_string,
        max_items=settings.extract_max_items,
    )


def answer_text(spec: TaskSpec, draft: dict[str, Any], settings: Settings) -> str:
    """The accepted draft as the model should write it: compact JSON of the fields the
    schema asks for, in its order; InvalidRequestError (paths and rules, no values) when
    the draft does not fit the schema the model is held to."""
    schema = output_schema(spec, settings)
    value = _project(draft, schema.schema, schema.schema)
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    _, problems = schema.validate(text)
    if problems:
        raise InvalidRequestError(
            f"the accepted draft does not fit {spec.id}'s output schema: "
            + "; ".join(p.redacted() for p in problems[:5])
        )
    return text


def _resolve(node: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    while isinstance(node.get("$ref"), str):
        target: Any = root
        for part in [p for p in node["$ref"][1:].split("/") if p]:
            target = target[part.replace("~1", "/").replace("~0", "~")]
        node = target
    return node


def _fits(value: Any, node: dict[str, Any], root: dict[str, Any]) -> bool:
    defs: dict[str, Any] = {k: root[k] for k in ("$defs", "definitions") if k in root}
    return bool(jsonschema.Draft202012Validator({**node, **defs}).is_valid(value))


def _project(value: Any, node: Any, root: dict[str, Any]) -> Any:
    """`value` reduced to what the schema describes, objects in its property order."""
    if not isinstance(node, dict):
        return value
    node = _resolve(node, root)
    for key in ("anyOf", "oneOf"):
        options = node.get(key)
        if isinstance(options, list):
            for option in options:
                projected = _project(value, option, root)
                if _fits(projected, option, root):
                    return projected
            return value
    if isinstance(value, dict) and isinstance(node.get("properties"), dict):
        properties = node["properties"]
        return {k: _project(value[k], sub, root) for k, sub in properties.items() if k in value}
    if isinstance(value, list) and isinstance(node.get("items"), dict):
        return [_project(item, node["items"], root) for item in value]
    return value


def record_request(
    case: GoldCase, answer: str, settings: Settings, images: Sequence[Any] = ()
) -> ChatRequest:
    """The first request a live run of `case` sends to its backend (see the module doc)."""
    from coheara.engine.engine import Engine
    from coheara.tasks.runner import run_task

    recorder = RecordingBackend(answer, model_facts.CONTEXT_LENGTH)
    engine = Engine(recorder, settings)

    async def run() -> None:
        await run_task(engine, dict(case.request), task=case.task, images=images)

    try:
        _run_sync(run)
    except CohearaError as exc:
        # The task refused the case or the draft did not pass: name the case, not its text.
        raise InvalidRequestError(f"case {case.id}: {exc.message}", hint=exc.hint) from None
    if not recorder.requests:
        raise InvalidRequestError(f"case {case.id}: the task sent no request to a model")
    return recorder.requests[0]


def _run_sync(function: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a coroutine to its end from sync code, inside a running event loop too."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(function())
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(lambda: asyncio.run(function())).result()


def build_example(
    case: GoldCase,
    backend: TransformersBackend,
    settings: Settings,
    images: Sequence[Any] = (),
) -> Example:
    """One case as a training example, rendered and tokenized by `backend` (its processor
    only: no weights are loaded)."""
    spec = get_task(case.task)
    draft = case.expected.draft
    if draft is None:
        raise InvalidRequestError(f"case {case.id} has no expected.draft to learn")
    try:
        answer = answer_text(spec, draft, settings)
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"case {case.id}: {exc.message}") from None
    request = record_request(case, answer, settings, images)
    if request.images:
        raise InvalidRequestError(
            f"case {case.id}: {spec.id} reads images; fine-tuning takes text tasks only",
            hint="train a text task (SLM-01 ... SLM-06, EXT-EHR, EXT-LAB)",
        )
    prompt = backend.render_prompt(request)
    prompt_ids = backend.prompt_token_ids(request)
    tokenizer = backend.tokenizer
    answer_ids = [int(i) for i in tokenizer(answer, add_special_tokens=False)["input_ids"]]
    end = int(tokenizer.convert_tokens_to_ids(model_facts.END_OF_TURN))
    if end == tokenizer.unk_token_id:
        raise InvalidRequestError(
            f"the tokenizer has no {model_facts.END_OF_TURN} token: not a Gemma chat model"
        )
    completion = [*answer_ids, end]
    return Example(
        case_id=case.id,
        prompt=prompt,
        answer=answer,
        input_ids=prompt_ids + completion,
        labels=[IGNORE] * len(prompt_ids) + completion,
    )


@dataclass(frozen=True)
class TrainingSet:
    task: str
    examples: list[Example]
    skipped: dict[str, str]
    """Case id -> why it was left out (another task, no draft, a refusal case)."""


def select_cases(cases: Sequence[GoldCase], task: str) -> tuple[list[GoldCase], dict[str, str]]:
    """The cases of `task` that carry an accepted draft, and why the others were left out."""
    spec = get_task(task)
    chosen: list[GoldCase] = []
    skipped: dict[str, str] = {}
    for case in cases:
        if get_task(case.task).id != spec.id:
            skipped[case.id] = f"task {case.task}"
        elif case.expected.refuse:
            skipped[case.id] = "a refusal case"
        elif case.expected.draft is None:
            skipped[case.id] = "no expected.draft"
        else:
            chosen.append(case)
    if not chosen:
        raise InvalidRequestError(
            f"no case of {spec.id} with an expected.draft to train on",
            hint="each training case needs task, request and expected.draft (the accepted draft)",
        )
    return chosen, skipped


def build_training_set(
    cases: Sequence[GoldCase], task: str, backend: TransformersBackend, settings: Settings
) -> TrainingSet:
    spec = get_task(task)
    if spec.mode == "image":
        raise InvalidRequestError(
            f"{spec.id} reads images; fine-tuning takes text tasks only",
            hint="train a text task (SLM-01 ... SLM-06, EXT-EHR, EXT-LAB)",
        )
    chosen, skipped = select_cases(cases, spec.id)
    examples = [build_example(case, backend, settings) for case in chosen]
    return TrainingSet(spec.id, examples, skipped)
