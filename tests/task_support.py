"""What the clinical task tests share: the examples, findings by rule, the bounds an output
schema must have, the tiny engine, and the envelope every end-to-end run returns."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coheara.tasks.envelope import TaskRequest
from coheara.tasks.registry import get_task

if TYPE_CHECKING:
    from coheara import Engine
    from coheara.tasks.envelope import Finding, TaskResponse
    from coheara.tasks.spec import Review, TaskSpec

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
LINK_STATUSES = {"verified", "verified_elsewhere", "unverified", "uncited", "unknown_source"}


def example(task: str) -> dict[str, Any]:
    """A task's example request (by id or slug): `examples/{id}-{slug}.json`."""
    spec = get_task(task)
    path = EXAMPLES / f"{spec.id.lower()}-{spec.slug}.json"
    body: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return body


def assert_example(spec: TaskSpec, file: str) -> None:
    """`file` is the task's example, a valid request, and names no one: its patient is the
    synthetic placeholder "Patient A"."""
    assert f"{spec.id.lower()}-{spec.slug}.json" == file
    request = TaskRequest.model_validate(example(spec.id))
    spec.input_model.model_validate(request.input)
    assert "Patient A" in json.dumps(request.input)


def rules(review: Review, element: str | None = None) -> list[str]:
    return [f.rule for f in review.findings if element is None or f.element == element]


def finding(review: Review, rule: str) -> Finding:
    """The one finding of `rule`: none, or more than one, fails the test."""
    matches = [f for f in review.findings if f.rule == rule]
    assert len(matches) == 1, (rule, rules(review))
    return matches[0]


def unbounded(node: Any, path: str = "$", *, closed: bool = False) -> list[str]:
    """Where a JSON schema lets the model write without end: a string with neither a length,
    a choice nor a whole-value pattern of bounded length; a list without maxItems; with
    `closed`, an object that allows other properties."""
    found: list[str] = []
    if isinstance(node, dict):
        kind = node.get("type")
        if kind == "string" and not ({"maxLength", "enum", "const"} & node.keys()):
            pattern = node.get("pattern", "")
            if not (pattern.startswith("^") and pattern.endswith("$") and "*" not in pattern):
                found.append(path)
        if kind == "array" and "maxItems" not in node:
            found.append(path)
        if closed and kind == "object" and node.get("additionalProperties") is not False:
            found.append(path)
        for key, inner in node.items():
            found += unbounded(inner, f"{path}.{key}", closed=closed)
    elif isinstance(node, list):
        for index, inner in enumerate(node):
            found += unbounded(inner, f"{path}[{index}]", closed=closed)
    return found


def resolve(draft: Any, path: str) -> Any:
    """The value at a draft path such as `sections[1].statements[0].text`."""
    value = draft
    for name, index in re.findall(r"([A-Za-z_]+)|\[(\d+)\]", path):
        value = value[name] if name else value[int(index)]
    return value


def tiny(tiny_engine: Engine) -> Engine:
    """The tiny model with strings and lists capped, as a deployment would set them, so
    that random weights end."""
    from coheara import Engine, Settings

    return Engine(
        tiny_engine.backend,
        Settings(extract_max_string=24, extract_max_items=2, max_output_tokens=600),
    )


def assert_envelope(response: TaskResponse, spec: TaskSpec, body: dict[str, Any]) -> None:
    """What every run returns, whatever random weights wrote: the request's ids, a draft
    for review that fits the schema, its provenance, every link pointing into the final
    draft, nothing unverified passing silently, and `passed` only without an error."""
    assert response.task_id == spec.id
    assert response.request_id == body["request_id"]
    assert response.clinical_event_id == body.get("clinical_event_id")
    assert response.patient_scope_id == body.get("patient_scope_id")
    assert response.status == "draft" and response.requires_review is True
    spec.output_model.model_validate(response.draft)
    meta = response.metadata
    assert (meta.task_version, meta.prompt_hash) == (spec.version, spec.prompt_hash)
    assert meta.backend == "transformers"
    assert meta.strategy in ("whole", "repaired", "field_by_field")
    assert meta.latency_target_ms == spec.latency_target_ms
    assert meta.output_tokens > 0 and meta.prompt_tokens > 0
    findings = response.validation.findings
    for link in response.trace:
        assert link.status in LINK_STATUSES
        resolve(response.draft, link.element)
        if link.status in ("uncited", "unverified", "unknown_source"):
            assert any(f.element == link.element for f in findings), link
    uncited = {link.element for link in response.trace if link.status == "uncited"}
    flagged = {f.element for f in findings if f.rule == "statement_uncited" and f.element}
    assert uncited == flagged
    assert response.validation.passed == (not any(f.severity == "error" for f in findings))
    assert set(response.confidence) == set(response.draft)
