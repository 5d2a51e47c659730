"""SLM-02 (code suggestion), EXT-LAB (lab report) and EXT-EHR (fields against a caller's
schema): every rule enforced in code, tested on crafted drafts (adversarial ones
included: made-up and non-billable codes, a fabricated quote, an invented lab value, a
value from another line, names the caller never asked for), and one end-to-end run of
each on the tiny random-weight model."""

from __future__ import annotations

import copy
import json
from typing import TYPE_CHECKING, Any

import pytest

from coheara.errors import InvalidRequestError
from coheara.tasks import TaskRequest, get_task, icd10, review_draft
from coheara.tasks.roles.ext_ehr import EhrFieldsDraft
from coheara.tasks.roles.ext_lab import LabReportDraft
from coheara.tasks.roles.slm02_codes import CodesDraft
from coheara.tasks.spec import Review
from task_support import assert_envelope, assert_example, example, rules, tiny, unbounded

if TYPE_CHECKING:
    from coheara import Engine

CODES = get_task("SLM-02")
LAB = get_task("EXT-LAB")
EHR = get_task("EXT-EHR")


def messages(review: Review, rule: str) -> list[str]:
    return [f.message for f in review.findings if f.rule == rule]


# ----- registry, examples, schemas --------------------------------------------------------


@pytest.mark.parametrize(
    ("task_id", "slug", "file"),
    [
        ("SLM-02", "codes", "slm-02-codes.json"),
        ("EXT-LAB", "lab-report", "ext-lab-lab-report.json"),
        ("EXT-EHR", "ehr-fields", "ext-ehr-ehr-fields.json"),
    ],
)
def test_example_is_a_valid_request_for_its_task(task_id: str, slug: str, file: str) -> None:
    spec = get_task(slug)
    assert (spec.id, spec.version) == (task_id, "1.0.0")
    assert_example(spec, file)


def test_output_schemas_are_bounded_and_closed_and_hide_what_the_layer_fills() -> None:
    for spec in (CODES, LAB, EHR):
        schema = spec.output_model.model_json_schema()
        assert unbounded(schema, closed=True) == [], spec.id
    text = json.dumps(
        [s.output_model.model_json_schema() for s in (CODES, LAB, EHR)]
    )  # the model never writes these: the layer does
    for name in ('"description": {', '"verified"', '"record"', '"record_valid"'):
        assert name not in text
    assert CODES.latency_target_ms == 3000
    assert LAB.latency_target_ms is None and EHR.latency_target_ms is None


# ----- the ICD-10-CM table ----------------------------------------------------------------


def test_icd10_table_lookup_normalizes_and_knows_leaves() -> None:
    assert icd10.normalize(" i5023 ") == "I50.23"
    assert icd10.normalize("E11.") == "E11"
    assert icd10.lookup("I509") == icd10.IcdEntry("I50.9", "Heart failure, unspecified", True)
    parent = icd10.lookup("I50")
    assert parent is not None and parent.billable is False
    assert icd10.lookup("E11.99") is None  # looks like a code, is not one
    assert icd10.lookup("I30-I5A") is None and icd10.lookup("9") is None  # block, chapter
    assert icd10.lookup("99214") is None
    children = icd10.billable_children("I50")
    assert len(children) == 23 and children[0].code == "I50.1"
    assert all(c.billable and c.code.startswith("I50.") for c in children)


# ----- SLM-02 on crafted drafts -------------------------------------------------------------


def codes_input(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(example("SLM-02")["input"])
    data.update(changes)
    return data


def code(
    system: str, value: str, sources: list[str], quote: str, confidence: str = "high"
) -> dict[str, Any]:
    return {
        "sources": sources,
        "quote": quote,
        "system": system,
        "code": value,
        "rationale": "Documented in the assessment.",
        "confidence": confidence,
    }


HF = code("ICD-10-CM", "i5023", ["S10"], "Acute on chronic systolic (congestive) heart failure")
DM = code("ICD-10-CM", "E11.65", ["S11"], "Type 2 diabetes mellitus with hyperglycemia")
HTN = code("ICD-10-CM", "I110", ["S12"], "Hypertension with heart failure")


def review_codes(items: list[dict[str, Any]], **changes: Any) -> Review:
    return review_draft(CODES, codes_input(**changes), {"codes": copy.deepcopy(items)})


def test_codes_are_normalized_described_by_the_table_and_pass() -> None:
    review = review_codes([HF, DM, HTN])
    assert [(c["code"], c["description"]) for c in review.draft["codes"]] == [
        ("I50.23", "Acute on chronic systolic (congestive) heart failure"),
        ("E11.65", "Type 2 diabetes mellitus with hyperglycemia"),
        ("I11.0", "Hypertensive heart disease with heart failure"),
    ]
    assert review.findings == [] and review.gaps == []
    assert [link.status for link in review.links] == ["verified"] * 3
    CodesDraft.model_validate(review.draft)


def test_a_description_the_model_wrote_is_replaced_by_the_table() -> None:
    wrong = {**HF, "description": "Chronic diastolic heart failure"}
    review = review_codes([wrong])
    assert review.draft["codes"][0]["description"] == (
        "Acute on chronic systolic (congestive) heart failure"
    )


def test_a_made_up_code_is_removed_and_flagged() -> None:
    fake = code("ICD-10-CM", "E11.99", ["S11"], "Type 2 diabetes mellitus with hyperglycemia")
    review = review_codes([HF, fake])
    assert [c["code"] for c in review.draft["codes"]] == ["I50.23"]
    assert messages(review, "code_not_found") == [
        "model's item 2 (ICD-10-CM E11.99) removed: it is not a code of the official "
        "ICD-10-CM table"
    ]
    assert [f.severity for f in review.findings] == ["warning"]


def test_a_non_billable_category_becomes_a_documentation_gap() -> None:
    parent = code("ICD-10-CM", "I50", ["S10"], "systolic (congestive) heart failure")
    review = review_codes([parent, DM])
    assert [c["code"] for c in review.draft["codes"]] == ["E11.65"]
    assert rules(review) == ["code_not_billable"]
    [gap] = review.gaps
    assert gap.kind == "documentation_gap"
    assert gap.detail.startswith(
        "I50 (Heart failure) is not billable: the note must document the detail that "
        "selects one of its 23 billable codes (e.g. I50.1 Left ventricular failure"
    )


def test_a_code_with_a_fabricated_quote_is_removed_not_passed() -> None:
    invented = code("ICD-10-CM", "R06.02", ["S1"], "severe hypoxia at rest")
    review = review_codes([invented, HF])
    assert [c["code"] for c in review.draft["codes"]] == ["I50.23"]
    assert messages(review, "code_without_evidence") == [
        "model's item 1 (ICD-10-CM R06.02) removed: its supporting quote is not found in the note"
    ]
    # The shared check's finding stays, marked removed; the trace and gaps follow the
    # draft: HF is now codes[0], and no gap speaks of a removed element.
    [unverified] = [f for f in review.findings if f.rule == "quote_unverified"]
    assert unverified.element is None and "(model's codes[0], removed)" in unverified.message
    assert [(link.element, link.status) for link in review.links] == [("codes[0]", "verified")]
    assert review.gaps == []


def test_an_uncited_or_trivially_quoted_code_is_removed() -> None:
    uncited = {**DM, "sources": [], "quote": ""}
    trivial = code("ICD-10-CM", "I10", ["S2"], "and")
    review = review_codes([uncited, trivial, HF])
    assert [c["code"] for c in review.draft["codes"]] == ["I50.23"]
    assert messages(review, "code_without_evidence") == [
        "model's item 1 (ICD-10-CM E11.65) removed: its supporting quote is not found in the note",
        "model's item 2 (ICD-10-CM I10) removed: its supporting quote is too short to be evidence",
    ]


def test_duplicates_merge_and_rank_follows_confidence() -> None:
    elsewhere = {**DM, "sources": ["S2"]}  # the quote is in S11, not S2
    again = code("ICD-10-CM", "I50.23", ["S2"], "orthopnea", confidence="medium")
    low = code("ICD-10-CM", "R60.0", ["S5"], "Pitting edema of both ankles", confidence="low")
    review = review_codes([low, elsewhere, HF, again])
    draft = review.draft["codes"]
    assert [(c["code"], c["confidence"]) for c in draft] == [
        ("I50.23", "high"),
        ("E11.65", "medium"),  # capped: its evidence is in another item
        ("R60.0", "low"),
    ]
    assert draft[0]["sources"] == ["S10", "S2"]
    assert sorted(rules(review)) == [
        "code_confidence_capped",
        "code_duplicate_merged",
        "quote_in_other_source",
    ]
    assert {f.element for f in review.findings} == {"codes[0]", "codes[1]"}
    assert sorted((link.element, link.status) for link in review.links) == [
        ("codes[0]", "verified"),
        ("codes[0]", "verified"),
        ("codes[1]", "verified_elsewhere"),
        ("codes[2]", "verified"),
    ]


def test_max_codes_keeps_the_best_ranked() -> None:
    review = review_codes([HF, DM, HTN], max_codes=2)
    assert [c["code"] for c in review.draft["codes"]] == ["I50.23", "E11.65"]
    assert messages(review, "codes_over_limit") == [
        "model's item 3 (ICD-10-CM I11.0) removed: more than max_codes=2 suggestions"
    ]
    assert [link.element for link in review.links] == ["codes[0]", "codes[1]"]


def test_cpt_and_hcpcs_are_checked_for_format_and_only_where_asked() -> None:
    echo = code("CPT", "93306", ["S7"], "Echocardiogram today")
    cat2 = code("CPT", "3046f", ["S9"], "Hemoglobin A1c 8.9%")
    short = code("CPT", "9330", ["S7"], "Echocardiogram today")
    furosemide = code("HCPCS", "J1940", ["S13"], "IV furosemide 40 mg")
    bad_letter = code("HCPCS", "W1940", ["S13"], "IV furosemide 40 mg")
    items = [echo, cat2, short, furosemide, bad_letter]
    review = review_codes(items, code_systems=["ICD-10-CM", "CPT", "HCPCS"])
    assert [(c["system"], c["code"], c["description"]) for c in review.draft["codes"]] == [
        ("CPT", "93306", ""),
        ("CPT", "3046F", ""),
        ("HCPCS", "J1940", ""),
    ]
    assert [m.split(": ", 1)[1] for m in messages(review, "code_format_invalid")] == [
        "a CPT code is five digits, or four digits and F, T or U",
        "a HCPCS Level II code is a letter A-V and four digits",
    ]
    only_icd = review_codes([echo, HF])
    assert [c["code"] for c in only_icd.draft["codes"]] == ["I50.23"]
    assert messages(only_icd, "code_system_not_requested") == [
        "model's item 1 (CPT 93306) removed: CPT codes were not asked for"
    ]


def test_an_invented_number_in_a_rationale_is_an_error_and_no_codes_is_a_gap() -> None:
    invented = {**DM, "rationale": "HbA1c of 9.4% shows hyperglycemia."}
    review = review_codes([invented])
    assert [(f.rule, f.severity) for f in review.findings] == [("number_not_in_input", "error")]
    empty = review_codes([])
    assert [(g.kind, g.detail) for g in empty.gaps] == [
        ("insufficient_data", "no code could be suggested with evidence verified in the note")
    ]


def test_codes_fhir_is_a_bundle_of_provisional_icd10cm_conditions() -> None:
    from fhir.resources.bundle import Bundle
    from fhir.resources.condition import Condition

    echo = code("CPT", "93306", ["S7"], "Echocardiogram today")
    review = review_codes([HF, echo, DM], code_systems=["ICD-10-CM", "CPT"])
    request = TaskRequest.model_validate(example("SLM-02"))
    fhir = CODES.to_fhir(CodesDraft.model_validate(review.draft), request)  # type: ignore[misc]
    bundle = Bundle.model_validate(fhir)
    assert bundle.type == "collection"
    conditions = [Condition.model_validate(e.resource.model_dump()) for e in bundle.entry]
    assert [c.code.coding[0].code for c in conditions] == ["I50.23", "E11.65"]  # no CPT
    first = conditions[0]
    assert first.code.coding[0].system == "http://hl7.org/fhir/sid/icd-10-cm"
    assert first.code.coding[0].display == "Acute on chronic systolic (congestive) heart failure"
    assert first.verificationStatus.coding[0].code == "provisional"
    assert first.subject.identifier.value == "scope-demo-c"
    assert first.encounter.identifier.value == "enc-2025-000932"
    assert len({e.fullUrl for e in bundle.entry}) == 2


# ----- EXT-LAB on crafted drafts ------------------------------------------------------------


def lab_input() -> dict[str, Any]:
    return copy.deepcopy(example("EXT-LAB")["input"])


def row(
    source: str,
    quote: str,
    test: str,
    value: str,
    unit: str = "",
    reference_range: str = "",
    flag: str = "",
    date: str = "2025-03-14",
) -> dict[str, Any]:
    return {
        "sources": [source],
        "quote": quote,
        "test": test,
        "value": value,
        "unit": unit,
        "reference_range": reference_range,
        "flag": flag,
        "date": date,
    }


K = row(
    "S7", "Potassium | 5.9 | mmol/L | 3.5-5.1 | H", "Potassium", "5.9", "mmol/L", "3.5-5.1", "high"
)
WCC = row(
    "S12", "White cell count | 7.4 | x10^9/L", "White cell count", "7.4", "x10^9/L", "4.0-11.0"
)
TROP = row("S14", "Troponin I, high sensitivity | <5", "Troponin I", "<5", "ng/L", "<34", "normal")


def review_lab(rows: list[dict[str, Any]]) -> Review:
    return review_draft(LAB, lab_input(), {"results": copy.deepcopy(rows)})


def test_results_found_in_their_lines_are_verified() -> None:
    review = review_lab([K, WCC, TROP])
    assert [r["verified"] for r in review.draft["results"]] == [True, True, True]
    assert review.findings == [] and review.gaps == []
    LabReportDraft.model_validate(review.draft)


def test_an_invented_lab_value_is_flagged_and_unverified() -> None:
    creatinine = row("S8", "Creatinine | 168", "Creatinine", "186", "umol/L", "62-106", "high")
    review = review_lab([creatinine])
    assert review.draft["results"][0]["verified"] is False
    assert [(f.rule, f.severity, f.element) for f in review.findings] == [
        ("number_not_in_input", "error", "results[0].value"),
        ("lab_value_not_in_source", "warning", "results[0].value"),
    ]


def test_a_value_from_another_line_does_not_verify_the_result() -> None:
    # 168 is in the report, on the creatinine line: not the sodium result.
    sodium = row("S6", "Sodium | 138", "Sodium", "168", "mmol/L", "135-145")
    review = review_lab([sodium])
    assert review.draft["results"][0]["verified"] is False
    assert rules(review) == ["lab_value_not_in_source"]  # no number error: 168 is in the input


def test_a_wrong_unit_or_range_unverifies_the_result() -> None:
    hb = row("S11", "Hemoglobin | 102 | g/L", "Hemoglobin", "102", "g/dL", "130-170", "low")
    platelets = row("S13", "Platelets | 245", "Platelets", "245", "x10^9/L", "150-450")
    review = review_lab([hb, platelets])
    assert [r["verified"] for r in review.draft["results"]] == [False, False]
    assert sorted(rules(review)) == [
        "lab_reference_range_not_in_source",
        "lab_unit_not_in_source",
        "number_not_in_input",
    ]


def test_a_fabricated_quote_unverifies_the_result() -> None:
    fake = {**K, "quote": "Potassium | 6.9 | mmol/L"}
    review = review_lab([fake])
    assert review.draft["results"][0]["verified"] is False
    assert "lab_citation_unverified" in rules(review)
    assert "quote_unverified" in rules(review)


def test_flags_are_corrected_against_the_reference_range() -> None:
    glucose = row(
        "S10", "Glucose, fasting | 6.1", "Glucose, fasting", "6.1", "mmol/L", "3.9-5.5", "normal"
    )
    egfr = row("S9", "eGFR | 38", "eGFR", "38", "mL/min/1.73m2", ">60", "high")
    sodium = row("S6", "Sodium | 138", "Sodium", "138", "mmol/L", "135-145", "abnormal")
    critical = {**K, "flag": "critical_high"}
    review = review_lab([glucose, egfr, sodium, critical, TROP])
    assert [r["flag"] for r in review.draft["results"]] == [
        "high",
        "low",
        "normal",
        "critical_high",  # a critical flag in the range's direction stays
        "normal",  # '<5' against '<34': not compared, the model's flag stays
    ]
    assert messages(review, "lab_flag_corrected") == [
        "the model flagged 'normal' a value that its reference range puts at 'high'; set 'high'",
        "the model flagged 'high' a value that its reference range puts at 'low'; set 'low'",
        "the model flagged 'abnormal' a value inside its reference range; set 'normal'",
    ]


def test_the_same_result_twice_is_merged() -> None:
    review = review_lab([K, WCC, {**K, "sources": ["S7", "S16"]}])
    assert [r["test"] for r in review.draft["results"]] == ["Potassium", "White cell count"]
    assert review.draft["results"][0]["sources"] == ["S7", "S16"]
    assert rules(review) == ["lab_duplicate_merged"]
    assert [link.element for link in review.links] == ["results[0]", "results[1]", "results[0]"]


def test_lab_fhir_is_a_bundle_of_preliminary_observations_of_verified_results() -> None:
    from fhir.resources.bundle import Bundle
    from fhir.resources.observation import Observation

    text_value = row("S15", "Specimen not hemolyzed", "Hemolysis", "not hemolyzed", date="")
    invented = row("S8", "Creatinine | 168", "Creatinine", "186", "umol/L")
    review = review_lab([K, TROP, text_value, invented])
    request = TaskRequest.model_validate(example("EXT-LAB"))
    fhir = LAB.to_fhir(LabReportDraft.model_validate(review.draft), request)  # type: ignore[misc]
    bundle = Bundle.model_validate(fhir)
    observations = [Observation.model_validate(e.resource.model_dump()) for e in bundle.entry]
    assert [o.code.text for o in observations] == ["Potassium", "Troponin I", "Hemolysis"]
    potassium, troponin, hemolysis = observations
    assert potassium.status == "preliminary"
    assert (float(potassium.valueQuantity.value), potassium.valueQuantity.unit) == (5.9, "mmol/L")
    assert float(potassium.referenceRange[0].low.value) == 3.5
    assert float(potassium.referenceRange[0].high.value) == 5.1
    assert potassium.interpretation[0].coding[0].code == "H"
    assert str(potassium.effectiveDateTime) == "2025-03-14"
    assert troponin.valueQuantity.comparator == "<"
    assert float(troponin.referenceRange[0].high.value) == 34
    assert hemolysis.valueString == "not hemolyzed"
    assert str(hemolysis.effectiveDateTime) == "2025-03-14"  # the input's `collected`


# ----- EXT-EHR on crafted drafts ------------------------------------------------------------


def ehr_input(schema: dict[str, Any] | None = None) -> dict[str, Any]:
    data = copy.deepcopy(example("EXT-EHR")["input"])
    if schema is not None:
        data["field_schema"] = schema
    return data


def entry(name: str, value: str, source: str, quote: str) -> dict[str, Any]:
    return {"sources": [source], "quote": quote, "name": name, "value": value}


GOOD = [
    entry("admission_date", "2025-02-03", "S2", "admitted on 2025-02-03"),
    entry("Stroke Type", "Ischemic", "S2", "acute ischemic stroke"),
    entry("nihss.arrival", "14", "S4", "NIHSS on arrival was 14"),
    entry("nihss.discharge", "4", "S9", "NIHSS at discharge was 4"),
    entry("thrombolysis_given", "yes", "S5", "She received intravenous alteplase"),
    entry("smoking_status", "former", "S7", "former smoker"),
    entry("new_diagnoses", "Atrial fibrillation", "S8", "Atrial fibrillation was newly diagnosed"),
    entry("discharge_destination", "inpatient rehabilitation", "S10", "inpatient rehabilitation"),
]


def review_ehr(entries: list[dict[str, Any]], schema: dict[str, Any] | None = None) -> Review:
    return review_draft(EHR, ehr_input(schema), {"fields": copy.deepcopy(entries)})


def test_the_callers_record_is_assembled_typed_and_valid() -> None:
    review = review_ehr(GOOD)
    assert review.draft["record"] == {
        "admission_date": "2025-02-03",
        "stroke_type": "ischemic",
        "nihss": {"arrival": 14, "discharge": 4},
        "thrombolysis_given": True,
        "smoking_status": "former",
        "new_diagnoses": ["Atrial fibrillation"],
        "discharge_destination": "inpatient rehabilitation",
    }
    assert review.draft["record_valid"] is True
    assert review.draft["fields"][1]["name"] == "stroke_type"  # renamed to the schema's
    assert review.findings == [] and review.gaps == []
    EhrFieldsDraft.model_validate(review.draft)


def test_names_outside_the_schema_are_removed() -> None:
    extra = entry("blood_pressure", "138/84", "S2", "74-year-old woman")
    review = review_ehr([extra, *GOOD])
    assert [f["name"] for f in review.draft["fields"]][:2] == ["admission_date", "stroke_type"]
    assert messages(review, "field_not_in_schema") == [
        "model's fields[0] removed: its name is not a field of the caller's schema"
    ]
    assert "blood_pressure" not in review.draft["record"]
    assert [link.element for link in review.links] == [f"fields[{i}]" for i in range(8)]


def test_an_invented_number_never_enters_the_record() -> None:
    wrong = entry("nihss.discharge", "12", "S9", "NIHSS at discharge was 4")
    other_line = entry("nihss.arrival", "4", "S4", "NIHSS on arrival was 14")
    review = review_ehr([*GOOD[:2], other_line, wrong, *GOOD[4:]])
    assert "nihss" not in review.draft["record"]
    assert [(f.rule, f.severity, f.element) for f in review.findings] == [
        ("number_not_in_input", "error", "fields[3].value"),
        ("field_not_accepted", "warning", "fields[2]"),
        ("field_not_accepted", "warning", "fields[3]"),
        ("record_incomplete", "warning", "record"),
    ]
    assert messages(review, "field_not_accepted") == [
        "nihss.arrival left out of the record: the number is not written in the cited item",
        "nihss.discharge left out of the record: the number is not written in the cited item",
    ]
    assert [(g.kind, g.detail) for g in review.gaps] == [
        ("insufficient_data", "nihss.arrival (required) was not found with verified evidence")
    ]
    assert review.draft["record_valid"] is False


def test_a_fabricated_quote_or_a_value_outside_the_options_stays_out() -> None:
    fabricated = entry("thrombolysis_given", "yes", "S5", "tenecteplase was given")
    off_list = entry("smoking_status", "ex-smoker", "S7", "former smoker")
    not_boolean = entry("thrombectomy_performed", "deferred", "S6", "amenable to thrombectomy")
    review = review_ehr([*GOOD[:4], fabricated, off_list, not_boolean])
    record = review.draft["record"]
    assert "thrombolysis_given" not in record and "smoking_status" not in record
    assert "thrombectomy_performed" not in record
    assert messages(review, "field_not_accepted") == [
        "thrombolysis_given left out of the record: its citation is not verified",
        "smoking_status left out of the record: the value is not a string among the "
        "field's options",
        "thrombectomy_performed left out of the record: the value is not a boolean",
    ]
    assert [f["name"] for f in review.draft["fields"]][4:] == [
        "thrombolysis_given",
        "smoking_status",
        "thrombectomy_performed",
    ]  # kept in the draft, flagged, for the reviewer


def test_a_field_given_twice_keeps_its_accepted_entry_and_lists_dedupe() -> None:
    unverified = entry("discharge_date", "2025-02-10", "S10", "discharged on 2025-02-10")
    verified = entry("discharge_date", "2025-02-09", "S10", "discharged on 2025-02-09")
    af = GOOD[6]
    review = review_ehr([*GOOD, unverified, verified, af])
    assert review.draft["record"]["discharge_date"] == "2025-02-09"
    assert review.draft["record"]["new_diagnoses"] == ["Atrial fibrillation"]
    assert messages(review, "field_repeated") == [
        "model's fields[8] removed: discharge_date is not a list and was given more than once "
        "(one entry kept)"
    ]
    names = [f["name"] for f in review.draft["fields"]]
    assert names.count("discharge_date") == 1 and names.count("new_diagnoses") == 2


def test_insufficient_data_entries_become_gaps_and_missing_required_fields_too() -> None:
    marker = {
        "sources": [],
        "quote": "",
        "name": "thrombolysis_given",
        "value": "INSUFFICIENT DATA: thrombolysis not documented",
    }
    without_stroke_type = [
        e for e in GOOD if e["name"] not in ("Stroke Type", "thrombolysis_given")
    ]
    review = review_ehr([marker, *without_stroke_type])
    assert [(g.kind, g.element, g.detail) for g in review.gaps] == [
        (
            "insufficient_data",
            "record.stroke_type",
            "stroke_type (required) was not found with verified evidence",
        ),
        (
            "insufficient_data",
            "record.thrombolysis_given",
            "thrombolysis_given: INSUFFICIENT DATA: thrombolysis not documented",
        ),
    ]
    assert "thrombolysis_given" not in [f["name"] for f in review.draft["fields"]]
    assert rules(review) == ["record_incomplete"]  # the marker entry is not 'uncited'
    assert messages(review, "record_incomplete") == [
        "required fields missing from the record: stroke_type, thrombolysis_given"
    ]
    assert review.draft["record_valid"] is False


def test_a_value_breaking_the_fields_own_rule_stays_out() -> None:
    schema = {
        "type": "object",
        "properties": {"nihss_arrival": {"type": "integer", "maximum": 10}},
    }
    review = review_ehr([entry("nihss_arrival", "14", "S4", "NIHSS on arrival was 14")], schema)
    assert review.draft["record"] == {}
    assert messages(review, "field_not_accepted") == [
        "nihss_arrival left out of the record: the value breaks the field's 'maximum' rule"
    ]
    assert review.draft["record_valid"] is True  # nothing required: an empty record fits


def test_caller_schema_fields_nullable_nested_and_required() -> None:
    from coheara.tasks.roles.ext_ehr import schema_fields

    schema = {
        "type": "object",
        "properties": {
            "a": {"anyOf": [{"type": "integer"}, {"type": "null"}], "minimum": 0},
            "b": {"type": ["string", "null"]},
            "c": {"enum": ["x", "y"]},
            "n": {
                "type": "object",
                "properties": {
                    "x": {"type": "number"},
                    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
                },
                "required": ["x"],
            },
        },
        "required": ["a"],
    }
    fields = schema_fields(schema)
    assert [(f.name, f.kind, f.array, f.required) for f in fields] == [
        ("a", "integer", False, True),
        ("b", "string", False, False),
        ("c", "string", False, False),
        ("n.x", "number", False, False),  # required inside an optional object
        ("n.tags", "string", True, False),
    ]
    assert fields[0].schema == {"type": "integer", "minimum": 0}
    assert fields[4].max_items == 3


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        ({"type": "string"}, "must be an object with properties"),
        (
            {"type": "object", "properties": {"a": {"$ref": "#/$defs/x"}}, "$defs": {"x": {}}},
            "$ref",
        ),
        (
            {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "object"}}}},
            "only lists of strings, numbers or booleans",
        ),
        ({"type": "object", "properties": {"a": {"type": "strnig"}}}, "not a valid JSON Schema"),
        (
            {"type": "object", "properties": {f"f{i}": {"type": "string"} for i in range(61)}},
            "61 fields: at most 60",
        ),
    ],
)
def test_unsupported_caller_schemas_are_refused_clearly(
    schema: dict[str, Any], problem: str
) -> None:
    from coheara.tasks.runner import validate_input

    with pytest.raises(InvalidRequestError, match="field_schema") as raised:
        validate_input(EHR, ehr_input(schema))
    assert problem in str(raised.value)


# ----- end to end on the tiny model -------------------------------------------------------


async def test_codes_end_to_end_with_fhir(tiny_engine: Engine) -> None:
    from fhir.resources.bundle import Bundle

    from coheara.tasks.runner import run_task

    body = example("SLM-02")
    body["max_tokens"] = 600
    response = await run_task(tiny(tiny_engine), body, task="SLM-02")
    assert_envelope(response, CODES, body)
    # Whatever random weights wrote, what is left are real, billable, evidenced codes.
    for item in response.draft["codes"]:
        entry = icd10.lookup(item["code"])
        assert entry is not None and entry.billable and entry.description == item["description"]
    assert Bundle.model_validate(response.fhir).type == "collection"


async def test_lab_report_end_to_end_with_fhir(tiny_engine: Engine) -> None:
    from fhir.resources.bundle import Bundle

    from coheara.tasks.runner import run_task

    body = example("EXT-LAB")
    body["max_tokens"] = 600
    response = await run_task(tiny(tiny_engine), body, task="lab-report")
    assert_envelope(response, LAB, body)
    verified = {link.element for link in response.trace if link.status == "verified"}
    for index, result in enumerate(response.draft["results"]):
        if result["verified"]:
            assert f"results[{index}]" in verified
    bundle = Bundle.model_validate(response.fhir)
    assert len(bundle.entry or []) == sum(r["verified"] for r in response.draft["results"])


async def test_ehr_fields_end_to_end(tiny_engine: Engine) -> None:
    import jsonschema

    from coheara.tasks.runner import run_task

    body = example("EXT-EHR")
    body["max_tokens"] = 600
    response = await run_task(tiny(tiny_engine), body, task="EXT-EHR")
    assert_envelope(response, EHR, body)
    schema = body["input"]["field_schema"]
    names = {
        "admission_date",
        "discharge_date",
        "stroke_type",
        "nihss.arrival",
        "nihss.discharge",
        "thrombolysis_given",
        "thrombectomy_performed",
        "smoking_status",
        "new_diagnoses",
        "discharge_destination",
    }
    assert {f["name"] for f in response.draft["fields"]} <= names
    record = response.draft["record"]
    valid = jsonschema.Draft202012Validator(schema).is_valid(record)
    assert response.draft["record_valid"] is valid
    # Required fields the random model did not give are gaps.
    required = {"admission_date", "stroke_type", "nihss.arrival", "thrombolysis_given"}
    missing = {name for name in required if _get(record, name) is None}
    gap_elements = {g.element for g in response.gaps if g.kind == "insufficient_data"}
    assert {f"record.{name}" for name in missing} <= gap_elements


def _get(record: dict[str, Any], name: str) -> Any:
    value: Any = record
    for part in name.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value
