"""SLM-04 (alert in context) and SLM-06 (prior authorization): the rules enforced in code,
tested on crafted drafts (adversarial ones included), and one end-to-end run of each on
the tiny random-weight model."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import pytest

from coheara.tasks import TaskRequest, get_task, review_draft
from coheara.tasks.roles.slm04_alert import AlertDraft
from coheara.tasks.roles.slm06_prior_auth import PriorAuthDraft
from task_support import assert_envelope, assert_example, example, finding, rules, tiny, unbounded

if TYPE_CHECKING:
    from coheara import Engine

ALERT = get_task("SLM-04")
PRIOR_AUTH = get_task("SLM-06")


# ----- registry, examples, schemas --------------------------------------------------------


@pytest.mark.parametrize(
    ("task_id", "slug", "file"),
    [("SLM-04", "alert", "slm-04-alert.json"), ("SLM-06", "prior-auth", "slm-06-prior-auth.json")],
)
def test_example_is_a_valid_request_for_its_task(task_id: str, slug: str, file: str) -> None:
    spec = get_task(slug)
    assert (spec.id, spec.version) == (task_id, "1.0.0")
    assert_example(spec, file)


def test_output_schemas_bound_every_string_and_list() -> None:
    for spec in (ALERT, PRIOR_AUTH):
        schema = spec.output_model.model_json_schema()
        assert unbounded(schema) == [], spec.id
    assert ALERT.latency_target_ms == 3000
    assert PRIOR_AUTH.latency_target_ms is None


# ----- SLM-04 on crafted drafts -----------------------------------------------------------


def alert_input(**alert: Any) -> dict[str, Any]:
    data = copy.deepcopy(example("SLM-04")["input"])
    data["alert"].update(alert)
    return data


def alert_draft(
    *,
    severity: str,
    recommendation: str,
    rationale_quote: str = "INR rising on current warfarin dose",
    rationale_text: str = "The INR is already rising on warfarin.",
    applies: bool = False,
) -> dict[str, Any]:
    return {
        "clinical_context": [
            {"text": "INR is 3.1.", "sources": ["S16"], "quote": "INR 3.1 on day 2"},
        ],
        "rationale": {"text": rationale_text, "sources": ["S20"], "quote": rationale_quote},
        "hard_constraint": {
            "applies": applies,
            "text": "No hard constraint is marked.",
            "sources": ["S6"],
            "quote": "no",
        },
        "severity": severity,
        "recommendation": recommendation,
    }


def test_a_critical_alert_is_never_downgraded_or_only_logged() -> None:
    review = review_draft(
        ALERT,
        alert_input(severity="critical"),
        alert_draft(severity="advisory", recommendation="log"),
    )
    assert review.draft["severity"] == "critical"
    assert review.draft["recommendation"] == "present"
    assert finding(review, "alert_downgrade_blocked").message == (
        "the model said severity 'advisory'; enforced 'critical' because the input marks "
        "the alert critical"
    )
    assert (
        "the model said recommendation 'log'; enforced 'present'"
        in finding(review, "alert_log_blocked").message
    )
    AlertDraft.model_validate(review.draft)


def test_a_critical_alert_the_model_escalates_is_left_alone() -> None:
    review = review_draft(
        ALERT,
        alert_input(severity="critical"),
        alert_draft(severity="critical", recommendation="escalate"),
    )
    assert (review.draft["severity"], review.draft["recommendation"]) == ("critical", "escalate")
    assert not {"alert_downgrade_blocked", "alert_log_blocked"} & set(rules(review))


def test_a_hard_constraint_is_restored_and_keeps_the_inputs_severity() -> None:
    data = alert_input(
        severity="urgent", hard_constraint=True, hard_constraint_reason="Site rule: never override"
    )
    review = review_draft(
        ALERT, data, alert_draft(severity="informational", recommendation="log", applies=False)
    )
    assert review.draft["hard_constraint"]["applies"] is True
    assert review.draft["severity"] == "urgent"
    assert review.draft["recommendation"] == "present"
    assert {"hard_constraint_restored", "alert_downgrade_blocked", "alert_log_blocked"} <= set(
        rules(review)
    )
    assert "hard constraint" in finding(review, "alert_downgrade_blocked").message


def test_a_hard_constraint_without_a_stated_severity_is_at_least_urgent() -> None:
    data = alert_input(severity=None, hard_constraint=True)
    review = review_draft(ALERT, data, alert_draft(severity="advisory", recommendation="present"))
    assert review.draft["severity"] == "urgent"
    assert "no severity stated" in finding(review, "alert_downgrade_blocked").message


def test_a_downgrade_on_verified_evidence_stands_and_may_be_logged() -> None:
    """The rules must allow contextualization, or they would pass by doing nothing."""
    review = review_draft(
        ALERT, alert_input(), alert_draft(severity="advisory", recommendation="log")
    )
    assert (review.draft["severity"], review.draft["recommendation"]) == ("advisory", "log")
    assert "lowered to 'advisory'" in finding(review, "alert_severity_contextualized").message
    assert "alert_log_blocked" not in rules(review)
    assert review.verified("rationale")


def test_a_downgrade_resting_on_a_fabricated_quote_is_undone_and_presented() -> None:
    draft = alert_draft(
        severity="informational",
        recommendation="log",
        rationale_quote="warfarin was stopped yesterday",
    )
    review = review_draft(ALERT, alert_input(), draft)
    assert "quote_unverified" in rules(review)
    assert review.draft["severity"] == "urgent"
    assert "not verified" in finding(review, "alert_downgrade_unsupported").message
    # The restored severity alone forbids logging it.
    assert review.draft["recommendation"] == "present"
    assert "the draft's severity is 'urgent'" in finding(review, "alert_log_blocked").message


def test_an_unverified_rationale_is_not_enough_to_only_log() -> None:
    draft = alert_draft(
        severity="advisory", recommendation="log", rationale_quote="no interaction expected"
    )
    review = review_draft(ALERT, alert_input(severity="advisory"), draft)
    assert review.draft["severity"] == "advisory"
    assert review.draft["recommendation"] == "present"
    assert finding(review, "alert_log_blocked").message.endswith(
        "because the rationale is not verified in the input"
    )


def test_an_invented_lab_value_makes_the_layer_present_the_alert() -> None:
    draft = alert_draft(
        severity="advisory",
        recommendation="log",
        rationale_text="The INR is 1.9, below range, so the interaction matters little.",
    )
    review = review_draft(ALERT, alert_input(), draft)
    assert any(
        f.rule == "number_not_in_input" and f.element == "rationale.text" and "1.9" in f.message
        for f in review.findings
    )
    assert review.draft["recommendation"] == "present"
    assert "error finding" in finding(review, "alert_log_blocked").message


def test_no_patient_context_means_present() -> None:
    data = alert_input()
    data["patient"] = {}
    draft = alert_draft(severity="urgent", recommendation="log")
    draft["clinical_context"] = []
    draft["rationale"] = {
        "text": "Interaction of warfarin with sulfonamide antibiotics.",
        "sources": ["S5"],
        "quote": "warfarin with sulfonamide antibiotics",
    }
    review = review_draft(ALERT, data, draft)
    # Urgent draft: logged is refused for that reason first.
    assert "severity is 'urgent'" in finding(review, "alert_log_blocked").message
    draft["severity"] = "advisory"
    review = review_draft(ALERT, data, copy.deepcopy(draft) | {"recommendation": "log"})
    message = finding(review, "alert_log_blocked").message
    assert "the input has no patient context" in message
    assert "no clinical context point is verified" in message


def test_a_hard_constraint_the_model_itself_finds_is_not_logged() -> None:
    draft = alert_draft(severity="advisory", recommendation="log", applies=True)
    review = review_draft(ALERT, alert_input(severity="advisory"), draft)
    assert review.draft["recommendation"] == "present"
    assert (
        "the draft itself finds that a hard constraint applies"
        in finding(review, "alert_log_blocked").message
    )


def test_a_model_upgrade_to_critical_is_not_logged() -> None:
    review = review_draft(
        ALERT, alert_input(), alert_draft(severity="critical", recommendation="log")
    )
    assert review.draft["severity"] == "critical"
    assert review.draft["recommendation"] == "present"


# ----- SLM-06 on crafted drafts -----------------------------------------------------------

PA_INPUT = example("SLM-06")["input"]


def assessment(cid: str, status: str, quote: str, sources: list[str]) -> dict[str, Any]:
    return {
        "criterion_id": cid,
        "status": status,
        "text": "See the documentation.",
        "sources": sources,
        "quote": quote,
    }


def pa_draft(criteria: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    draft: dict[str, Any] = {
        "requested_service": {
            "text": "MRI of the right knee without contrast",
            "code": "73721",
            "sources": ["S1"],
            "quote": "MRI of the right knee",
        },
        "criteria": criteria,
        "evidence_gaps": [],
        "summary": [
            {
                "text": "Ten weeks of right knee pain with locking.",
                "sources": ["S11"],
                "quote": "right knee pain for 10 weeks",
            }
        ],
        "appeal": [],
        "human_approval_required": True,
    }
    draft.update(extra)
    return draft


FULL = [
    assessment("C1", "met", "right knee pain for 10 weeks", ["S11"]),
    assessment("C2", "met", "Completed 6 weeks of supervised physical therapy", ["S18"]),
    assessment("C3", "met", "Right knee radiographs, 3 views", ["S21"]),
    assessment("C4", "met", "positive McMurray test on the right", ["S13"]),
]


def test_fully_evidenced_criteria_stay_met_and_pass() -> None:
    review = review_draft(PRIOR_AUTH, PA_INPUT, pa_draft(copy.deepcopy(FULL)))
    assert [c["status"] for c in review.draft["criteria"]] == ["met"] * 4
    assert review.draft["evidence_gaps"] == []
    assert review.gaps == []
    assert [f for f in review.findings if f.severity != "info"] == []
    PriorAuthDraft.model_validate(review.draft)


def test_a_met_criterion_with_a_fabricated_quote_becomes_a_gap() -> None:
    criteria = copy.deepcopy(FULL)
    criteria[1] = assessment("C2", "met", "failed 8 weeks of NSAIDs and injections", ["S18"])
    review = review_draft(PRIOR_AUTH, PA_INPUT, pa_draft(criteria))
    assert review.draft["criteria"][1]["status"] == "gap"
    assert finding(review, "criterion_met_unverified").message == (
        "the model said 'met' for criterion C2; enforced 'gap' because its evidence is not "
        "verified in the input"
    )
    assert any(f.rule == "quote_unverified" and f.element == "criteria[1]" for f in review.findings)
    assert review.draft["evidence_gaps"] == [
        {
            "criterion_id": "C2",
            "text": "Document evidence for: Failure of at least 6 weeks of conservative "
            "therapy, such as physical therapy or NSAIDs.",
        }
    ]
    assert any(g.kind == "evidence_gap" and g.element == "evidence_gaps[0]" for g in review.gaps)


def test_the_payers_own_criterion_text_is_not_evidence() -> None:
    criteria = copy.deepcopy(FULL)
    criteria[2] = assessment("C3", "met", "Plain radiographs of the knee", ["S27"])
    review = review_draft(PRIOR_AUTH, PA_INPUT, pa_draft(criteria))
    assert [link.status for link in review.links if link.element == "criteria[2]"] == [
        "verified"
    ]  # the quote is real, but it is the payer's words
    assert review.draft["criteria"][2]["status"] == "gap"
    assert "only outside the documentation" in finding(review, "criterion_met_unverified").message


def test_a_partial_without_evidence_becomes_a_gap_and_one_with_evidence_stays() -> None:
    criteria = copy.deepcopy(FULL)
    criteria[0] = assessment("C1", "partial", "", [])
    criteria[3] = assessment("C4", "partial", "episodes of locking", ["S12"])
    review = review_draft(PRIOR_AUTH, PA_INPUT, pa_draft(criteria))
    assert [c["status"] for c in review.draft["criteria"]] == ["gap", "met", "met", "partial"]
    assert "criterion_partial_unverified" in rules(review)
    assert [g["criterion_id"] for g in review.draft["evidence_gaps"]] == ["C1", "C4"]


def test_criteria_are_completed_ordered_and_cleaned_with_their_trace() -> None:
    criteria = [
        assessment("c4", "met", "positive McMurray test on the right", ["S13"]),  # case
        assessment("C9", "met", "right knee pain for 10 weeks", ["S11"]),  # not in input
        assessment("C1", "met", "right knee pain for 10 weeks", ["S11"]),
        assessment("C4", "gap", "", []),  # repeated
    ]
    review = review_draft(PRIOR_AUTH, PA_INPUT, pa_draft(criteria))
    final = review.draft["criteria"]
    assert [c["criterion_id"] for c in final] == ["C1", "C2", "C3", "C4"]
    assert [c["status"] for c in final] == ["met", "gap", "gap", "met"]
    assert final[1]["text"].startswith("EVIDENCE GAP")
    assert "criterion 'C9'" in finding(review, "criterion_unknown").message
    assert finding(review, "criterion_repeated").message.startswith("criterion C4")
    missing = [f.element for f in review.findings if f.rule == "criterion_missing"]
    assert missing == ["criteria[1]", "criteria[2]"]
    # The trace follows the moves: criteria[3] is now the McMurray assessment.
    by_element = {link.element: link for link in review.links}
    assert by_element["criteria[3]"].quote == "positive McMurray test on the right"
    assert by_element["criteria[0]"].quote == "right knee pain for 10 weeks"
    assert not any(
        e.startswith("criteria[") and e not in ("criteria[0]", "criteria[3]") for e in by_element
    )
    assert [g["criterion_id"] for g in review.draft["evidence_gaps"]] == ["C2", "C3"]
    PriorAuthDraft.model_validate(review.draft)


def test_evidence_gaps_for_unknown_criteria_are_removed() -> None:
    gaps = [
        {"criterion_id": "C7", "text": "Document the weather."},
        {"criterion_id": "", "text": "Document the date of injury."},
    ]
    review = review_draft(PRIOR_AUTH, PA_INPUT, pa_draft(copy.deepcopy(FULL), evidence_gaps=gaps))
    assert review.draft["evidence_gaps"] == [
        {"criterion_id": "", "text": "Document the date of injury."}
    ]
    assert "evidence_gap_unknown_criterion" in rules(review)
    assert [g.detail for g in review.gaps] == ["general: Document the date of injury."]


def test_the_service_code_is_the_inputs() -> None:
    changed = pa_draft(copy.deepcopy(FULL))
    changed["requested_service"]["code"] = "73722"
    review = review_draft(PRIOR_AUTH, PA_INPUT, changed)
    assert review.draft["requested_service"]["code"] == "73721"
    assert "enforced the input's code '73721'" in finding(review, "service_code_corrected").message

    no_code = copy.deepcopy(PA_INPUT)
    del no_code["requested_service"]["code"]
    review = review_draft(PRIOR_AUTH, no_code, pa_draft(copy.deepcopy(FULL)))
    assert review.draft["requested_service"]["code"] == ""
    assert "no code" in finding(review, "service_code_not_in_input").message


def test_a_blank_service_line_takes_the_inputs_description() -> None:
    draft = pa_draft(copy.deepcopy(FULL))
    draft["requested_service"] = {"text": " ", "code": "73721", "sources": ["S9"], "quote": "x"}
    review = review_draft(PRIOR_AUTH, PA_INPUT, draft)
    assert review.draft["requested_service"] == {
        "text": "MRI of the right knee without contrast",
        "code": "73721",
        "sources": ["S1"],
        "quote": "MRI of the right knee without contrast",
    }
    assert [link.status for link in review.links if link.element == "requested_service"] == [
        "verified"
    ]
    assert "service_text_filled" in rules(review)
    assert not any(f.element == "requested_service" for f in review.findings)


def test_an_appeal_answers_only_a_prior_denial() -> None:
    appeal = [{"text": "The patient failed 12 weeks of therapy.", "sources": [], "quote": ""}]
    review = review_draft(PRIOR_AUTH, PA_INPUT, pa_draft(copy.deepcopy(FULL), appeal=appeal))
    assert review.draft["appeal"] == []
    assert "appeal_not_requested" in rules(review)
    # The removed sentence's own findings and trace go with it.
    assert not any((f.element or "").startswith("appeal[") for f in review.findings)
    assert not any(link.element.startswith("appeal") for link in review.links)
    assert not any((g.element or "").startswith("appeal[") for g in review.gaps)

    denied = copy.deepcopy(PA_INPUT) | {"prior_denial": "Conservative therapy not documented."}
    review = review_draft(PRIOR_AUTH, denied, pa_draft(copy.deepcopy(FULL)))
    assert [(g.kind, g.element) for g in review.gaps] == [("missing_section", "appeal")]


def test_human_approval_is_always_required() -> None:
    draft = pa_draft(copy.deepcopy(FULL), human_approval_required=False)
    review = review_draft(PRIOR_AUTH, PA_INPUT, draft)
    assert review.draft["human_approval_required"] is True
    assert "human_approval_enforced" in rules(review)


def test_fhir_claim_is_a_preauthorization_draft_without_names() -> None:
    from fhir.resources.claim import Claim

    body = example("SLM-06")
    review = review_draft(PRIOR_AUTH, body["input"], pa_draft(copy.deepcopy(FULL)))
    final = PriorAuthDraft.model_validate(review.draft)
    assert PRIOR_AUTH.to_fhir is not None
    resource = PRIOR_AUTH.to_fhir(final, TaskRequest.model_validate(body))
    claim = Claim.model_validate(resource)
    assert (claim.use, claim.status) == ("preauthorization", "draft")
    assert claim.patient.identifier.value == "scope-patient-a"
    assert claim.patient.display is None
    assert claim.item[0].productOrService.coding[0].code == "73721"
    assert claim.priority.coding[0].code == "normal"
    assert len(claim.supportingInfo) == 5  # four criteria and the summary
    assert "approve" in claim.text.div


# ----- end to end on the tiny model -------------------------------------------------------


async def test_alert_end_to_end_enforces_a_critical_alert(tiny_engine: Engine) -> None:
    from coheara.tasks.runner import run_task

    body = example("SLM-04")
    body["input"]["alert"]["severity"] = "critical"
    body["max_tokens"] = 600
    response = await run_task(tiny(tiny_engine), body, task="SLM-04")
    assert_envelope(response, ALERT, body)
    assert response.trace  # the shared checks traced the cited elements
    # Whatever random weights wrote, the enforced values hold.
    assert response.draft["severity"] == "critical"
    assert response.draft["recommendation"] in ("present", "escalate")
    assert set(response.confidence) == set(AlertDraft.model_fields)


async def test_prior_auth_end_to_end_with_fhir(tiny_engine: Engine) -> None:
    from fhir.resources.claim import Claim

    from coheara.tasks.runner import run_task

    body = example("SLM-06")
    body["max_tokens"] = 800
    response = await run_task(tiny(tiny_engine), body, task="prior-auth")
    assert_envelope(response, PRIOR_AUTH, body)
    assert response.trace
    draft = response.draft
    assert [c["criterion_id"] for c in draft["criteria"]] == ["C1", "C2", "C3", "C4"]
    assert draft["requested_service"]["code"] == "73721"
    assert draft["human_approval_required"] is True
    verified = {
        link.element for link in response.trace if link.status in ("verified", "verified_elsewhere")
    }
    for index, criterion in enumerate(draft["criteria"]):
        if criterion["status"] != "gap":
            assert f"criteria[{index}]" in verified
    assert response.fhir is not None
    claim = Claim.model_validate(response.fhir)
    assert (claim.use, claim.status) == ("preauthorization", "draft")
