"""The clinical tasks over HTTP: list them with their schemas, run one as a checked draft.

`POST /v1/tasks/{task_id}` takes the same JSON as `coheara run --input` and the files
under `examples/`; the response is a `TaskResponse`: the draft with its trace, gaps,
validation and metadata.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from coheara.access.auth import granted_key
from coheara.server.common import (
    ServerState,
    check_text_chars,
    get_state,
    public_model_name,
    text_chars,
    until_disconnect,
)
from coheara.server.errors import NATIVE_ERROR_RESPONSES
from coheara.tasks import TaskRequest, TaskResponse, all_tasks, get_task, run_task

router = APIRouter(tags=["tasks"])


class TaskSummary(BaseModel):
    id: str
    slug: str
    title: str
    version: str
    mode: str
    description: str
    prompt_hash: str
    latency_target_ms: int | None
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]


class TaskList(BaseModel):
    tasks: list[TaskSummary]


@router.get("/v1/tasks", response_model=TaskList, summary="Every task, with its JSON Schemas")
async def list_tasks() -> Any:
    """The tasks the caller's API key may run (all of them on an open server)."""
    key = granted_key()
    specs = [s for s in all_tasks().values() if key is None or key.allows_task(s.id)]
    return {"tasks": [spec.describe() for spec in specs]}


@router.get(
    "/v1/tasks/{task_id}",
    response_model=TaskSummary,
    responses=NATIVE_ERROR_RESPONSES,
    summary="One task, with its JSON Schemas",
)
async def describe_task(task_id: str) -> Any:
    return get_task(task_id).describe()


@router.post(
    "/v1/tasks/{task_id}",
    response_model=TaskResponse,
    responses=NATIVE_ERROR_RESPONSES,
    summary="Run a task: a checked, traceable draft for a clinician",
)
async def run(
    task_id: str,
    body: TaskRequest,
    request: Request,
    state: Annotated[ServerState, Depends(get_state)],
) -> Any:
    """The draft, where each element came from (`trace`), what is missing (`gaps`), what the
    checks found (`validation`) and how it was made (`metadata`). Always a draft."""
    spec = get_task(task_id)
    context = body.context.model_dump(mode="json") if body.context is not None else None
    check_text_chars(text_chars(body.input) + text_chars(context), state.settings)
    response = await until_disconnect(request, run_task(state.engine, body, task=spec))
    response.metadata.model = public_model_name(response.metadata.model)
    return response
