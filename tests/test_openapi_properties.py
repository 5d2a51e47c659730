"""Property-based tests of the OpenAPI document (schemathesis) against the running server.

Every documented operation gets bounded, generated requests, valid (positive) and invalid
(negative), over a loopback socket; the server must never answer 5xx, and every answer
must be one the document declares, with that status's body shape and content type. The
backend is the fake Ollama (instant replies), so each operation takes seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode, checks
from schemathesis.specs.openapi import checks as openapi_checks

from coheara import Engine, Settings, model_facts
from coheara.server import create_app
from fakes.fake_ollama import FakeOllama, OllamaModel
from servers import serve

CHECKS = [
    checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_schema_conformance,
]
EXAMPLES = 25


def _settings(url: str) -> Settings:
    return Settings(backend="ollama", ollama_url=url, max_output_tokens=16, extract_retries=0)


def _document() -> dict[str, Any]:
    """The document as the app serves it (no backend is contacted to build it)."""
    return create_app(Engine.from_config(settings=_settings("http://127.0.0.1:9"))).openapi()


SCHEMA = schemathesis.openapi.from_dict(_document())
OPERATIONS = {op.label: op for op in (result.ok() for result in SCHEMA.get_all_operations())}


@pytest.fixture(scope="module")
def service() -> Iterator[str]:
    fake = FakeOllama(
        {model_facts.DEFAULT_OLLAMA_MODEL: OllamaModel(capabilities=["completion", "vision"])}
    )
    with serve(fake.app) as backend_url:
        engine = Engine.from_config(settings=_settings(backend_url))
        with serve(create_app(engine)) as url:
            yield url


def test_the_document_covers_every_surface() -> None:
    paths = {label.split(" ", 1)[1] for label in OPERATIONS}
    assert {"/v1/generate", "/v1/chat/completions", "/api/chat", "/v1/tasks/{task_id}"} <= paths


CASES = [
    (label, mode)
    for label in sorted(OPERATIONS)
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    # Invalid input needs an input to break: operations with a body (the others take only
    # a free-form path segment, or nothing).
    if mode is GenerationMode.POSITIVE or label.startswith("POST ")
]


IDS = [f"{label}-{mode.value}" for label, mode in CASES]


@pytest.mark.parametrize(("label", "mode"), CASES, ids=IDS)
def test_every_operation_answers_as_documented(
    label: str, mode: GenerationMode, service: str
) -> None:
    @given(case=OPERATIONS[label].as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=service, checks=CHECKS, timeout=30)

    check()
