"""Every task, found by module: adding a role is adding one module under `tasks/roles/`
that defines `TASK`."""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from coheara.errors import TaskNotFoundError
from coheara.tasks.spec import TaskSpec


@cache
def all_tasks() -> dict[str, TaskSpec]:
    """Task id -> spec: the SLM roles, then imaging reads, then extraction, each by id."""
    from coheara.tasks import roles

    found: dict[str, TaskSpec] = {}
    for info in pkgutil.iter_modules(roles.__path__):
        module = importlib.import_module(f"{roles.__name__}.{info.name}")
        spec = getattr(module, "TASK", None)
        if not isinstance(spec, TaskSpec):
            continue
        if spec.id in found:
            raise RuntimeError(f"task id {spec.id} is declared twice")
        found[spec.id] = spec
    order = {"SLM": 0, "IMG": 1, "EXT": 2}  # the six roles first, as the spec numbers them
    return dict(sorted(found.items(), key=lambda kv: (order.get(kv[0][:3], 3), kv[0])))


def get_task(task_id: str) -> TaskSpec:
    """By id (`SLM-04`, any case) or slug (`alert`)."""
    wanted = task_id.strip().upper()
    tasks = all_tasks()
    if wanted in tasks:
        return tasks[wanted]
    for spec in tasks.values():
        if spec.slug.upper() == wanted:
            return spec
    raise TaskNotFoundError(
        f"unknown task '{task_id[:32]}'", hint="one of " + (", ".join(tasks) or "none installed")
    )
