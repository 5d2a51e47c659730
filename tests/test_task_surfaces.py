"""Every task through its public surfaces: the examples, HTTP and the command line.

Each role's own test file checks its logic; here the shared doors: every task has its
example (the exact body of `POST /v1/tasks/{id}`), every example is accepted, and the
server and `coheara run` give the same envelope as `run_task` on the tiny model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from coheara import Engine
from coheara.server import create_app
from coheara.tasks import TaskRequest, TaskResponse, all_tasks
from coheara.tasks.runner import validate_input
from servers import serve
from task_support import EXAMPLES, assert_envelope, example, tiny


def test_every_task_has_exactly_its_example_and_each_is_valid() -> None:
    expected = {f"{s.id.lower()}-{s.slug}.json" for s in all_tasks().values()}
    assert {p.name for p in EXAMPLES.glob("*.json")} == expected
    for task_id, spec in all_tasks().items():
        request = TaskRequest.model_validate(example(task_id))
        validate_input(spec, request.input)
        assert bool(request.images) == (spec.mode == "image"), task_id
        assert "CANARY" not in json.dumps(request.input)


def test_the_six_roles_come_first() -> None:
    ids = list(all_tasks())
    assert ids[:6] == [f"SLM-0{n}" for n in range(1, 7)]
    assert len(ids) == len(set(ids)) and all(i[:4] in ("SLM-", "IMG-", "EXT-") for i in ids)


@pytest.fixture(scope="module")
def http(tiny_engine: Engine) -> Iterator[httpx.Client]:
    engine = tiny(tiny_engine)
    with serve(create_app(engine)) as url, httpx.Client(base_url=url, timeout=300) as client:
        yield client


@pytest.mark.parametrize("task_id", ["SLM-04", "IMG-CXR", "EXT-LAB"])
def test_an_example_over_http_is_a_checked_draft(http: httpx.Client, task_id: str) -> None:
    spec = all_tasks()[task_id]
    body = {**example(task_id), "max_tokens": 800, "fhir": spec.to_fhir is not None}
    answer = http.post(f"/v1/tasks/{task_id}", json=body)
    assert answer.status_code == 200, answer.text
    response = TaskResponse.model_validate(answer.json())
    assert_envelope(response, spec, body)
    assert response.metadata.model == Path(response.metadata.model).name  # never a path
    assert (response.fhir or {}).get("resourceType") or spec.to_fhir is None
    assert bool(response.metadata.images) == (spec.mode == "image")


def test_a_bad_task_input_over_http_is_a_400_naming_the_field(http: httpx.Client) -> None:
    answer = http.post("/v1/tasks/SLM-04", json={"input": {"alert": {}}})
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "invalid_request"
    assert "input for SLM-04 is invalid: alert" in answer.json()["error"]["message"]
    schema = http.get("/v1/tasks/slm-04").json()
    assert schema["id"] == "SLM-04" and "alert" in schema["input_schema"]["properties"]


def test_coheara_run_prints_text_fhir_and_json(tmp_path: Path, tiny_model_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COHEARA_", "OLLAMA_"))}
    env.update(
        {
            "HOME": str(tmp_path),
            "OMP_NUM_THREADS": "1",
            "NO_COLOR": "1",
            "COHEARA_EXTRACT_MAX_STRING": "24",
            "COHEARA_EXTRACT_MAX_ITEMS": "2",
        }
    )
    request = tmp_path / "alert.json"
    request.write_text(json.dumps(example("SLM-04")))

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "coheara.cli.main", "run", *extra]
        command += ["--backend", "transformers", "--model", str(tiny_model_dir)]
        return subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL
        )

    text = run("SLM-04", "--input", str(request), "--format", "text", "--max-tokens", "800")
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("SLM-04 draft (for clinician review)")
    assert "SEVERITY" in text.stdout and "SLM-04 v1.0.0 prompt" in text.stderr
    no_fhir = run("SLM-04", "--input", str(request), "--format", "fhir")
    assert no_fhir.returncode == 4 and "SLM-04 has no FHIR form" in no_fhir.stderr
    plain_input = tmp_path / "input.json"
    plain_input.write_text(json.dumps(example("EXT-LAB")["input"]))  # just the input object
    fhir = run("lab-report", "--input", str(plain_input), "--format", "fhir", "--max-tokens", "800")
    assert fhir.returncode == 0, fhir.stderr
    assert json.loads(fhir.stdout)["resourceType"] == "Bundle"
    missing = run("SLM-04", "--input", str(tmp_path / "none.json"))
    assert missing.returncode == 4 and missing.stderr.count("\n") == 1
    assert "input file not found" in missing.stderr and "Traceback" not in missing.stderr
