"""SLM-05 plain language and the imaging reads (IMG-*): the reading grade, every check on
crafted (adverse) drafts, the refusals, the image preparation per task, the examples,
and one run of each task end to end on the tiny model."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
from typing import Any

import numpy as np
import pytest
from PIL import Image

from coheara import Engine, Settings
from coheara.engine.result import ExtractionResult
from coheara.errors import ImageError, TaskRefusedError
from coheara.imaging.limits import ImageLimits
from coheara.tasks.envelope import TaskRequest
from coheara.tasks.readability import count_sentences, flesch_kincaid, syllables_of, words_of
from coheara.tasks.registry import get_task
from coheara.tasks.runner import review_draft, run_task, validate_input
from task_support import assert_envelope, example, finding, rules, tiny

PLAIN = get_task("SLM-05")
IMAGING = ("IMG-CXR", "IMG-CXR-PRIOR", "IMG-VOLUME", "IMG-DERM", "IMG-FUNDUS", "IMG-PATH")


# ----- readability ---------------------------------------------------------------------------


def test_the_published_platypus_sentence_scores_as_published() -> None:
    # Wikipedia's Flesch example: reading ease 24.4 (13 words, 26 syllables), so grade 13.1.
    stats = flesch_kincaid(
        "The Australian platypus is seemingly a hybrid of a mammal and reptilian creature."
    )
    assert (stats.words, stats.sentences, stats.syllables) == (13, 1, 26)
    assert stats.reading_ease == pytest.approx(24.4, abs=0.5)
    assert stats.grade == pytest.approx(13.1, abs=0.5)


def test_simple_text_reads_low_and_dense_clinical_text_reads_high() -> None:
    assert flesch_kincaid("The cat sat on the mat.").grade == pytest.approx(-1.45, abs=0.1)
    simple = flesch_kincaid(
        "You have a lung infection. We gave you medicine for it. You can go home today. "
        "Take your pills each day. Call us if you feel worse."
    )
    assert simple.grade is not None and simple.grade < 3
    dense = flesch_kincaid(
        "Echocardiography demonstrated moderate concentric left ventricular hypertrophy "
        "with preserved systolic function and grade II diastolic dysfunction."
    )
    assert dense.grade is not None and dense.grade > 12


def test_pyphen_is_raised_where_hyphenation_dictionaries_skip_syllables() -> None:
    # Hyphenation dictionaries give "area" and "furosemide" no split: one syllable each.
    assert syllables_of("area") == 2  # still short of 3: the estimate errs low, not high
    assert syllables_of("furosemide") == 4
    assert syllables_of("Australian") == 4
    assert [syllables_of(w) for w in ("make", "walked", "cases", "table", "the")] == [1, 1, 2, 2, 1]


def test_numbers_and_abbreviations_are_read_aloud() -> None:
    assert syllables_of("7.5") == 4  # seven point five
    assert syllables_of("120") == 5  # one hundred twenty
    assert syllables_of("MRI") == 3 and syllables_of("mg") == 2
    assert syllables_of("follow-up") == 3


def test_sentences_skip_abbreviations_and_decimals_and_count_lines() -> None:
    text = "Dr. Lee saw you. Take 7.5 mg b.i.d. with food.\n- Drink water\n- Rest"
    assert count_sentences(text) == 4
    assert words_of("Take 7.5 mg, don't skip.") == ["Take", "7.5", "mg", "don't", "skip"]
    assert flesch_kincaid("").grade is None and flesch_kincaid(" ... ").words == 0


# ----- SLM-05 checks on crafted drafts -------------------------------------------------------

SOURCE = (
    "Continue lisinopril 10 mg daily. Start atorvastatin 40 mg at night. "
    "Echocardiogram showed left ventricular hypertrophy. Recheck potassium on 03/14/2025."
)
PLAIN_INPUT = {"text": SOURCE, "target_grade": 6}
SIMPLE = (
    "Keep taking lisinopril 10 mg each day. Now start atorvastatin 40 mg. Take it at night. "
    "Your heart walls are thick. We will check your blood on March 14, 2025."
)


def plain_draft(text: str = SIMPLE, **extra: Any) -> dict[str, Any]:
    return {"plain_text": text, "glossary": [], "explain_in_person": [], "accuracy_flags": []} | (
        extra
    )


def test_the_grade_is_computed_into_the_draft_whatever_the_model_claims() -> None:
    review = review_draft(
        PLAIN,
        PLAIN_INPUT,
        plain_draft(readability={"grade": 2.0, "target": 6, "within_target": True}),
    )
    expected = flesch_kincaid(SIMPLE).grade
    assert review.draft["readability"] == {
        "method": "flesch_kincaid",
        "grade": expected,
        "target": 6.0,
        "within_target": True,
        "words": flesch_kincaid(SIMPLE).words,
        "sentences": 5,
    }
    assert finding(review, "reading_grade").severity == "info"
    assert PLAIN.revise is not None and PLAIN.revise(review) is None
    assert "readability" not in PLAIN.output_model.model_json_schema()["properties"]


def test_a_draft_above_the_target_grade_is_flagged_and_asked_again() -> None:
    dense = (
        "Continue lisinopril 10 mg daily and initiate atorvastatin 40 mg nightly, given the "
        "echocardiographic demonstration of left ventricular hypertrophy, with potassium "
        "surveillance scheduled on 03/14/2025."
    )
    review = review_draft(PLAIN, PLAIN_INPUT, plain_draft(dense))
    grade = review.draft["readability"]["grade"]
    assert grade > 12 and review.draft["readability"]["within_target"] is False
    assert finding(review, "reading_grade_above_target").severity == "warning"
    assert PLAIN.revise is not None
    follow_up = PLAIN.revise(review)
    assert follow_up is not None and f"{grade:.1f}" in follow_up and "grade 6" in follow_up


def test_glossary_terms_must_occur_in_the_source_else_they_are_removed() -> None:
    glossary = [
        {"term": "hypertrophies", "meaning": "thick heart walls"},  # plural of a source word
        {"term": "atrial fibrillation", "meaning": "an irregular heartbeat"},  # invented
        {"term": "Echocardiogram", "meaning": "a heart ultrasound"},
    ]
    review = review_draft(PLAIN, PLAIN_INPUT, plain_draft(glossary=glossary))
    assert [g["term"] for g in review.draft["glossary"]] == ["hypertrophies", "Echocardiogram"]
    assert finding(review, "glossary_term_not_in_source").element == "glossary[1]"
    glossary_links = [link for link in review.links if link.element.startswith("glossary")]
    assert [(link.element, link.status) for link in glossary_links] == [
        ("glossary[0]", "verified"),
        ("glossary[1]", "verified"),
    ]
    assert all(link.sources for link in glossary_links)


def test_a_dropped_number_is_flagged_and_a_spelled_or_dated_one_is_not() -> None:
    dropped = review_draft(PLAIN, PLAIN_INPUT, plain_draft(SIMPLE.replace(" 40 mg", "")))
    assert "40" in finding(dropped, "number_dropped").message
    spelled = review_draft(
        PLAIN,
        {"text": "Take 2 tablets of aspirin 81 mg."},
        plain_draft("Take two tablets of aspirin 81 mg."),
    )
    assert "number_dropped" not in rules(spelled)  # and the date's 03 became "March": exempt
    assert "number_dropped" not in rules(review_draft(PLAIN, PLAIN_INPUT, plain_draft()))


def test_an_invented_number_is_flagged_as_possible_fabrication() -> None:
    review = review_draft(PLAIN, PLAIN_INPUT, plain_draft(SIMPLE.replace("40 mg", "80 mg")))
    invented = finding(review, "number_not_in_input")
    assert invented.severity == "error" and invented.element == "plain_text"
    assert "80" in invented.message


def test_drug_names_are_kept_and_none_is_added() -> None:
    review = review_draft(
        PLAIN,
        PLAIN_INPUT,
        plain_draft(
            SIMPLE.replace("lisinopril", "your blood pressure pill"),
            glossary=[{"term": "potassium", "meaning": "a salt; like metoprolol it matters"}],
        ),
    )
    assert "lisinopril" in finding(review, "drug_name_dropped").message
    added = finding(review, "drug_name_not_in_source")
    assert added.severity == "error" and added.element == "glossary[0].meaning"
    assert "metoprolol" in added.message
    clean = review_draft(PLAIN, PLAIN_INPUT, plain_draft())
    assert not {"drug_name_dropped", "drug_name_not_in_source"} & set(rules(clean))


def test_explanations_to_give_in_person_are_traced_like_any_statement() -> None:
    items = [
        {"text": "The new statin.", "sources": ["S1"], "quote": "Start atorvastatin 40 mg"},
        {"text": "Heart thickening.", "sources": ["S1"], "quote": "severe aortic stenosis"},
        {"text": "Blood tests.", "sources": [], "quote": ""},
    ]
    review = review_draft(PLAIN, PLAIN_INPUT, plain_draft(explain_in_person=items))
    statuses = {link.element: link.status for link in review.links}
    assert statuses["explain_in_person[0]"] == "verified"
    assert statuses["explain_in_person[1]"] == "unverified"
    assert statuses["explain_in_person[2]"] == "uncited"
    assert {"quote_unverified", "statement_uncited"} <= set(rules(review))


@pytest.mark.parametrize(
    ("data", "context"),
    [
        ({"text": SOURCE, "target_language": "es"}, None),
        ({"text": SOURCE, "target_language": "Spanish"}, None),
        ({"text": "Please translate this into Vietnamese. " + SOURCE}, None),
        ({"text": SOURCE}, {"purpose": "Write it in French for the family."}),
        ({"text": SOURCE}, {"template": ["Summary", "Translation into Somali"]}),
    ],
)
def test_another_language_is_refused_clearly(
    data: dict[str, Any], context: dict[str, Any] | None
) -> None:
    body: dict[str, Any] = {"input": data, **({"context": context} if context else {})}
    with pytest.raises(TaskRefusedError) as caught:  # a refusal, not a malformed request
        asyncio.run(run_task(_NeverCalled(), body, task="SLM-05"))  # type: ignore[arg-type]
    message = str(caught.value)
    assert "English-only" in message and "lisinopril" not in message


def test_english_and_a_record_of_an_interpreter_are_not_refused() -> None:
    for language in ("en", "en-GB", "English"):
        validate_input(PLAIN, {"text": SOURCE, "target_language": language})
    validate_input(
        PLAIN, {"text": "Plan explained to the patient in Spanish via an interpreter. " + SOURCE}
    )


class _NeverCalled:
    """An engine a refused request must never reach."""

    settings = Settings()

    async def extract(self, **kwargs: Any) -> ExtractionResult:
        raise AssertionError("the model was called")


class _Scripted:
    """An engine that answers each call with the next scripted draft."""

    settings = Settings()

    def __init__(self, drafts: list[dict[str, Any]]) -> None:
        self.drafts = drafts
        self.calls: list[Any] = []

    async def extract(self, **kwargs: Any) -> ExtractionResult:
        self.calls.append(kwargs["messages"])
        draft = self.drafts[len(self.calls) - 1]
        return ExtractionResult(
            text=json.dumps(draft),
            finish_reason="stop",
            prompt_tokens=100,
            prompt_tokens_exact=True,
            output_tokens=50,
            time_to_first_token_s=0.01,
            total_s=0.1,
            tokens_per_s=500.0,
            backend="scripted",
            model="scripted",
            value=draft,
        )


DENSE = (
    "Continue lisinopril 10 mg daily; initiate atorvastatin 40 mg nightly considering "
    "echocardiographic left ventricular hypertrophy; potassium surveillance 03/14/2025."
)


def test_the_runner_re_asks_above_the_target_and_reports_the_grade_reached() -> None:
    engine = _Scripted([plain_draft(DENSE), plain_draft(SIMPLE), plain_draft(DENSE)])
    response = asyncio.run(run_task(engine, {"input": PLAIN_INPUT}, task="SLM-05"))  # type: ignore[arg-type]
    assert response.metadata.revisions == 1 and len(engine.calls) == 2
    assert response.draft["readability"]["grade"] == flesch_kincaid(SIMPLE).grade
    assert response.draft["readability"]["within_target"] is True
    follow_up = engine.calls[1][-1].text
    assert "grade 6" in follow_up and "Flesch-Kincaid" in follow_up


def test_the_re_asks_are_bounded_and_the_last_grade_is_reported() -> None:
    engine = _Scripted([plain_draft(DENSE)] * 4)
    response = asyncio.run(run_task(engine, {"input": PLAIN_INPUT}, task="SLM-05"))  # type: ignore[arg-type]
    assert response.metadata.revisions == 2 and len(engine.calls) == 3
    assert response.draft["readability"]["within_target"] is False
    above = [f for f in response.validation.findings if f.rule == "reading_grade_above_target"]
    assert len(above) == 1 and str(response.draft["readability"]["grade"]) in above[0].message


# ----- imaging checks on crafted drafts ------------------------------------------------------

CXR_INPUT = {
    "clinical_history": "Productive cough for 3 days, fever 38.4 C. Smoker.",
    "question": "Pneumonia?",
}


def cxr_draft(**extra: Any) -> dict[str, Any]:
    return {
        "image_quality": "adequate",
        "findings": [
            {"basis": "image", "observation": "Airspace opacity.", "location": "right lower zone"},
            {"basis": "image", "observation": "No pleural effusion.", "location": "both bases"},
        ],
        "impression": "Right lower zone consolidation, consistent with the history of fever.",
        "limitations": "",
        "relevant_history": [
            {"text": "Fever.", "sources": ["S1"], "quote": "fever 38.4 C"},
        ],
    } | extra


def test_image_findings_are_marked_image_derived_and_not_flagged_as_uncited() -> None:
    spec = get_task("IMG-CXR")
    review = review_draft(spec, CXR_INPUT, cxr_draft())
    assert rules(review) == []
    assert [(link.element, link.status) for link in review.links] == [
        ("relevant_history[0]", "verified")
    ]
    final = spec.output_model.model_validate(review.draft).model_dump()
    assert {f["basis"] for f in final["findings"]} == {"image"}


def test_cited_history_is_still_checked_for_quotes_citations_and_numbers() -> None:
    history = [
        {"text": "Fever of 39.9 C.", "sources": ["S1"], "quote": "fever 38.4 C"},
        {"text": "Cough.", "sources": ["S1"], "quote": "haemoptysis for a week"},
        {"text": "Smoker.", "sources": [], "quote": ""},
    ]
    review = review_draft(get_task("IMG-CXR"), CXR_INPUT, cxr_draft(relevant_history=history))
    invented = finding(review, "number_not_in_input")
    assert invented.severity == "error" and invented.element == "relevant_history[0].text"
    assert finding(review, "quote_unverified").element == "relevant_history[1]"
    assert finding(review, "statement_uncited").element == "relevant_history[2]"


def test_numbers_read_from_the_image_are_warned_but_labels_and_input_numbers_are_not() -> None:
    spec = get_task("IMG-VOLUME")
    data = {"clinical_history": "Nodule of 8 mm on a chest X-ray.", "body_region": "chest"}
    findings = [
        {"basis": "image", "observation": "Nodule, 2.5 cm.", "location": "right upper lobe"},
        {"basis": "image", "observation": "The 8 mm nodule.", "location": "SLICE 40, 3rd rib"},
    ]
    review = review_draft(
        spec,
        data,
        {
            "image_quality": "adequate",
            "findings": findings,
            "impression": "Solid nodule.",
            "relevant_history": [],
        },
    )
    warned = finding(review, "image_number_unverified")
    assert warned.severity == "warning" and warned.element == "findings[0].observation"
    assert "2.5" in warned.message
    assert "number_not_in_input" not in rules(review)


def test_a_single_study_read_that_invents_a_comparison_is_flagged() -> None:
    spec = get_task("IMG-CXR")
    invented = cxr_draft(impression="Consolidation, new since the prior study.")
    review = review_draft(spec, CXR_INPUT, invented)
    flagged = finding(review, "comparison_without_prior")
    assert flagged.severity == "error" and flagged.element == "impression"
    with_prior = {**CXR_INPUT, "clinical_history": "Prior CXR 2 weeks ago was clear. Fever."}
    assert "comparison_without_prior" not in rules(review_draft(spec, with_prior, invented))


def test_a_read_without_findings_or_impression_is_a_missing_section() -> None:
    review = review_draft(
        get_task("IMG-DERM"),
        {"body_site": "left forearm"},
        {"image_quality": "limited", "findings": [], "impression": " ", "relevant_history": []},
    )
    assert {"no_image_findings", "no_impression"} <= set(rules(review))
    assert [(g.kind, g.element) for g in review.gaps] == [
        ("missing_section", "findings"),
        ("missing_section", "impression"),
    ]


def test_a_gap_marker_in_the_impression_becomes_a_gap() -> None:
    marker = cxr_draft(
        impression="INSUFFICIENT DATA: lateral view needed for the retrocardiac area"
    )
    review = review_draft(get_task("IMG-CXR"), CXR_INPUT, marker)
    assert [(g.kind, g.detail) for g in review.gaps] == [
        ("insufficient_data", "lateral view needed for the retrocardiac area")
    ]


def test_a_comparison_lists_its_changes_and_may_say_unchanged() -> None:
    spec = get_task("IMG-CXR-PRIOR")
    data = {"prior_report": "Right lower zone consolidation.", "interval": "6 weeks"}
    base = {
        "image_quality": "adequate",
        "findings": [{"basis": "image", "observation": "Clear lungs.", "location": "both"}],
        "impression": "Consolidation resolved since the prior study.",
        "relevant_history": [
            {"text": "Prior consolidation.", "sources": ["S2"], "quote": "consolidation"}
        ],
    }
    none = review_draft(spec, data, {**base, "changes": []})
    assert "no_comparison" in rules(none)
    assert ("missing_section", "changes") in [(g.kind, g.element) for g in none.gaps]
    changes = [
        {
            "basis": "image",
            "observation": "Consolidation.",
            "status": "resolved",
            "location": "right lower zone",
        }
    ]
    ok = review_draft(spec, data, {**base, "changes": changes})
    assert rules(ok) == [] and [link.status for link in ok.links] == ["verified"]


# ----- imaging preparation -------------------------------------------------------------------


def png_bytes(width: int = 64, height: int = 64, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(60, 200, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def prepare_for(task_id: str, items: list[Any]) -> Any:
    spec = get_task(task_id)
    assert spec.prepare_images is not None
    return spec.prepare_images(items, ImageLimits())


def test_each_read_takes_the_images_it_can_read_and_refuses_others() -> None:
    assert prepare_for("IMG-CXR", [png_bytes(), png_bytes(seed=1)]).kind == "images"
    with pytest.raises(ImageError, match="at most 2"):
        prepare_for("IMG-CXR", [png_bytes()] * 3)
    with pytest.raises(ImageError, match="compares two"):
        prepare_for("IMG-CXR-PRIOR", [png_bytes()])
    with pytest.raises(ImageError, match="one CT or MR series"):
        prepare_for("IMG-VOLUME", [png_bytes()])


def test_a_pair_is_sent_prior_first_though_given_current_first() -> None:
    current, prior = png_bytes(seed=1), png_bytes(seed=2)
    pair = prepare_for("IMG-CXR-PRIOR", [current, prior])
    assert pair.kind == "pair" and [image.source for image in pair.images] == ["prior", "current"]
    assert np.array_equal(pair.images[1].pixels, prepare_for("IMG-CXR", [current]).images[0].pixels)


def test_a_large_pathology_picture_is_tiled_and_each_patch_labelled() -> None:
    slide = np.random.default_rng(4).integers(40, 200, (1792, 1792, 3), dtype=np.uint8)
    tiles = prepare_for("IMG-PATH", [slide])
    assert tiles.kind == "tiles" and len(tiles.images) == 4
    parts = tiles.messages("Describe.")[0]
    labels = [p for p in parts.parts if isinstance(p, str) and p.startswith("PATCH")]
    assert labels == [
        "PATCH 1 (row 1, column 1)",
        "PATCH 2 (row 1, column 2)",
        "PATCH 3 (row 2, column 1)",
        "PATCH 4 (row 2, column 2)",
    ]
    assert parts.parts[-1] == "Describe."
    whole = prepare_for("IMG-PATH", [png_bytes(), png_bytes(seed=3)])
    assert len(whole.images) == 2  # cut patches go whole, one each


# ----- examples ------------------------------------------------------------------------------


@pytest.mark.parametrize("task_id", ["SLM-05", *IMAGING])
def test_each_example_is_a_valid_request_for_its_task(task_id: str) -> None:
    body = example(task_id)
    request = TaskRequest.model_validate(body)
    spec = get_task(task_id)
    validate_input(spec, request.input)
    if spec.mode == "image":
        assert request.images
        for data in request.images:
            base64.b64decode(data, validate=True)
    text = json.dumps(body["input"])
    assert not re.search(r"\b(?:Mr|Mrs|Ms|Dr)\.? [A-Z][a-z]+", text)  # invented "Patient X"


def test_the_volume_example_is_a_real_four_slice_ct_series() -> None:
    items = [base64.b64decode(d) for d in example("IMG-VOLUME")["images"]]
    volume = prepare_for("IMG-VOLUME", items)
    assert volume.kind == "volume" and len(volume.images) == 4
    assert volume.volume.modality == "CT" and volume.volume.ordered_by == "position"


# ----- end to end on the tiny model ----------------------------------------------------------


def test_plain_language_runs_end_to_end(tiny_engine: Engine) -> None:
    from fhir.resources.documentreference import DocumentReference

    body = example("SLM-05") | {"fhir": True, "max_tokens": 500}
    response = asyncio.run(run_task(tiny(tiny_engine), body, task="SLM-05"))
    assert_envelope(response, PLAIN, body)
    readability = response.draft["readability"]
    assert readability["target"] == 6.0
    assert readability["grade"] == flesch_kincaid(response.draft["plain_text"]).grade
    assert 0 <= response.metadata.revisions <= 2
    if readability["within_target"] is False:
        assert response.metadata.revisions == 2
    document = DocumentReference.model_validate(response.fhir)
    assert document.docStatus == "preliminary"
    assert document.content[0].attachment.language == "en"
    assert document.subject is not None and document.subject.identifier is not None
    assert document.subject.identifier.value == body["patient_scope_id"]


@pytest.mark.parametrize(
    ("task_id", "images"),
    [
        ("IMG-CXR", 1),
        ("IMG-CXR-PRIOR", 2),
        ("IMG-VOLUME", 4),
        ("IMG-DERM", 1),
        ("IMG-FUNDUS", 1),
        ("IMG-PATH", 1),
    ],
)
def test_each_imaging_read_runs_end_to_end(tiny_engine: Engine, task_id: str, images: int) -> None:
    from fhir.resources.diagnosticreport import DiagnosticReport

    spec = get_task(task_id)
    body = example(task_id) | {"fhir": True, "max_tokens": 400}
    response = asyncio.run(run_task(tiny(tiny_engine), body, task=task_id))
    assert_envelope(response, spec, body)
    assert len(response.metadata.images) == images  # each image's provenance
    if task_id == "IMG-VOLUME":
        assert [p["slice_number"] for p in response.metadata.images] == [1, 2, 3, 4]
        assert {p["recipe"] for p in response.metadata.images} == {"ct_windows"}
    assert {f["basis"] for f in response.draft["findings"]} <= {"image"}
    assert not [link for link in response.trace if link.element.startswith("findings")]
    report = DiagnosticReport.model_validate(response.fhir)
    assert report.status == "preliminary"
    assert report.encounter is not None and report.encounter.identifier is not None
    assert report.encounter.identifier.value == body["clinical_event_id"]
