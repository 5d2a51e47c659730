"""The evaluation metrics (`coheara.evaluation.quality`, `compliance`, `aggregate`) against
values worked out by hand in the comments. Responses are built through the real
`TaskResponse` model, so that their shape is the one a task returns; all data synthetic."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import pytest

from coheara.errors import ConfigurationError
from coheara.evaluation import aggregate, compliance, quality
from coheara.evaluation.gold import AlertExpectation, Expected, GoldCase
from coheara.tasks.envelope import (
    Finding,
    Gap,
    TaskMetadata,
    TaskResponse,
    TraceLink,
    Validation,
)

# ----- helpers -------------------------------------------------------------------------------


def gold(task: str, *, request: dict[str, Any] | None = None, **expected: Any) -> GoldCase:
    return GoldCase(
        id=f"{task.lower()}-001",
        task=task,
        request=request or {"input": {}},
        expected=Expected(**expected),
    )


def response(
    draft: dict[str, Any],
    *,
    task: str = "SLM-01",
    trace: Sequence[tuple[str, str]] = (),
    rules: Sequence[str] = (),
    gaps: Sequence[str] = (),
    passed: bool = True,
    processing_ms: float = 1000.0,
    ttft_ms: float | None = None,
    within: bool | None = None,
) -> dict[str, Any]:
    """A TaskResponse as the runner records it (`model_dump(mode="json")`)."""
    body = TaskResponse(
        task_id=task,
        request_id="eval-test",
        draft=draft,
        gaps=[Gap(kind=kind, detail="synthetic") for kind in gaps],  # type: ignore[arg-type]
        trace=[
            TraceLink(element=element, sources=["S1"], status=status)  # type: ignore[arg-type]
            for element, status in trace
        ],
        validation=Validation(
            passed=passed,
            findings=[Finding(rule=r, severity="warning", message="synthetic") for r in rules],
        ),
        metadata=TaskMetadata(
            task_version="1.0.0",
            prompt_hash="0" * 16,
            model="fake",
            backend="fake",
            strategy="whole",
            processing_ms=processing_ms,
            time_to_first_token_ms=ttft_ms,
            latency_target_ms=2000 if within is not None else None,
            within_target=within,
            prompt_tokens=1,
            output_tokens=1,
            attempts=1,
        ),
    )
    return body.model_dump(mode="json")


def stmt(text: str, quote: str = "") -> dict[str, Any]:
    return {"text": text, "sources": ["S1"] if quote else [], "quote": quote}


def code(value: str, system: str = "ICD-10-CM") -> dict[str, Any]:
    return {
        "system": system,
        "code": value,
        "rationale": "synthetic",
        "confidence": "high",
        "sources": ["S1"],
        "quote": "synthetic",
    }


def lab(test: str, value: str, unit: str = "") -> dict[str, Any]:
    return {"test": test, "value": value, "unit": unit, "sources": ["S1"], "quote": value}


def record(
    task: str,
    q: dict[str, Any],
    c: dict[str, Any] | None = None,
    *,
    status: str = "ok",
    variant: str = "base",
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "case": "x",
        "task": task,
        "variant": variant,
        "tags": tags or {},
        "status": status,
        "quality": q,
        "compliance": c or {},
    }


def codes_quality(gold_codes: list[str], predicted: list[str]) -> dict[str, Any]:
    case = gold("SLM-02", codes=gold_codes)
    return quality.score(case, response({"codes": [code(c) for c in predicted]}, task="SLM-02"))


# ----- codes ---------------------------------------------------------------------------------


def test_codes_precision_recall_f1_with_dots_optional() -> None:
    # gold {I50.23, E11.65, I10}, predicted {E11.65 (written E1165), I10, J44.1}:
    # tp 2 (E11.65, I10), fp 1 (J44.1), fn 1 (I50.23): P = R = F1 = 2/3.
    scored = codes_quality(["I50.23", "E11.65", "I10"], ["e1165", "I10", "J44.1"])
    values = scored["values"]
    assert scored["counts"]["codes"] == [2, 1, 1]
    assert values["codes_precision"] == pytest.approx(2 / 3)
    assert values["codes_recall"] == pytest.approx(2 / 3)
    assert values["codes_f1"] == pytest.approx(2 / 3)
    # All three are codes of the table and leaves: valid 3/3, billable 3/3.
    assert values["codes_valid_rate"] == 1.0
    assert values["codes_billable_rate"] == 1.0


def test_code_validity_and_billability_rates() -> None:
    # I50.2 exists but has children (not billable); I10 is a billable leaf; I50.99 is no
    # code; the CPT code is not an ICD-10-CM code and is left out of both rates.
    # valid 2/3, billable 1/3. Against gold {I10}: tp 1, fp 3 (I50.2, I50.99, 99213), fn 0.
    case = gold("SLM-02", codes=["I10"])
    draft = {"codes": [code("I50.2"), code("I10"), code("I50.99"), code("99213", "CPT")]}
    scored = quality.score(case, response(draft, task="SLM-02"))
    assert scored["values"]["codes_valid_rate"] == pytest.approx(2 / 3)
    assert scored["values"]["codes_billable_rate"] == pytest.approx(1 / 3)
    assert scored["counts"]["codes"] == [1, 3, 0]
    assert scored["values"]["codes_precision"] == pytest.approx(1 / 4)
    assert scored["values"]["codes_recall"] == 1.0


def test_micro_f1_from_summed_counts_differs_from_mean_of_case_f1() -> None:
    # Case 1: gold {A, B, C}, predicted {B, C, D}: tp 2, fp 1, fn 1, F1 2/3.
    # Case 2: gold {X}, predicted nothing: tp 0, fp 0, fn 1, F1 0.
    # Mean of per-case F1 = (2/3 + 0) / 2 = 1/3.
    # Micro: tp 2, fp 1, fn 2: P = 2/3, R = 2/4, F1 = 2*2 / (2*2 + 1 + 2) = 4/7.
    one = codes_quality(["I50.23", "E11.65", "I10"], ["E11.65", "I10", "J44.1"])
    two = codes_quality(["J44.1"], [])
    assert two["values"]["codes_f1"] == 0.0
    assert two["values"]["codes_valid_rate"] is None  # nothing predicted: no rate
    result = aggregate.aggregate([record("SLM-02", one), record("SLM-02", two)])
    assert result["codes_f1"] == pytest.approx(1 / 3)
    assert result["codes_micro_precision"] == pytest.approx(2 / 3)
    assert result["codes_micro_recall"] == pytest.approx(1 / 2)
    assert result["codes_micro_f1"] == pytest.approx(4 / 7)


def test_no_codes_expected_and_none_given_is_perfect() -> None:
    scored = codes_quality([], [])
    assert scored["counts"]["codes"] == [0, 0, 0]
    assert scored["values"]["codes_f1"] == 1.0
    # A code where none is expected: tp 0, fp 1: F1 0.
    assert codes_quality([], ["I10"])["values"]["codes_f1"] == 0.0


# ----- extraction ----------------------------------------------------------------------------


def test_lab_fields_numeric_units_comparators_and_counts() -> None:
    # Gold: potassium, sodium, troponin, glucose, creatinine.
    # potassium '4.1 mmol/L' vs 4.1 mmol/L (name in capitals): exact 1, normalized 1, tp.
    # sodium '140' vs 138: wrong value: fp and fn.
    # troponin '<0.01 ng/mL' vs '0.01': the comparator is kept, so wrong: fp and fn.
    # glucose '7.20 mmol/L' vs '7.2' 'mmol/l': exact 0, normalized 1, tp.
    # creatinine: not predicted: fn. Chloride: predicted, not in gold: fp.
    # tp 2, fp 3, fn 3: P = 2/5, R = 2/5, F1 = 4 / (4 + 3 + 3) = 0.4.
    # exact: 1 of 5 = 0.2; normalized: 2 of 5 = 0.4.
    case = gold(
        "EXT-LAB",
        fields={
            "Potassium": "4.1 mmol/L",
            "Sodium": "140 mmol/L",
            "Troponin I": "<0.01 ng/mL",
            "Glucose": "7.20 mmol/L",
            "Creatinine": "88 umol/L",
        },
    )
    draft = {
        "results": [
            lab("POTASSIUM", "4.1", "mmol/L"),
            lab("Sodium", "138", "mmol/L"),
            lab("Troponin I", "0.01", "ng/mL"),
            lab("glucose", "7.2", "mmol/l"),
            lab("Chloride", "101", "mmol/L"),
        ]
    }
    scored = quality.score(case, response(draft, task="EXT-LAB"))
    assert scored["counts"]["fields"] == [2, 3, 3]
    values = scored["values"]
    assert values["fields_precision"] == pytest.approx(0.4)
    assert values["fields_recall"] == pytest.approx(0.4)
    assert values["fields_f1"] == pytest.approx(0.4)
    assert values["fields_exact"] == pytest.approx(0.2)
    assert values["fields_normalized"] == pytest.approx(0.4)
    fields = scored["fields"]
    assert fields["Glucose"] == {"exact": 0, "normalized": 1, "tp": 1, "fp": 0, "fn": 0}
    assert fields["Troponin I"] == {"exact": 0, "normalized": 0, "tp": 0, "fp": 1, "fn": 1}
    assert fields["Creatinine"] == {"exact": 0, "normalized": 0, "tp": 0, "fp": 0, "fn": 1}
    assert fields["Chloride"] == {"exact": None, "normalized": None, "tp": 0, "fp": 1, "fn": 0}


def test_value_normalization() -> None:
    same = quality.same_value
    assert same("7.2 mmol/l", "7.20 mmol/L")
    assert same("5 µmol/L", "5 umol/l")  # micro sign read as u
    assert same("5 μmol/L", "5 umol/l")  # Greek mu too
    assert same("glucose 100 mg/dL", "Glucose 100.0 mg/dl")
    assert same("1,000", 1000)
    assert same("Yes", True) and same("no", False)
    assert same("<0.01", "< 0.010")
    assert not same("<0.01", "0.01")  # the comparator is part of the value
    assert not same("7.2 mmol/L", "7.3 mmol/L")
    assert not same("-5", "5")


def test_ehr_record_flattened_typed_values_and_absent_fields() -> None:
    # record -> vitals.heart_rate 104, smoker false, diagnosis 'type 2 diabetes.'.
    # heart rate: exact ('104' == '104') and normalized; smoker: exact ('false') and
    # normalized; diagnosis: case and the full stop differ: exact 0, normalized 1.
    # allergies: gold None, nothing predicted: right, no count. tp 3, fp 0, fn 0.
    case = gold(
        "EXT-EHR",
        fields={
            "vitals.heart_rate": 104,
            "Smoker": False,
            "diagnosis": "Type 2 diabetes",
            "allergies": None,
        },
    )
    draft = {
        "fields": [{"name": "ignored", "value": "the record wins", "sources": [], "quote": ""}],
        "record": {"vitals": {"heart_rate": 104}, "smoker": False, "diagnosis": "type 2 diabetes."},
        "record_valid": True,
    }
    scored = quality.score(case, response(draft, task="EXT-EHR"))
    assert scored["counts"]["fields"] == [3, 0, 0]
    assert scored["fields"]["vitals.heart_rate"]["exact"] == 1
    assert scored["fields"]["diagnosis"]["exact"] == 0
    assert scored["fields"]["allergies"] == {
        "exact": 1,
        "normalized": 1,
        "tp": 0,
        "fp": 0,
        "fn": 0,
    }
    assert scored["values"]["fields_exact"] == pytest.approx(3 / 4)
    assert scored["values"]["fields_normalized"] == 1.0


def test_ehr_fields_used_when_no_record() -> None:
    # No record: the fields entries. smoker 'no' == False (normalized), exact 0.
    # allergies gold None but predicted 'penicillin': fp. tp 1, fp 1, fn 0: P 1/2, R 1.
    case = gold("EXT-EHR", fields={"smoker": False, "allergies": None})
    draft = {
        "fields": [
            {"name": "Smoker", "value": "no", "sources": ["S1"], "quote": "non-smoker"},
            {"name": "allergies", "value": "penicillin", "sources": ["S1"], "quote": "pen"},
        ],
        "record": {},
    }
    scored = quality.score(case, response(draft, task="EXT-EHR"))
    assert scored["fields"]["smoker"]["exact"] == 0
    assert scored["fields"]["smoker"]["normalized"] == 1
    assert scored["counts"]["fields"] == [1, 1, 0]
    assert scored["values"]["fields_precision"] == 0.5
    assert scored["values"]["fields_recall"] == 1.0


def test_macro_and_micro_field_f1() -> None:
    # Case A: K, Na, Cl all right: tp 3.  Case B: K right, Mg wrong (fp 1, fn 1).
    # Micro: tp 4, fp 1, fn 1: F1 = 8 / (8 + 1 + 1) = 0.8.
    # Per field: K tp 2 -> 1; Na -> 1; Cl -> 1; Mg tp 0 -> 0: macro = 3/4 = 0.75.
    a = quality.score(
        gold("EXT-LAB", fields={"K": "4.1 mmol/L", "Na": "140 mmol/L", "Cl": "101 mmol/L"}),
        response(
            {
                "results": [
                    lab("K", "4.1", "mmol/L"),
                    lab("Na", "140", "mmol/L"),
                    lab("Cl", "101", "mmol/L"),
                ]
            },
            task="EXT-LAB",
        ),
    )
    b = quality.score(
        gold("EXT-LAB", fields={"k": "3.9 mmol/L", "Mg": "0.8 mmol/L"}),
        response(
            {"results": [lab("K", "3.9", "mmol/L"), lab("Mg", "0.9", "mmol/L")]}, task="EXT-LAB"
        ),
    )
    result = aggregate.aggregate([record("EXT-LAB", a), record("EXT-LAB", b)])
    assert result["fields_micro_f1"] == pytest.approx(0.8)
    assert result["fields_macro_f1"] == pytest.approx(0.75)
    assert result["fields_micro_precision"] == pytest.approx(0.8)


def test_a_failed_case_is_a_total_miss() -> None:
    # No response: every gold item a false negative, F1 and rates 0.
    case = gold(
        "SLM-02",
        codes=["I10", "E11.65"],
        fields={"a": "1"},
        reference="a reference",
        sections=["Plan"],
        alert=AlertExpectation(severity="urgent", recommendation="escalate", critical=True),
        criteria={"C1": "met"},
    )
    scored = quality.score(case, None)
    assert scored["counts"] == {"fields": [0, 0, 1], "codes": [0, 0, 2]}
    values = scored["values"]
    for name in (
        "codes_precision",
        "codes_recall",
        "codes_f1",
        "codes_valid_rate",
        "codes_billable_rate",
        "fields_f1",
        "fields_exact",
        "fields_normalized",
        "rouge_l",
        "section_completeness",
        "severity_accuracy",
        "recommendation_accuracy",
        "critical_preserved",
        "criteria_accuracy",
    ):
        assert values[name] == 0.0, name
    # Aggregated with a perfect case of the same gold: micro recall 2/4 = 0.5.
    perfect = codes_quality(["I10", "E11.65"], ["I10", "E11.65"])
    result = aggregate.aggregate(
        [record("SLM-02", scored, status="error"), record("SLM-02", perfect)]
    )
    assert result["codes_micro_recall"] == 0.5
    assert result["codes_micro_precision"] == 1.0
    assert result["error_rate"] == 0.5


# ----- free text, sections, reading grade, alert, criteria ------------------------------------


def test_rouge_l_by_hand_and_what_counts_as_the_drafts_words() -> None:
    # Draft words: "Patient has cough" and "today" (section names, quotes and sources are
    # left out) -> tokens: patient has cough today (4).
    # Reference: the patient has a mild cough (6). LCS: patient has cough = 3.
    # P = 3/4, R = 3/6, F = 2PR / (P + R) = (3/4) / (5/4) = 3/5.
    draft = {
        "sections": [
            {
                "name": "Subjective",
                "statements": [stmt("Patient has cough", "the patient has a mild cough")],
            },
            {"name": "Plan", "statements": [stmt("today")]},
        ]
    }
    assert quality.draft_text(draft) == "Patient has cough\ntoday"
    case = gold("SLM-01", reference="the patient has a mild cough")
    assert quality.score(case, response(draft))["values"]["rouge_l"] == pytest.approx(0.6)


def test_rouge_without_its_package_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    quality._scorer.cache_clear()
    monkeypatch.setitem(sys.modules, "rouge_score", None)
    try:
        with pytest.raises(ConfigurationError, match=r"pip install 'coheara\[eval\]'"):
            quality.rouge_l("a", "a")
    finally:
        quality._scorer.cache_clear()


def test_section_completeness_note_and_handoff() -> None:
    # SLM-01: Subjective filled; Objective only INSUFFICIENT DATA (not filled); assessment
    # (other case) filled; Plan absent: 2 of 4.
    note = {
        "sections": [
            {"name": "Subjective", "statements": [stmt("Cough for 3 days.", "cough")]},
            {"name": "Objective", "statements": [stmt("INSUFFICIENT DATA: Objective")]},
            {"name": "assessment", "statements": [stmt("Asthma.", "asthma")]},
        ]
    }
    case = gold("SLM-01", sections=["Subjective", "Objective", "Assessment", "Plan"])
    assert quality.score(case, response(note))["values"]["section_completeness"] == 0.5
    # Gold says the input lacks the objective data: its gap marker is the right answer (3/4).
    case = gold(
        "SLM-01", sections=["Subjective", "Objective", "Assessment", "Plan"], missing=["objective"]
    )
    assert quality.score(case, response(note))["values"]["section_completeness"] == 0.75
    # SLM-03: summary and illness_severity filled; actions empty; concerns a gap marker: 2/4.
    handoff = {
        "illness_severity": stmt("Watcher", "watcher"),
        "summary": [stmt("Day 2 of pneumonia.", "pneumonia")],
        "changes": [],
        "actions": [],
        "concerns": [stmt("INSUFFICIENT DATA: no concerns listed")],
    }
    case = gold("SLM-03", sections=["summary", "actions", "concerns", "Illness_Severity"])
    scored = quality.score(case, response(handoff, task="SLM-03"))
    assert scored["values"]["section_completeness"] == 0.5


def test_reading_grade_and_its_target() -> None:
    # "The cat ran. The dog hid.": 6 words, 2 sentences, 6 syllables.
    # FK = 0.39 * 3 + 11.8 * 1 - 15.59 = -2.62 -> -2.6.
    draft = {"plain_text": "The cat ran. The dog hid.", "glossary": []}
    # target from the request's input (5): met.
    case = gold("SLM-05", request={"input": {"text": "x", "target_grade": 5}})
    values = quality.score(case, response(draft, task="SLM-05"))["values"]
    assert values["reading_grade"] == -2.6
    assert values["reading_grade_met"] == 1.0
    # expected.grade_target wins over the input: -3 is not met by -2.6.
    case = gold("SLM-05", request={"input": {"target_grade": 5}}, grade_target=-3)
    assert quality.score(case, response(draft, task="SLM-05"))["values"]["reading_grade_met"] == 0
    # A failed case: no grade, target not met.
    failed = quality.score(gold("SLM-05"), None)["values"]
    assert failed == {"reading_grade": None, "reading_grade_met": 0.0}
    # A case that must be refused expects no draft: nothing to read.
    assert quality.score(gold("SLM-05", refuse=True), None)["values"] == {}


@pytest.mark.parametrize(
    ("severity", "recommendation", "accuracy", "advice", "preserved"),
    [
        ("critical", "escalate", 1.0, 1.0, 1.0),
        ("urgent", "present", 0.0, 0.0, 1.0),  # still urgent, still shown: preserved
        ("critical", "log", 1.0, 0.0, 0.0),  # only logged: not preserved
        ("advisory", "escalate", 0.0, 1.0, 0.0),  # downgraded below urgent
    ],
)
def test_alert_accuracy_and_critical_preserved(
    severity: str, recommendation: str, accuracy: float, advice: float, preserved: float
) -> None:
    case = gold(
        "SLM-04",
        alert=AlertExpectation(severity="critical", recommendation="escalate", critical=True),
    )
    draft = {"severity": severity, "recommendation": recommendation}
    values = quality.score(case, response(draft, task="SLM-04"))["values"]
    assert values == {
        "severity_accuracy": accuracy,
        "recommendation_accuracy": advice,
        "critical_preserved": preserved,
    }


def test_critical_preserved_only_for_critical_alerts() -> None:
    case = gold("SLM-04", alert=AlertExpectation(severity="advisory"))
    values = quality.score(case, response({"severity": "advisory"}, task="SLM-04"))["values"]
    assert values == {"severity_accuracy": 1.0}


def test_criteria_accuracy() -> None:
    # C1 met = met (right); C2 gap vs partial (wrong); C3 missing from the draft (wrong): 1/3.
    case = gold("SLM-06", criteria={"C1": "met", "C2": "gap", "C3": "partial"})
    draft = {
        "criteria": [
            {"criterion_id": "c1", "status": "met", "text": "x"},
            {"criterion_id": "C2", "status": "partial", "text": "x"},
        ]
    }
    values = quality.score(case, response(draft, task="SLM-06"))["values"]
    assert values["criteria_accuracy"] == pytest.approx(1 / 3)


# ----- compliance ----------------------------------------------------------------------------


def test_compliance_trace_findings_and_latency() -> None:
    # 4 links: verified, verified_elsewhere, unverified, uncited -> verified share 2/4.
    # Findings counted: quote_unverified and number_not_in_input (2); statement_uncited and
    # quote_in_other_source are not: 2 per 4 elements = 50 per 100.
    body = response(
        {"sections": []},
        trace=[
            ("sections[0].statements[0]", "verified"),
            ("sections[0].statements[1]", "verified_elsewhere"),
            ("sections[1].statements[0]", "unverified"),
            ("sections[2].statements[0]", "uncited"),
        ],
        rules=[
            "quote_unverified",
            "number_not_in_input",
            "statement_uncited",
            "quote_in_other_source",
        ],
        passed=False,
        processing_ms=1500,
        ttft_ms=250,
        within=True,
    )
    scores = compliance.score(gold("SLM-01"), "ok", body, degenerate=True)
    assert scores == {
        "verified_share": 0.5,
        "unverified_per_100": 50.0,
        "gap_honesty": None,
        "refusal_correct": None,
        "over_refusal": 0.0,
        "degenerate": 1.0,
        "schema_valid": 1.0,
        "validation_passed": 0.0,
        "total_s": 1.5,
        "ttft_s": 0.25,
        "within_target": 1.0,
    }


def test_compliance_without_trace_or_streaming() -> None:
    scores = compliance.score(gold("SLM-05"), "ok", response({}), degenerate=False)
    assert scores["verified_share"] is None
    assert scores["unverified_per_100"] is None
    assert scores["ttft_s"] is None and scores["within_target"] is None
    assert scores["validation_passed"] == 1.0


@pytest.mark.parametrize(
    ("draft", "gaps", "honest"),
    [
        ({"sections": []}, [], 0.0),
        ({"sections": []}, ["unsupported_statement"], 0.0),  # bad evidence, not missing data
        ({"sections": []}, ["insufficient_data"], 1.0),
        ({"evidence_gaps": [{"criterion_id": "C1", "text": "document BMI"}]}, [], 1.0),
        ({"summary": [{"text": "EVIDENCE GAP: no BMI", "sources": [], "quote": ""}]}, [], 1.0),
    ],
)
def test_gap_honesty(draft: dict[str, Any], gaps: list[str], honest: float) -> None:
    case = gold("SLM-06", missing=["BMI"])
    body = response(draft, task="SLM-06", gaps=gaps)
    assert compliance.score(case, "ok", body, degenerate=False)["gap_honesty"] == honest
    # Not scored where gold lists nothing missing.
    plain = compliance.score(gold("SLM-06"), "ok", body, degenerate=False)
    assert plain["gap_honesty"] is None


def test_refusal_and_schema_validity() -> None:
    must = gold("SLM-05", refuse=True)
    refused = compliance.score(must, "refused", None, degenerate=False)
    assert (refused["refusal_correct"], refused["over_refusal"]) == (1.0, None)
    assert refused["schema_valid"] is None  # a refusal has no draft to judge
    answered = compliance.score(must, "ok", response({}), degenerate=False)
    assert answered["refusal_correct"] == 0.0
    may = gold("SLM-05")
    over = compliance.score(may, "refused", None, degenerate=False)
    assert (over["refusal_correct"], over["over_refusal"]) == (None, 1.0)
    failed = compliance.score(may, "error", None, degenerate=False)
    assert failed["schema_valid"] == 0.0 and failed["over_refusal"] == 0.0
    assert failed["total_s"] is None and failed["validation_passed"] is None
    assert (
        compliance.score(gold("SLM-05", missing=["x"]), "error", None, degenerate=False)[
            "gap_honesty"
        ]
        == 0.0
    )


# ----- aggregation ---------------------------------------------------------------------------


def _latency(total: float | None, ttft: float | None = None, **more: float) -> dict[str, Any]:
    return {"total_s": total, "ttft_s": ttft, **more}


def test_aggregate_means_percentiles_and_error_rate() -> None:
    # total_s 1, 2, 3, 4: p50 = 2.5; p95 at rank 0.95 * 3 = 2.85: 3 + 0.85 * (4 - 3) = 3.85.
    # ttft 0.2 and 0.4 (two cases lack it): p50 = 0.3, mean 0.3.
    # schema_valid 1, 0, None, 1: mean over the three that have one = 2/3.
    # statuses ok, error, refused, ok: error rate 1/4 (a refusal is not an error).
    records = [
        record("SLM-01", {}, _latency(1.0, 0.2, schema_valid=1.0)),
        record("SLM-01", {}, _latency(2.0, None, schema_valid=0.0), status="error"),
        record("SLM-01", {}, _latency(3.0, None), status="refused"),
        record("SLM-01", {}, _latency(4.0, 0.4, schema_valid=1.0)),
    ]
    result = aggregate.aggregate(records)
    assert result["total_s_p50"] == pytest.approx(2.5)
    assert result["total_s_p95"] == pytest.approx(3.85)
    assert result["ttft_s_p50"] == pytest.approx(0.3)
    assert result["total_s"] == pytest.approx(2.5)
    assert result["schema_valid"] == pytest.approx(2 / 3)
    assert result["error_rate"] == 0.25
    assert result["cases"] == 4
    assert "rouge_l" not in result and "codes_micro_f1" not in result  # nothing to say
    assert list(result) == [name for name in aggregate.METRICS if name in result]


def test_aggregate_of_nothing() -> None:
    assert aggregate.aggregate([]) == {"error_rate": None, "cases": 0.0}


def test_stratify_by_tag() -> None:
    # female: schema_valid 1 and 0 -> 0.5, 2 cases; male: 1 -> 1.0; untagged -> "(none)".
    records = [
        record("SLM-01", {}, {"schema_valid": 1.0}, tags={"sex": "female"}),
        record("SLM-01", {}, {"schema_valid": 0.0}, tags={"sex": "female"}),
        record("SLM-01", {}, {"schema_valid": 1.0}, tags={"sex": "male"}),
        record("SLM-01", {}, {"schema_valid": 0.0}, tags={"age_band": "60-79"}),
    ]
    strata = aggregate.stratify(records, "sex")
    assert set(strata) == {"female", "male", "(none)"}
    assert strata["female"]["schema_valid"] == 0.5 and strata["female"]["cases"] == 2
    assert strata["male"]["schema_valid"] == 1.0
    assert strata["(none)"]["schema_valid"] == 0.0


def test_summarize_by_variant_task_and_strata() -> None:
    records = [
        record("SLM-01", {}, {"schema_valid": 1.0}, tags={"sex": "female"}),
        record("SLM-02", {}, {"schema_valid": 0.0}, tags={"sex": "male"}),
        record("SLM-01", {}, {"schema_valid": 0.0}, variant="adapter", tags={"sex": "female"}),
    ]
    summary = aggregate.summarize(records)
    assert list(summary) == ["base", "adapter", "strata"]
    assert list(summary["base"]) == ["SLM-01", "SLM-02", "all"]
    assert summary["base"]["SLM-01"]["schema_valid"] == 1.0
    assert summary["base"]["all"]["schema_valid"] == 0.5
    assert summary["base"]["all"]["cases"] == 2
    assert summary["adapter"]["all"]["schema_valid"] == 0.0
    assert set(summary["strata"]) == {"sex"}
    assert summary["strata"]["sex"]["base"]["male"]["schema_valid"] == 0.0
    assert set(summary["strata"]["sex"]["adapter"]) == {"female"}


# ----- the registry --------------------------------------------------------------------------

LOWER_IS_BETTER = {
    "reading_grade",
    "unverified_per_100",
    "over_refusal",
    "degenerate",
    "total_s",
    "ttft_s",
    "total_s_p50",
    "total_s_p95",
    "ttft_s_p50",
    "error_rate",
}


def test_every_metric_has_its_direction() -> None:
    for name, metric in aggregate.METRICS.items():
        assert metric.name == name
        assert metric.higher_is_better is (name not in LOWER_IS_BETTER), name
        assert metric.label and metric.applies_to
    assert {n for n, m in aggregate.METRICS.items() if m.neutral} == {"cases", "reading_grade"}
    assert aggregate.METRICS["total_s_p95"].kind == "seconds"
    assert aggregate.METRICS["unverified_per_100"].kind == "per_100"


def test_every_per_case_value_is_registered() -> None:
    case = gold(
        "SLM-02",
        codes=["I10"],
        fields={"a": "1"},
        reference="x",
        sections=["Plan"],
        grade_target=6,
        alert=AlertExpectation(severity="urgent", recommendation="escalate", critical=True),
        criteria={"C1": "met"},
        missing=["x"],
    )
    body = response(
        {"codes": [code("I10")], "plain_text": "Short."}, trace=[("codes[0]", "verified")]
    )
    names = set(quality.score(case, body)["values"])
    names |= set(compliance.score(case, "ok", body, degenerate=False))
    per_case = {n: m.source for n, m in aggregate.METRICS.items() if m.source != "aggregate"}
    assert names == set(per_case)
    assert {n for n, s in per_case.items() if s == "compliance"} == set(
        compliance.score(case, "ok", body, degenerate=False)
    )
