"""The clinical task layer: the six SLM roles, imaging reads and report extraction as
validated, traceable drafts on top of the engine."""

from coheara.tasks.envelope import ArtifactContext, TaskRequest, TaskResponse
from coheara.tasks.registry import all_tasks, get_task
from coheara.tasks.runner import review_draft, run_task
from coheara.tasks.spec import Cited, Review, Statement, TaskSpec

__all__ = [
    "ArtifactContext",
    "Cited",
    "Review",
    "Statement",
    "TaskRequest",
    "TaskResponse",
    "TaskSpec",
    "all_tasks",
    "get_task",
    "review_draft",
    "run_task",
]
