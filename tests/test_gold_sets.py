"""The shipped gold sets: they load, their requests are valid task requests, their accepted
drafts pass the tasks' own checks unchanged with every quote found in its cited source,
their expectations agree with their drafts, and their images open the way `coheara eval`
opens them. Broken files are refused with one line that names where."""

from __future__ import annotations

import copy
import importlib.util
import re
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from coheara.errors import InvalidRequestError
from coheara.evaluation.gold import GoldCase, GoldSet, load, shipped
from coheara.settings import Settings
from coheara.tasks import icd10
from coheara.tasks.envelope import ArtifactContext, TaskRequest
from coheara.tasks.registry import all_tasks, get_task
from coheara.tasks.roles.slm01_note import required_sections
from coheara.tasks.runner import review_draft, validate_input
from coheara.tasks.sources import Sources
from coheara.tasks.spec import is_gap_marker

REPO = Path(__file__).resolve().parent.parent
GOLD = REPO / "src" / "coheara" / "evaluation" / "gold"
IMAGES = GOLD / "images"
SCRIPT = REPO / "scripts" / "make_gold_images.py"

AGE_BANDS = {"0-17", "18-39", "40-64", "65+"}
SEXES = {"female", "male"}
DIFFICULTIES = {"routine", "missing-data", "edge"}
LAYER_KEYS = {
    "SLM-02": {"description"},
    "SLM-05": {"readability"},
    "EXT-LAB": {"verified"},
    "EXT-EHR": {"record", "record_valid"},
}
"""Draft keys the layer fills in after the model (never in an accepted draft)."""


def _sets() -> dict[str, GoldSet]:
    return {path.stem: load(path) for path in shipped()}


SETS = _sets()
CASES: list[tuple[GoldSet, GoldCase]] = [(s, c) for s in SETS.values() for c in s.cases]
DRAFTED = [(s, c) for s, c in CASES if c.expected.draft is not None]
IMAGED = [(s, c) for s, c in CASES if c.images]


def _id(pair: tuple[GoldSet, GoldCase]) -> str:
    return pair[1].id


def _context(case: GoldCase) -> ArtifactContext | None:
    raw = case.request.get("context")
    return ArtifactContext.model_validate(raw) if raw is not None else None


def _strip(value: Any, keys: set[str]) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [_strip(v, keys) for v in value]
    return value


def _cited(value: Any) -> list[dict[str, Any]]:
    """Every element of a draft that carries a citation (`quote`), depth first."""
    found = []
    if isinstance(value, dict):
        if "quote" in value:
            found.append(value)
        for inner in value.values():
            found += _cited(inner)
    elif isinstance(value, list):
        for inner in value:
            found += _cited(inner)
    return found


# ----- the files --------------------------------------------------------------------------


def test_one_gold_set_a_task_and_each_found_by_task() -> None:
    tasks = all_tasks()
    assert sorted(p.name for p in shipped()) == sorted(f"{t.lower()}.jsonl" for t in tasks)
    for task_id, spec in tasks.items():
        assert [p.name for p in shipped(task_id)] == [f"{task_id.lower()}.jsonl"]
        assert shipped(spec.slug) == shipped(task_id)
        assert {c.task for c in SETS[task_id.lower()].cases} == {task_id}


def test_case_counts_and_unique_ids() -> None:
    counts = Counter(c.task for _, c in CASES)
    for task_id, spec in all_tasks().items():
        low, high = (3, 4) if spec.mode == "image" else (6, 10)
        assert low <= counts[task_id] <= high, (task_id, counts[task_id])
    ids = [c.id for _, c in CASES]
    assert len(ids) == len(set(ids)) == 68


def test_tags_are_present_and_varied() -> None:
    for _, case in CASES:
        tags = case.tags
        assert tags["age_band"] in AGE_BANDS, case.id
        assert tags["sex"] in SEXES, case.id
        assert tags["difficulty"] in DIFFICULTIES, case.id
        assert re.fullmatch(r"[a-z][a-z ]+", tags["specialty"]), case.id
        # A missing-data case says what is missing; no other case claims anything is.
        assert bool(case.expected.missing) == (tags["difficulty"] == "missing-data"), case.id
    for task_id in all_tasks():
        cases = SETS[task_id.lower()].cases
        assert {c.tags["sex"] for c in cases} == SEXES, task_id
        assert len({c.tags["age_band"] for c in cases}) >= 2, task_id
        assert "missing-data" in {c.tags["difficulty"] for c in cases}, task_id
    everywhere = [c.tags for _, c in CASES]
    assert {t["age_band"] for t in everywhere} == AGE_BANDS
    assert {t["difficulty"] for t in everywhere} == DIFFICULTIES
    assert len({t["specialty"] for t in everywhere}) >= 10


def test_no_identifying_data() -> None:
    """Synthetic patients only: 'Patient A', no names, no birth dates, no record numbers."""
    for path in shipped():
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"\b(?:DOB|date of birth|MRN|NHS number|SSN)\b", text, re.I)
        named = set(re.findall(r"\bPatient ([A-Z])\b", text))
        assert named <= {"A"}, (path.name, named)


# ----- requests ---------------------------------------------------------------------------


@pytest.mark.parametrize("pair", CASES, ids=_id)
def test_request_is_a_valid_task_request(pair: tuple[GoldSet, GoldCase]) -> None:
    _, case = pair
    spec = get_task(case.task)
    request = TaskRequest.model_validate(case.request)
    assert request.images == []  # images travel as files named by the case
    assert bool(case.images) == (spec.mode == "image")
    if case.expected.refuse:
        with pytest.raises(InvalidRequestError, match="English"):
            validate_input(spec, request.input)
        assert case.expected.draft is None
        return
    spec.input_model.model_validate(request.input)
    assert case.expected.draft is not None


def test_slm05_refusal_case_asks_for_french() -> None:
    refusals = [c for _, c in CASES if c.expected.refuse]
    assert [(c.task, c.request["input"]["target_language"]) for c in refusals] == [("SLM-05", "fr")]


# ----- drafts -----------------------------------------------------------------------------


@pytest.mark.parametrize("pair", DRAFTED, ids=_id)
def test_draft_fits_the_output_model_and_cites_its_sources(
    pair: tuple[GoldSet, GoldCase],
) -> None:
    _, case = pair
    spec = get_task(case.task)
    draft = case.expected.draft
    assert draft is not None
    spec.output_model.model_validate(draft)
    assert not LAYER_KEYS.get(spec.id, set()) & set(_keys(draft))
    data = spec.input_model.model_validate(case.request["input"])
    sources = Sources.from_input(data, skip=spec.sources_skip)
    elements = _cited(draft)
    assert elements or spec.mode == "image", case.id
    for element in elements:
        quote = element["quote"]
        if not quote:
            # Uncited only to say what is missing.
            assert element["sources"] == []
            assert any(is_gap_marker(v) for v in element.values() if isinstance(v, str))
            continue
        assert element["sources"], element
        assert set(element["sources"]) <= set(sources.by_id), element
        assert any(sources.contains(s, quote) for s in element["sources"]), element


def _keys(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [*value, *(k for v in value.values() for k in _keys(v))]
    if isinstance(value, list):
        return [k for v in value for k in _keys(v)]
    return []


@pytest.mark.parametrize("pair", DRAFTED, ids=_id)
def test_draft_passes_the_tasks_checks_unchanged(pair: tuple[GoldSet, GoldCase]) -> None:
    """What `coheara eval` would accept: no error or warning, every citation verified, gaps
    exactly where the case says something is missing, and nothing the checks correct."""
    _, case = pair
    spec = get_task(case.task)
    draft = case.expected.draft
    assert draft is not None
    review = review_draft(spec, case.request["input"], copy.deepcopy(draft), context=_context(case))
    assert [f.rule for f in review.findings if f.severity == "error"] == [], case.id
    warnings = [f.rule for f in review.findings if f.severity == "warning"]
    # EXT-EHR says a required field it could not find is missing from the record.
    incomplete = spec.id == "EXT-EHR" and bool(case.expected.missing)
    assert warnings == (["record_incomplete"] if incomplete else []), warnings
    assert {link.status for link in review.links} <= {"verified"}, case.id
    assert bool(review.gaps) == bool(case.expected.missing), (case.id, review.gaps)
    keys = LAYER_KEYS.get(spec.id, set())
    expected = _strip(draft, keys)
    if spec.id == "EXT-EHR":  # the model's INSUFFICIENT DATA entries become gaps
        expected["fields"] = [f for f in expected["fields"] if not is_gap_marker(f["value"])]
    assert _strip(review.draft, keys) == expected


# ----- expectations against drafts, task by task ------------------------------------------


def _reviewed(case: GoldCase) -> dict[str, Any]:
    assert case.expected.draft is not None
    review = review_draft(
        get_task(case.task),
        case.request["input"],
        copy.deepcopy(case.expected.draft),
        context=_context(case),
    )
    return review.draft


def _drafted(task: str) -> list[GoldCase]:
    return [c for c in SETS[task.lower()].cases if c.expected.draft is not None]


def test_slm01_sections_are_the_required_ones() -> None:
    spec = get_task("SLM-01")
    for case in _drafted("SLM-01"):
        data = spec.input_model.model_validate(case.request["input"])
        names = [s["name"] for s in case.expected.draft["sections"]]
        assert names == case.expected.sections == required_sections(data, _context(case))
        assert case.expected.reference
    formats = {tuple(c.expected.sections or ()) for c in _drafted("SLM-01")}
    assert ("Subjective", "Objective", "Assessment", "Plan") in formats
    assert any("History of Present Illness" in f for f in formats)  # an H&P
    assert len(formats) >= 3  # and a caller's template


def test_slm02_codes_exist_are_billable_and_are_the_drafts() -> None:
    for case in _drafted("SLM-02"):
        codes = case.expected.codes or []
        assert codes, case.id
        assert [c["code"] for c in case.expected.draft["codes"]] == codes
        for code in codes:
            entry = icd10.lookup(code)
            assert entry is not None and entry.billable and entry.code == code, code
        assert len(codes) <= case.request["input"]["max_codes"]
    # Hand-checked: the first case is an NSTEMI admission.
    assert _drafted("SLM-02")[0].expected.codes == ["I21.4", "E11.9", "E78.5", "Z79.82"]


def test_slm03_sections_are_filled_and_severity_is_only_the_inputs() -> None:
    for case in _drafted("SLM-03"):
        draft = case.expected.draft
        assert draft is not None
        for key in case.expected.sections or []:
            assert draft[key], (case.id, key)
        stated = case.request["input"].get("illness_severity")
        assert ("illness_severity" in (case.expected.sections or [])) == bool(stated)
        assert (draft["illness_severity"] or {}).get("text") == stated
        assert case.expected.reference


def test_slm04_alert_expectation_is_the_drafts_and_critical_is_the_inputs() -> None:
    for case in _drafted("SLM-04"):
        alert = case.expected.alert
        assert alert is not None
        draft = _reviewed(case)
        assert (draft["severity"], draft["recommendation"]) == (
            alert.severity,
            alert.recommendation,
        )
        raised = case.request["input"]["alert"]
        assert alert.critical == (raised["severity"] == "critical" or raised["hard_constraint"])
        if alert.critical:
            assert alert.severity in ("urgent", "critical") and alert.recommendation != "log"
    seen = {
        (c.expected.alert.severity, c.expected.alert.recommendation) for c in _drafted("SLM-04")
    }
    assert ("critical", "escalate") in seen and ("informational", "log") in seen


def test_slm05_drafts_meet_their_reading_grade() -> None:
    for case in _drafted("SLM-05"):
        assert case.expected.grade_target == case.request["input"]["target_grade"]
        readability = _reviewed(case)["readability"]
        assert readability["within_target"] is True, (case.id, readability)
        assert readability["grade"] <= case.expected.grade_target
        assert case.expected.reference


def test_slm06_criteria_are_the_drafts_in_input_order() -> None:
    for case in _drafted("SLM-06"):
        data = case.request["input"]
        draft = case.expected.draft
        assert draft is not None
        statuses = {c["criterion_id"]: c["status"] for c in draft["criteria"]}
        assert statuses == case.expected.criteria
        assert [c["criterion_id"] for c in draft["criteria"]] == [c["id"] for c in data["criteria"]]
        open_ = {cid for cid, status in statuses.items() if status != "met"}
        assert {g["criterion_id"] for g in draft["evidence_gaps"]} == open_
        assert draft["requested_service"]["code"] == data["requested_service"]["code"]
        assert bool(draft["appeal"]) == bool(data.get("prior_denial"))
    every = {s for c in _drafted("SLM-06") for s in (c.expected.criteria or {}).values()}
    assert every == {"met", "partial", "gap"}


_QUANTITY = re.compile(r"^\s*(<=|>=|<|>)?\s*([-+]?\d[\d,]*(?:\.\d+)?)\s*(.*?)\s*$")


def _same_result(gold: str, value: str, unit: str) -> bool:
    """'7.2 mmol/L' against value '7.20', unit 'mmol/L': the same comparator, number and unit."""
    if gold.strip().casefold() == f"{value} {unit}".strip().casefold():
        return True
    want, got = _QUANTITY.match(gold), _QUANTITY.match(value)
    if want is None or got is None:
        return False
    return (
        want.group(1) == got.group(1)
        and Decimal(want.group(2).replace(",", "")) == Decimal(got.group(2).replace(",", ""))
        and want.group(3).casefold() == unit.casefold()
    )


def test_ext_lab_fields_are_the_drafts_results_as_printed() -> None:
    rewritten = 0
    for case in _drafted("EXT-LAB"):
        report = case.request["input"]["report"]
        fields = case.expected.fields or {}
        results = _reviewed(case)["results"]
        assert [r["test"] for r in results] == list(fields), case.id
        for result in results:
            gold = str(fields[result["test"]])
            assert result["test"] in report
            assert result["verified"] is True, (case.id, result["test"])
            assert _same_result(gold, result["value"], result["unit"]), (gold, result)
            rewritten += gold.split(" ")[0] != result["value"]
    assert rewritten >= 5  # '5.80' gold '5.8', '1,250' gold '1250', ...
    assert _same_result("5.8 mmol/L", "5.80", "mmol/L")
    assert not _same_result("5.8 mmol/L", "5.9", "mmol/L")
    assert not _same_result("<5 ng/L", "5", "ng/L")


def _at(record: dict[str, Any], dotted: str) -> Any:
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def test_ext_ehr_fields_are_the_assembled_record() -> None:
    for case in _drafted("EXT-EHR"):
        draft = _reviewed(case)
        fields = case.expected.fields or {}
        assert fields, case.id
        for name, value in fields.items():
            got = _at(draft["record"], name)
            if isinstance(got, list):  # a list field's gold is its items joined
                got = ", ".join(got)
            assert got == value, (case.id, name)
        assert draft["record_valid"] is (not case.expected.missing), case.id
    first = _drafted("EXT-EHR")[0].expected.fields or {}
    assert (first["lvef_percent"], first["beta_blocker_at_discharge"]) == (30, True)


# ----- images -----------------------------------------------------------------------------


@pytest.mark.parametrize("pair", IMAGED, ids=_id)
def test_images_exist_and_prepare_as_the_task_prepares_them(
    pair: tuple[GoldSet, GoldCase],
) -> None:
    gold, case = pair
    spec = get_task(case.task)
    paths = gold.image_paths(case)
    assert all(p.is_file() and p.parent == IMAGES.resolve() for p in paths), paths
    for path in paths:
        if path.suffix == ".png":
            with Image.open(path) as picture:
                picture.verify()
    assert spec.prepare_images is not None
    prepared = spec.prepare_images(paths, Settings().image_limits())
    if spec.id == "IMG-VOLUME":
        assert (prepared.kind, len(prepared.images)) == ("volume", len(paths)) == ("volume", 8)
    elif spec.id == "IMG-CXR-PRIOR":
        assert (prepared.kind, len(paths)) == ("pair", 2)
    else:
        assert len(prepared.images) == len(paths)
    assert case.expected.reference


def test_image_folder_is_small_and_every_file_is_used() -> None:
    files = sorted(p for p in IMAGES.iterdir() if p.is_file())
    assert sum(p.stat().st_size for p in files) < 1_500_000
    named = {Path(name).name for _, case in IMAGED for name in case.images}
    assert {p.name for p in files} == named


def test_images_regenerate_from_the_script() -> None:
    spec = importlib.util.spec_from_file_location("make_gold_images", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    catalogue: dict[str, bytes] = module.catalogue()
    assert set(catalogue) == {p.name for p in IMAGES.iterdir()}
    for name, data in catalogue.items():
        shipped_bytes = (IMAGES / name).read_bytes()
        if name.endswith(".png"):  # compare pixels: zlib may pack the same pixels differently
            fresh = np.asarray(Image.open(_bytes_io(data)))
            assert np.array_equal(fresh, np.asarray(Image.open(IMAGES / name))), name
        else:
            assert data == shipped_bytes, name


def _bytes_io(data: bytes) -> Any:
    import io

    return io.BytesIO(data)


# ----- broken files -----------------------------------------------------------------------

GOOD = '{"id": "t-1", "task": "SLM-02", "request": {"input": {"note": "Cough."}}}'


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([GOOD, '{"id": "t-2", "task": '], r"^bad\.jsonl line 2: not JSON \("),
        (
            [GOOD, GOOD.replace("SLM-02", "SLM-99").replace("t-1", "t-2")],
            r"^bad\.jsonl line 2: unknown task 'SLM-99' \(coheara tasks",
        ),
        ([GOOD, "// a comment", GOOD], r"^bad\.jsonl line 3: case id t-1 repeated$"),
        (
            [GOOD.replace("}}}", '}}, "expected": {"cods": ["I10"]}}')],
            r"^bad\.jsonl line 1: expected\.cods: Extra inputs are not permitted$",
        ),
        ([], r"^gold set bad\.jsonl has no cases$"),
    ],
    ids=["bad-json", "unknown-task", "repeated-id", "unknown-expected-key", "empty"],
)
def test_a_broken_file_is_one_clear_line(tmp_path: Path, lines: list[str], message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(InvalidRequestError) as caught:
        load(path)
    text = str(caught.value)
    assert re.search(message, text), text
    assert "\n" not in text and "Traceback" not in text
    assert "Cough" not in text  # a line is named, never its text


def test_the_good_line_alone_loads(tmp_path: Path) -> None:
    path = tmp_path / "good.jsonl"
    path.write_text(GOOD + "\n", encoding="utf-8")
    gold = load(path)
    assert [(c.id, c.task) for c in gold.cases] == [("t-1", "SLM-02")]
