"""SLM-01 (clinical note) and SLM-03 (handoff): their checks on crafted drafts, adversarial
ones included, and one end-to-end run each on the tiny random-weight model."""

from __future__ import annotations

import base64
import copy
import json
from typing import TYPE_CHECKING, Any

import pytest

from coheara.errors import InvalidRequestError
from coheara.tasks import ArtifactContext, TaskRequest, get_task, review_draft, run_task
from coheara.tasks.roles import slm01_note, slm03_handoff
from coheara.tasks.roles.slm01_note import HP, SOAP, NoteDraft
from coheara.tasks.roles.slm03_handoff import HandoffDraft
from coheara.tasks.spec import Review
from task_support import assert_envelope, assert_example, example, resolve, rules, tiny, unbounded

if TYPE_CHECKING:
    from coheara import Engine

NOTE = slm01_note.TASK
HANDOFF = slm03_handoff.TASK


def st(text: str, sources: list[str] | None = None, quote: str = "") -> dict[str, Any]:
    return {"text": text, "sources": sources or [], "quote": quote}


def errors(review: Review) -> list[str]:
    return [f.rule for f in review.findings if f.severity == "error"]


# ----- registry and examples ----------------------------------------------------------


def test_registry_finds_both_tasks_by_id_and_slug() -> None:
    assert get_task("SLM-01") is NOTE and get_task("note") is NOTE
    assert get_task("slm-03") is HANDOFF and get_task("handoff") is HANDOFF
    assert (NOTE.version, HANDOFF.version) == ("1.0.0", "1.0.0")
    assert NOTE.latency_target_ms is None  # a whole note is long output: best effort
    assert HANDOFF.latency_target_ms == 3000
    for spec in (NOTE, HANDOFF):
        described = spec.describe()
        assert described["prompt_hash"] == spec.prompt_hash
        json.dumps(described)  # the listing is plain JSON


@pytest.mark.parametrize("spec", [NOTE, HANDOFF], ids=["note", "handoff"])
def test_output_schemas_bound_every_string_and_list(spec: Any) -> None:
    assert unbounded(spec.output_model.model_json_schema()) == []


@pytest.mark.parametrize(
    ("spec", "name"),
    [(NOTE, "slm-01-note.json"), (HANDOFF, "slm-03-handoff.json")],
    ids=["note", "handoff"],
)
def test_examples_are_valid_requests(spec: Any, name: str) -> None:
    assert_example(spec, name)


def test_inputs_reject_unknown_fields() -> None:
    body = example("SLM-01")["input"]
    with pytest.raises(InvalidRequestError, match="SLM-01"):
        review_draft(NOTE, {**body, "diagnosis_hint": "x"}, {"sections": []})


# ----- SLM-01 note -------------------------------------------------------------------

NOTE_INPUT = example("SLM-01")["input"]
# S4 chief complaint, S10 problems[0], S14 allergy, S15 temperature, S16 heart rate,
# S20 exam, S22/S24 orders, S25 clinician assessment, S26 clinician plan.


def good_note() -> dict[str, Any]:
    return {
        "sections": [
            {
                "name": "Subjective",
                "statements": [
                    st("Cough and fever for 3 days.", ["S4"], "Cough and fever for 3 days"),
                    st("Allergic to penicillin (rash).", ["S14"], "Penicillin (rash)"),
                ],
            },
            {
                "name": "Objective",
                "statements": [
                    st("Temperature 38.4 C, heart rate 104 bpm.", ["S15", "S16"], "38.4 C"),
                    st("Crackles at the right lung base.", ["S20"], "crackles at the right"),
                ],
            },
            {
                "name": "Assessment",
                "statements": [
                    st(
                        "Suspected right lower lobe community-acquired pneumonia.",
                        ["S25"],
                        "Suspected right lower lobe community-acquired pneumonia",
                    )
                ],
            },
            {
                "name": "Plan",
                "statements": [
                    st(
                        "Doxycycline 100 mg orally twice daily for 5 days.",
                        ["S24"],
                        "Doxycycline 100 mg orally twice daily for 5 days",
                    ),
                    st("Return if breathing worsens.", ["S26"], "Return if breathing worsens"),
                ],
            },
        ]
    }


def test_a_faithful_soap_note_passes_clean() -> None:
    review = review_draft(NOTE, NOTE_INPUT, good_note())
    assert review.findings == []
    assert review.gaps == []
    assert [s["name"] for s in review.draft["sections"]] == list(SOAP)
    assert {link.status for link in review.links} == {"verified"}
    NoteDraft.model_validate(review.draft)


def test_a_fabricated_quote_is_unverified_and_a_gap() -> None:
    draft = good_note()
    draft["sections"][1]["statements"][1] = st(
        "Crackles at both lung bases.", ["S20"], "Crackles at both lung bases"
    )
    review = review_draft(NOTE, NOTE_INPUT, draft)
    element = "sections[1].statements[1]"
    assert rules(review, element) == ["quote_unverified"]
    assert [(g.kind, g.element) for g in review.gaps] == [("unsupported_statement", element)]
    link = next(link for link in review.links if link.element == element)
    assert link.status == "unverified"


def test_an_invented_vital_is_flagged_as_fabrication() -> None:
    draft = good_note()
    draft["sections"][1]["statements"][0] = st("Temperature 39.5 C.", ["S15"], "38.4 C")
    review = review_draft(NOTE, NOTE_INPUT, draft)
    assert errors(review) == ["number_not_in_input"]
    finding = review.findings[0]
    assert finding.element == "sections[1].statements[0].text"
    assert "39.5" in finding.message


def test_missing_section_is_added_as_insufficient_and_trace_follows_the_reorder() -> None:
    draft = good_note()
    subjective, _, assessment, plan = draft["sections"]
    draft["sections"] = [subjective, plan, assessment]  # Objective left out, Plan early
    review = review_draft(NOTE, NOTE_INPUT, draft)
    sections = review.draft["sections"]
    assert [s["name"] for s in sections] == list(SOAP)
    assert sections[1]["statements"] == [st("INSUFFICIENT DATA: Objective")]
    assert [(g.kind, g.element) for g in review.gaps] == [("missing_section", "sections[1]")]
    assert sorted(rules(review)) == ["section_missing", "sections_reordered"]
    # Every link now points at the statement it verified, in its new place.
    for link in review.links:
        assert link.quote == resolve(review.draft, link.element)["quote"]
    assert {link.element for link in review.links} >= {
        "sections[3].statements[0]",
        "sections[3].statements[1]",
        "sections[2].statements[0]",
    }
    NoteDraft.model_validate(review.draft)


def test_empty_section_is_marked_insufficient() -> None:
    draft = good_note()
    draft["sections"][2]["statements"] = []
    review = review_draft(NOTE, NOTE_INPUT, draft)
    assert review.draft["sections"][2]["statements"][0]["text"].startswith("INSUFFICIENT DATA")
    assert [(g.kind, g.element) for g in review.gaps] == [("insufficient_data", "sections[2]")]
    assert rules(review) == ["section_empty"]


def test_a_callers_template_gives_exactly_its_sections_in_order() -> None:
    template = ["Reason for visit", "Findings", "Impression & Plan", "Follow-up"]
    context = ArtifactContext(template=template)
    draft = {
        "sections": [
            {"name": "findings", "statements": [st("Crackles.", ["S20"], "Crackles")]},
            {
                "name": "Social history",
                "statements": [st("Smokes 20 cigarettes a day.", ["S1"], "smokes")],
            },
            {
                "name": "REASON FOR VISIT:",
                "statements": [st("Cough and fever.", ["S4"], "Cough and fever")],
            },
            {
                "name": "Impression and plan",
                "statements": [st("Chest X-ray today.", ["S22"], "Chest X-ray")],
            },
        ]
    }
    review = review_draft(NOTE, NOTE_INPUT, draft, context=context)
    sections = review.draft["sections"]
    assert [s["name"] for s in sections] == template
    assert sections[0]["statements"][0]["text"] == "Cough and fever."
    assert sections[3]["statements"] == [st("INSUFFICIENT DATA: Follow-up")]
    unexpected = [f for f in review.findings if f.rule == "section_unexpected"]
    assert len(unexpected) == 1 and "Social history" in unexpected[0].message
    # The removed section's own problems (invented number, unverified quote) went with it.
    assert "number_not_in_input" not in rules(review)
    assert "quote_unverified" not in rules(review)
    assert sorted(rules(review)) == ["section_missing", "section_unexpected", "sections_reordered"]
    assert [(g.kind, g.element) for g in review.gaps] == [("missing_section", "sections[3]")]
    assert {link.element for link in review.links} == {
        "sections[0].statements[0]",
        "sections[1].statements[0]",
        "sections[2].statements[0]",
    }
    # The instruction names the same sections, in order.
    text = NOTE.instruction(NOTE.input_model.model_validate(NOTE_INPUT), context)
    assert [text.index(f"{n}. {name}") for n, name in enumerate(template, 1)] == sorted(
        text.index(f"{n}. {name}") for n, name in enumerate(template, 1)
    )


def test_a_repeated_section_is_merged() -> None:
    draft = good_note()
    draft["sections"].append({"name": "plan", "statements": [st("CBC ordered.", ["S23"], "CBC")]})
    review = review_draft(NOTE, NOTE_INPUT, draft)
    plan = review.draft["sections"][3]["statements"]
    assert [s["text"] for s in plan][-1] == "CBC ordered."
    assert rules(review) == ["section_repeated"]
    assert any(link.element == "sections[3].statements[2]" for link in review.links)


def test_section_names_match_loosely_but_never_ambiguously() -> None:
    draft = good_note()
    draft["sections"][3]["name"] = "Plan of care"  # contains exactly one required name
    draft["sections"].append(
        {"name": "Assessment and Plan", "statements": [st("CBC.", ["S23"], "CBC")]}
    )
    review = review_draft(NOTE, NOTE_INPUT, draft)
    assert review.draft["sections"][3]["statements"][0]["text"].startswith("Doxycycline")
    assert rules(review) == ["section_unexpected"]  # both names: neither is assumed


def test_blank_statements_are_removed_and_the_trace_follows() -> None:
    draft = good_note()
    draft["sections"][1]["statements"].insert(0, st("  ", ["S3939"]))  # says nothing
    review = review_draft(NOTE, NOTE_INPUT, draft)
    objective = review.draft["sections"][1]["statements"]
    assert [s["text"] for s in objective] == [
        "Temperature 38.4 C, heart rate 104 bpm.",
        "Crackles at the right lung base.",
    ]
    assert rules(review) == ["blank_statements_removed"]
    assert review.gaps == []
    for link in review.links:
        assert link.quote == resolve(review.draft, link.element)["quote"]


@pytest.mark.parametrize(
    "template",
    [
        [f"Part {n}" for n in range(13)],
        ["Plan", "plan:"],
        ["Subjective", " "],
        ["x" * 61],
        [],
    ],
    ids=["too-many", "duplicate", "blank", "too-long", "empty"],
)
def test_a_template_that_cannot_be_met_is_refused(template: list[str]) -> None:
    context = ArtifactContext(template=template)
    data = NOTE.input_model.model_validate(NOTE_INPUT)
    with pytest.raises(InvalidRequestError, match="SLM-01"):
        NOTE.instruction(data, context)
    with pytest.raises(InvalidRequestError):
        review_draft(NOTE, data, good_note(), context=context)


def test_free_text_template_keeps_the_format_sections() -> None:
    context = ArtifactContext(template="Keep it brief.")
    review = review_draft(NOTE, NOTE_INPUT, good_note(), context=context)
    assert [s["name"] for s in review.draft["sections"]] == list(SOAP)


def test_hp_format_uses_hp_sections_and_common_abbreviations() -> None:
    data = {**NOTE_INPUT, "format": "H&P"}
    draft = {
        "sections": [
            {"name": "HPI", "statements": [st("Cough for 3 days.", ["S5"], "productive cough")]},
            {"name": "PE", "statements": [st("Crackles.", ["S20"], "Crackles")]},
        ]
    }
    review = review_draft(NOTE, data, draft)
    names = [s["name"] for s in review.draft["sections"]]
    assert names == list(HP)
    assert review.draft["sections"][1]["statements"][0]["text"] == "Cough for 3 days."
    assert review.draft["sections"][5]["statements"][0]["text"] == "Crackles."
    assert sorted(g.element or "" for g in review.gaps if g.kind == "missing_section") == sorted(
        f"sections[{j}]" for j in (0, 2, 3, 4, 6, 7, 8)
    )
    assert "history and physical" in NOTE.instruction(NOTE.input_model.model_validate(data), None)


def test_a_plan_item_not_in_the_orders_is_an_error() -> None:
    draft = good_note()
    draft["sections"][3]["statements"] += [
        st("Refer to pulmonology.", ["S10"], "Hypertension"),  # cites a problem, not an order
        st("Azithromycin 500 mg daily."),  # no citation at all
    ]
    review = review_draft(NOTE, NOTE_INPUT, draft)
    flagged = [f.element for f in review.findings if f.rule == "plan_not_in_orders"]
    assert flagged == ["sections[3].statements[2]", "sections[3].statements[3]"]
    assert "statement_uncited" in rules(review, "sections[3].statements[3]")
    # The grounded items (an order, the clinician's plan) are not flagged.
    assert "plan_not_in_orders" not in rules(review, "sections[3].statements[0]")
    assert "plan_not_in_orders" not in rules(review, "sections[3].statements[1]")


def test_recommendation_prognosis_and_interpretation_beyond_the_input_are_flagged() -> None:
    draft = good_note()
    draft["sections"][2]["statements"] += [
        st("Pneumonia; recommend admission.", ["S25"], "community-acquired pneumonia"),
        st("Expected to recover with antibiotics.", ["S25"], "pneumonia"),
    ]
    draft["sections"][1]["statements"].append(
        st("Heart rate 104 bpm, likely due to fever.", ["S16"], "104 bpm")
    )
    draft["sections"][3]["statements"].append(
        st("Prognosis is good.", ["S26"], "Start doxycycline")
    )
    review = review_draft(NOTE, NOTE_INPUT, draft)
    by_element = {
        (f.element, f.rule, f.message.split("'")[1])
        for f in review.findings
        if f.rule.endswith(("_plan", "_input")) and f.rule != "number_not_in_input"
    }
    assert by_element == {
        ("sections[2].statements[1]", "recommendation_outside_plan", "recommend"),
        ("sections[2].statements[2]", "prognosis_beyond_input", "expected to recover"),
        ("sections[1].statements[2]", "interpretation_beyond_input", "likely"),
        ("sections[1].statements[2]", "interpretation_beyond_input", "due to"),
        ("sections[3].statements[2]", "prognosis_beyond_input", "prognosis"),
    }
    severities = {f.rule: f.severity for f in review.findings}
    assert severities["recommendation_outside_plan"] == "error"
    assert severities["prognosis_beyond_input"] == "error"
    assert severities["interpretation_beyond_input"] == "warning"


def test_words_the_input_itself_uses_are_not_flagged() -> None:
    draft = good_note()
    # "Suspected" (Assessment) and "worsens" (Plan) are the clinician's own words.
    draft["sections"][0]["statements"].append(
        st("Shortness of breath on stairs, no chest pain.", ["S6"], "shortness of breath")
    )
    review = review_draft(NOTE, NOTE_INPUT, draft)
    assert review.findings == []


def test_note_fhir_is_a_preliminary_document_reference() -> None:
    from fhir.resources.documentreference import DocumentReference

    request = TaskRequest.model_validate(example("SLM-01"))
    review = review_draft(NOTE, request.input, good_note())
    final = NoteDraft.model_validate(review.draft)
    assert NOTE.to_fhir is not None
    body = NOTE.to_fhir(final, request)
    resource = DocumentReference.model_validate(body)
    assert resource.model_dump(mode="json", exclude_none=True) == body  # round trip
    assert resource.docStatus == "preliminary"
    assert resource.status == "current"
    assert resource.type is not None and resource.type.coding is not None
    assert resource.type.coding[0].code == "11506-3"
    assert resource.subject is not None and resource.subject.identifier is not None
    assert resource.subject.identifier.value == "scope-demo-a"
    attachment = resource.content[0].attachment
    assert attachment.contentType == "text/markdown"
    text = base64.b64decode(body["content"][0]["attachment"]["data"]).decode("utf-8")
    assert "## Subjective" in text and "- Crackles at the right lung base." in text
    assert text.index("## Objective") < text.index("## Plan")


# ----- SLM-03 handoff ------------------------------------------------------------------

HANDOFF_INPUT = example("SLM-03")["input"]
# S1 summary, S2 severity "Watcher", S12 SpO2 trend, S15 furosemide change, S16 event,
# S17 pending BMP, S18 and S19 open items.


def good_handoff() -> dict[str, Any]:
    return {
        "illness_severity": st("Watcher", ["S2"], "Watcher"),
        "summary": [
            st(
                "72-year-old man, hospital day 2 for acute decompensated heart failure.",
                ["S1"],
                "hospital day 2 for acute decompensated heart failure",
            )
        ],
        "changes": [
            st(
                "Furosemide IV increased from 40 mg to 80 mg twice daily.",
                ["S15"],
                "increased from 40 mg to 80 mg twice daily",
            )
        ],
        "actions": [
            {
                **st(
                    "Recheck potassium after the evening furosemide dose.",
                    ["S18"],
                    "Recheck potassium after the evening furosemide dose",
                ),
                "owner": "night resident",
            },
            {
                **st(
                    "Follow up basic metabolic panel drawn at 17:00.",
                    ["S17"],
                    "Basic metabolic panel drawn at 17:00",
                ),
                "owner": "night resident",
            },
            {
                **st("Echocardiogram not yet scheduled.", ["S19"], "not yet scheduled"),
                "owner": "day team",
            },
        ],
        "concerns": [
            st("Dyspnea on walking at 15:30, settled with rest.", ["S16"], "settled with rest")
        ],
    }


def without_severity(draft: dict[str, Any]) -> dict[str, Any]:
    """The draft's citations once the input has no severity: S3 becomes S2, and so on."""

    def shift(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: [f"S{n - (n > 2)}" for n in (int(s[1:]) for s in v)]
                if k == "sources"
                else shift(v)
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [shift(v) for v in value]
        return value

    shifted: dict[str, Any] = shift({k: v for k, v in draft.items() if k != "illness_severity"})
    return {"illness_severity": None, **shifted}


def test_a_faithful_handoff_passes_clean() -> None:
    review = review_draft(HANDOFF, HANDOFF_INPUT, good_handoff())
    assert review.findings == []
    assert review.gaps == []
    assert review.draft == good_handoff()
    HandoffDraft.model_validate(review.draft)


def test_severity_the_input_does_not_state_is_removed() -> None:
    data = {k: v for k, v in HANDOFF_INPUT.items() if k != "illness_severity"}
    draft = without_severity(good_handoff())
    draft["illness_severity"] = st("Unstable")  # the model ranking acuity, uncited
    draft["concerns"].append(st("Patient is unstable overnight.", ["S15"], "dyspnea"))
    review = review_draft(HANDOFF, data, draft)
    assert review.draft["illness_severity"] is None
    assert rules(review, "illness_severity") == ["severity_not_in_input"]
    assert [(g.kind, g.element) for g in review.gaps if g.element == "illness_severity"] == [
        ("insufficient_data", "illness_severity")
    ]
    assert not any(link.element == "illness_severity" for link in review.links)
    assert rules(review, "concerns[1]") == ["acuity_not_in_input"]
    HandoffDraft.model_validate(review.draft)


def test_severity_the_model_changed_is_replaced_by_the_inputs_words() -> None:
    draft = good_handoff()
    draft["illness_severity"] = st("Stable", ["S2"], "Stable")  # fabricated quote
    review = review_draft(HANDOFF, HANDOFF_INPUT, draft)
    assert review.draft["illness_severity"] == st("Watcher", ["S2"], "Watcher")
    assert rules(review) == ["severity_replaced"]  # the unverified quote went with it
    assert review.gaps == []
    link = next(link for link in review.links if link.element == "illness_severity")
    assert (link.status, link.found_in) == ("verified", ["S2"])


def test_severity_the_model_left_out_is_filled_from_the_input() -> None:
    draft = good_handoff()
    draft["illness_severity"] = None
    review = review_draft(HANDOFF, HANDOFF_INPUT, draft)
    assert review.draft["illness_severity"]["text"] == "Watcher"
    assert [(f.rule, f.severity) for f in review.findings] == [("severity_from_input", "info")]


def test_sbar_without_severity_asks_for_none() -> None:
    data = {k: v for k, v in HANDOFF_INPUT.items() if k != "illness_severity"}
    data["format"] = "SBAR"
    draft = without_severity(good_handoff())
    review = review_draft(HANDOFF, data, draft)
    assert review.findings == [] and review.gaps == []
    text = HANDOFF.instruction(HANDOFF.input_model.model_validate(data), None)
    assert "SBAR" in text and "Recommendation" in text


def test_a_dropped_open_item_is_restored_with_its_source() -> None:
    draft = good_handoff()
    del draft["actions"][2]  # the echocardiogram open item (S19)
    review = review_draft(HANDOFF, HANDOFF_INPUT, draft)
    restored = review.draft["actions"][2]
    assert restored["sources"] == ["S19"]
    assert restored["owner"] == "UNASSIGNED"
    assert restored["text"].startswith("Open item from prior handoff: Transthoracic")
    assert rules(review) == ["item_restored"]
    assert [(g.kind, g.element) for g in review.gaps] == [("documentation_gap", "actions[2].owner")]
    link = next(link for link in review.links if link.element == "actions[2]")
    assert link.status == "verified"
    HandoffDraft.model_validate(review.draft)


def test_a_long_open_item_is_carried_whole() -> None:
    long_item = (
        "Family meeting requested by the daughter about goals of care and discharge "
        "destination; social work aware. Day team to confirm a time with the family "
        "before noon tomorrow and document the outcome."
    )
    data = {**HANDOFF_INPUT, "open_items": [long_item]}  # two sentences: S18, S19
    draft = good_handoff()
    del draft["actions"][2:]
    review = review_draft(HANDOFF, data, draft)
    restored = review.draft["actions"][2]
    assert restored["sources"] == ["S18", "S19"]
    assert restored["text"] == f"Open item from prior handoff: {long_item}"
    assert rules(review).count("item_restored") == 1
    # Citing either sentence carries the whole entry.
    draft["actions"][0] = {**st("Confirm meeting time.", ["S19"], "confirm a time"), "owner": "x"}
    review = review_draft(HANDOFF, data, draft)
    assert "item_restored" not in rules(review)


def test_an_item_that_cannot_be_restored_is_an_error() -> None:
    draft = good_handoff()
    draft["actions"] = [copy.deepcopy(draft["actions"][0]) for _ in range(10)]
    review = review_draft(HANDOFF, HANDOFF_INPUT, draft)
    # S17 (pending) and S19 (open item) are missing and the list is full.
    assert errors(review) == ["item_not_carried", "item_not_carried"]
    assert len(review.draft["actions"]) == 10


def test_an_action_without_owner_becomes_unassigned() -> None:
    draft = good_handoff()
    draft["actions"][0]["owner"] = "  "
    draft["actions"][1]["owner"] = "unassigned"
    review = review_draft(HANDOFF, HANDOFF_INPUT, draft)
    assert [a["owner"] for a in review.draft["actions"]] == [
        "UNASSIGNED",
        "UNASSIGNED",
        "day team",
    ]
    assert [g.element for g in review.gaps] == ["actions[0].owner", "actions[1].owner"]


def test_handoff_fabrications_are_flagged() -> None:
    draft = good_handoff()
    draft["changes"].append(st("SpO2 fell to 88% on 2 L.", ["S12"], "SpO2 88%"))
    draft["concerns"].append(st("Deteriorating overnight.", ["S99"], "worse"))
    review = review_draft(HANDOFF, HANDOFF_INPUT, draft)
    assert sorted(rules(review, "changes[1]")) == ["quote_unverified"]
    assert rules(review, "changes[1].text") == ["number_not_in_input"]
    assert (
        "88"
        in review.findings[[f.element for f in review.findings].index("changes[1].text")].message
    )
    assert sorted(rules(review, "concerns[1]")) == [
        "acuity_not_in_input",
        "quote_unverified",
        "unknown_source",
    ]


def test_blank_elements_are_removed_and_an_empty_summary_is_a_gap() -> None:
    draft = good_handoff()
    draft["summary"] = [st(" ", ["S3939"])]
    draft["changes"].insert(0, st(""))
    draft["changes"][1]["text"] = "Furosemide increased to 120 mg."  # invented dose
    review = review_draft(HANDOFF, HANDOFF_INPUT, draft)
    assert review.draft["summary"] == [st("INSUFFICIENT DATA: patient summary")]
    assert [(g.kind, g.element) for g in review.gaps] == [("missing_section", "summary[0]")]
    # The invented dose is still flagged, at the element's new place.
    assert rules(review, "changes[0].text") == ["number_not_in_input"]
    assert sorted(rules(review)) == ["blank_elements_removed", "number_not_in_input"]
    HandoffDraft.model_validate(review.draft)


def test_a_gap_marker_becomes_a_gap() -> None:
    draft = good_handoff()
    draft["concerns"] = [st("INSUFFICIENT DATA: overnight contingency plan")]
    review = review_draft(HANDOFF, HANDOFF_INPUT, draft)
    assert [(g.kind, g.detail) for g in review.gaps] == [
        ("insufficient_data", "overnight contingency plan")
    ]
    assert review.findings == []


# ----- end to end on the tiny model -------------------------------------------------------


async def test_note_end_to_end_with_fhir(tiny_engine: Engine) -> None:
    from fhir.resources.documentreference import DocumentReference

    body = {**example("SLM-01"), "max_tokens": 900}
    response = await run_task(tiny(tiny_engine), body, task="SLM-01")
    assert_envelope(response, NOTE, body)
    sections = response.draft["sections"]
    assert [s["name"] for s in sections] == list(SOAP)  # whatever the model wrote
    for j, section in enumerate(sections):
        if section["statements"][0]["text"].startswith("INSUFFICIENT DATA"):
            assert any(g.element == f"sections[{j}]" for g in response.gaps)
    assert response.metadata.within_target is None  # best effort
    assert response.fhir is not None
    resource = DocumentReference.model_validate(response.fhir)
    assert resource.docStatus == "preliminary"


async def test_handoff_end_to_end(tiny_engine: Engine) -> None:
    body = {**example("SLM-03"), "max_tokens": 900}
    response = await run_task(tiny(tiny_engine), body, task="handoff")
    assert_envelope(response, HANDOFF, body)
    draft = response.draft
    assert draft["illness_severity"] == st("Watcher", ["S2"], "Watcher")  # never the model's
    carried = {
        sid
        for link in response.trace
        if link.status in ("verified", "verified_elsewhere")
        for sid in link.found_in
    }
    assert {"S17", "S18", "S19"} <= carried  # every pending result and open item
    assert all(action["owner"].strip() for action in draft["actions"])
    assert isinstance(response.metadata.within_target, bool)
