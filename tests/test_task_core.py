"""The task layer's shared machinery: sources, citation and number checks, gap markers,
confidence, the runner (end to end on the tiny model) and its bounded re-asks.

A toy task declared here exercises the core without depending on any clinical role.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pydantic import BaseModel, Field

from coheara import Engine
from coheara.errors import InvalidRequestError, OutputValidationError, TaskNotFoundError
from coheara.server import create_app
from coheara.tasks import Review, Statement, TaskSpec, review_draft, run_task
from coheara.tasks.sources import Sources, normalize, numbers_in
from servers import serve
from task_support import tiny


class ToyInput(BaseModel):
    complaint: str = Field(max_length=4000)
    vitals: dict[str, float] = Field(default_factory=dict)
    medications: list[str] = Field(default_factory=list, max_length=20)
    target: int = 6


class ToyOutput(BaseModel):
    summary: list[Statement] = Field(max_length=4)
    note: str = Field("", max_length=200)


def _never_log(review: Review) -> None:
    """A check that corrects the draft in code, as SLM-04 must."""
    if review.draft.get("note") == "log":
        review.draft["note"] = "present"
        review.flag("corrected", "the model said log; present enforced", element="note")


TOY = TaskSpec(
    id="TOY-01",
    slug="toy",
    title="Toy summary",
    version="1.2.3",
    mode="text",
    system_prompt="You draft a summary for a clinician.",
    input_model=ToyInput,
    output_model=ToyOutput,
    instruction=lambda data, context: "Summarise the complaint.",
    checks=(_never_log,),
    sources_skip=("target",),
    max_tokens=400,
)

INPUT = {
    "complaint": "Chest pain for 2 hours. It radiates to the left arm.",
    "vitals": {"heart_rate": 112, "spo2": 94.5},
    "medications": ["aspirin 75 mg daily", "atorvastatin 40 mg nightly"],
    "target": 6,
}


def statement(text: str, sources: list[str], quote: str) -> dict[str, Any]:
    return {"text": text, "sources": sources, "quote": quote}


# ----- sources -------------------------------------------------------------------------------


def test_sources_number_every_value_and_skip_settings() -> None:
    sources = Sources.from_input(ToyInput.model_validate(INPUT), skip=("target",))
    assert [(i.id, i.path) for i in sources.items] == [
        ("S1", "complaint"),
        ("S2", "vitals.heart_rate"),
        ("S3", "vitals.spo2"),
        ("S4", "medications[0]"),
        ("S5", "medications[1]"),
    ]
    assert sources.by_id["S2"].text == "112.0"
    assert "[S4] medications[0]: aspirin 75 mg daily" in sources.render()
    assert sources.numbers() >= {"2", "112", "94.5", "75", "40"}


def test_long_texts_are_split_into_sentences_each_citable() -> None:
    long = " ".join(f"Sentence {n} says the patient walked {n} metres." for n in range(1, 8))
    sources = Sources.from_input({"history": long})
    assert [i.path for i in sources.items][:2] == ["history#1", "history#2"]
    assert sources.find("walked 3 metres") == ["S3"]
    assert sources.contains("S3", "  WALKED   3 metres ") and not sources.contains("S4", "3 metres")


def test_each_line_is_an_item_and_a_full_stop_before_a_digit_splits_nothing() -> None:
    report = "Sodium 139 mmol/L (ref. 135-145)\nPotassium 5.9 mmol/L (ref. 3.5-5.1) H"
    sources = Sources.from_input({"report": report})
    assert [i.text for i in sources.items] == [
        "Sodium 139 mmol/L (ref. 135-145)",
        "Potassium 5.9 mmol/L (ref. 3.5-5.1) H",
    ]
    long = report + "\nComment: Hemolysed sample. Repeat potassium advised. " + "x" * 60
    assert [i.path for i in Sources.from_input({"report": long}).items] == [
        "report#1",
        "report#2",
        "report#3",
        "report#4",
    ]


def test_numbers_are_compared_in_one_canonical_form() -> None:
    assert numbers_in("Hb 7.50 g/dL, WBC 1,200, K+ 4.") == {"7.5", "1200", "4"}
    assert normalize("It\u2019s  THE\nsame") == "it's the same"


# ----- the shared checks ---------------------------------------------------------------------


def test_a_verified_quote_passes_and_a_fabricated_one_is_flagged() -> None:
    draft = {
        "summary": [
            statement("Chest pain for two hours.", ["S1"], "chest pain for 2 hours"),
            statement("Pain goes to the jaw.", ["S1"], "radiates to the jaw"),
            statement("On aspirin.", ["S1"], "aspirin 75 mg daily"),
        ],
        "note": "",
    }
    review = review_draft(TOY, INPUT, draft)
    status = {link.element: link.status for link in review.links}
    assert status == {
        "summary[0]": "verified",
        "summary[1]": "unverified",
        "summary[2]": "verified_elsewhere",
    }
    assert review.links[2].found_in == ["S4"]
    rules = {(f.rule, f.element) for f in review.findings}
    assert ("quote_unverified", "summary[1]") in rules
    assert ("quote_in_other_source", "summary[2]") in rules
    assert [(g.kind, g.element) for g in review.gaps] == [("unsupported_statement", "summary[1]")]


def test_an_uncited_statement_is_flagged_but_a_gap_marker_is_a_gap() -> None:
    draft = {
        "summary": [
            statement("The patient is stable.", [], ""),
            statement("INSUFFICIENT DATA: troponin result", [], ""),
        ],
        "note": "",
    }
    review = review_draft(TOY, INPUT, draft)
    assert [(f.rule, f.element) for f in review.findings] == [("statement_uncited", "summary[0]")]
    assert {(g.kind, g.detail) for g in review.gaps} == {
        ("unsupported_statement", "an element cites no source"),
        ("insufficient_data", "troponin result"),
    }


def test_an_invented_number_is_flagged_as_possible_fabrication() -> None:
    draft = {
        "summary": [statement("Heart rate 112, SpO2 91%.", ["S2"], "112")],
        "note": "Aspirin 75 mg, atorvastatin 80 mg.",
    }
    review = review_draft(TOY, INPUT, draft)
    fabricated = [f for f in review.findings if f.rule == "number_not_in_input"]
    assert [(f.element, f.severity) for f in fabricated] == [
        ("summary[0].text", "error"),
        ("note", "error"),
    ]
    assert "91" in fabricated[0].message and "80" in fabricated[1].message
    assert "112" not in fabricated[0].message


def test_an_unknown_source_id_is_flagged() -> None:
    draft = {"summary": [statement("Pain.", ["S9"], "")], "note": ""}
    review = review_draft(TOY, INPUT, draft)
    assert review.links[0].status == "unknown_source"
    assert {f.rule for f in review.findings} == {"unknown_source", "quote_unverified"}


def test_gap_markers_anywhere_become_gaps_once() -> None:
    draft = {
        "summary": [],
        "note": "DOCUMENTATION GAP: laterality. EVIDENCE GAP: imaging report",
    }
    review = review_draft(TOY, INPUT, draft)
    assert [(g.kind, g.detail) for g in review.gaps] == [
        ("documentation_gap", "laterality"),
        ("evidence_gap", "imaging report"),
    ]


def test_confidence_is_the_verified_share_lowered_by_errors() -> None:
    from coheara.tasks.trace import confidence

    draft = {
        "summary": [
            statement("Chest pain.", ["S1"], "chest pain"),
            statement("Radiates to the arm.", ["S1"], "radiates to the left arm"),
            statement("Sweating.", ["S1"], "sweating"),
        ],
        "note": "",
    }
    review = review_draft(TOY, INPUT, draft)
    summary = confidence(review)["summary"]
    assert (summary.statements, summary.verified_share, summary.level) == (3, 0.667, "medium")
    draft["summary"][0]["text"] = "Chest pain, heart rate 150."
    assert confidence(review_draft(TOY, INPUT, draft))["summary"].level == "low"
    assert confidence(review)["note"].level == "unknown"


def test_task_checks_correct_the_draft_in_code() -> None:
    review = review_draft(TOY, INPUT, {"summary": [], "note": "log"})
    assert review.draft["note"] == "present"
    assert [f.rule for f in review.findings] == ["corrected"]


# ----- the runner, end to end ----------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_engine: Engine) -> Engine:
    return tiny(tiny_engine)


def test_a_task_runs_end_to_end_into_a_checked_draft(engine: Engine) -> None:
    body = {"request_id": "req-1", "clinical_event_id": "enc-9", "input": INPUT}
    response = asyncio.run(run_task(engine, body, task=TOY))
    assert (response.task_id, response.request_id, response.clinical_event_id) == (
        "TOY-01",
        "req-1",
        "enc-9",
    )
    assert response.status == "draft" and response.requires_review is True
    ToyOutput.model_validate(response.draft)
    meta = response.metadata
    assert (meta.task_version, meta.prompt_hash, meta.backend) == (
        "1.2.3",
        TOY.prompt_hash,
        "transformers",
    )
    assert meta.strategy in ("whole", "repaired", "field_by_field") and meta.prompt_tokens > 100
    assert meta.latency_target_ms == 3000 and meta.within_target == (meta.processing_ms <= 3000)
    # Every cited element was traced, whatever the random weights wrote.
    assert len(response.trace) == len(response.draft["summary"])
    assert response.validation.passed == (
        not any(f.severity == "error" for f in response.validation.findings)
    )
    assert set(response.confidence) == {"summary", "note"}


def test_a_generated_request_id_and_a_bad_input_and_an_unknown_task(engine: Engine) -> None:
    from coheara.tasks import TaskRequest

    generated = TaskRequest(input={}).request_id
    assert len(generated) == 32 and generated != TaskRequest(input={}).request_id
    with pytest.raises(InvalidRequestError, match=r"input for TOY-01 is invalid: complaint"):
        asyncio.run(run_task(engine, {"input": {"vitals": {}}}, task=TOY))
    with pytest.raises(InvalidRequestError, match="task request invalid: input"):
        asyncio.run(run_task(engine, {"inputs": {}}, task=TOY))
    with pytest.raises(TaskNotFoundError):
        asyncio.run(run_task(engine, {"input": INPUT}, task="SLM-99"))
    with pytest.raises(InvalidRequestError, match="takes no images"):
        asyncio.run(run_task(engine, {"input": INPUT, "images": ["aGk="]}, task=TOY))


def test_a_revision_re_asks_within_its_bound_and_counts_every_call(engine: Engine) -> None:
    asked: list[int] = []

    def always_again(review: Review) -> str | None:
        asked.append(len(review.draft["summary"]))
        return "Shorter, please."

    spec = TaskSpec(**{**TOY.__dict__, "revise": always_again, "max_revisions": 2})
    once = asyncio.run(run_task(engine, {"input": INPUT}, task=TOY))
    revised = asyncio.run(run_task(engine, {"input": INPUT}, task=spec))
    assert revised.metadata.revisions == 2 and len(asked) == 2
    assert revised.metadata.attempts >= 3
    assert revised.metadata.prompt_tokens > 2 * once.metadata.prompt_tokens


def test_a_check_that_breaks_the_schema_is_an_output_error(engine: Engine) -> None:
    def breaks(review: Review) -> None:
        review.draft["summary"] = "not a list"

    spec = TaskSpec(**{**TOY.__dict__, "checks": (breaks,)})
    with pytest.raises(OutputValidationError, match="no longer fits"):
        asyncio.run(run_task(engine, {"input": INPUT}, task=spec))


# ----- HTTP ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http(engine: Engine) -> Iterator[httpx.Client]:
    with serve(create_app(engine)) as url, httpx.Client(base_url=url, timeout=120) as client:
        yield client


def test_the_task_list_and_an_unknown_task_over_http(http: httpx.Client) -> None:
    from coheara.tasks import all_tasks

    listed = http.get("/v1/tasks").json()["tasks"]
    assert [t["id"] for t in listed] == list(all_tasks())
    for entry in listed:
        assert entry["input_schema"]["type"] == "object"
        assert entry["output_schema"]["type"] == "object"
    missing = http.post("/v1/tasks/SLM-99", json={"input": {}})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "task_not_found"
    assert http.get("/v1/tasks/SLM-99").status_code == 404
