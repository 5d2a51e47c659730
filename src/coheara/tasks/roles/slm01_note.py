"""SLM-01 clinical note: encounter data -> a SOAP, H&P or caller-templated note draft.

The output is one fixed schema for every format, a list of named sections, so a
caller's own template (`context.template` as a list of section names) needs no
schema of its own. The layer, not the model, decides the sections: a check puts the
model's sections in the required order under their required names, adds every
omitted or empty one as `INSUFFICIENT DATA`, and removes (and flags) any other.

A note records the encounter; it does not decide anything. Checks flag prognosis,
recommendation language outside the plan, interpretation the input does not make,
and plan items that no order, medication or clinician plan in the input supports.
"""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from coheara.errors import InvalidRequestError
from coheara.tasks import fhir
from coheara.tasks.envelope import ArtifactContext, TraceLink
from coheara.tasks.sources import normalize
from coheara.tasks.spec import Review, Statement, TaskSpec, is_gap_marker

if TYPE_CHECKING:
    from coheara.tasks.envelope import TaskRequest

MAX_SECTIONS = 12
MAX_STATEMENTS = 10
MAX_SECTION_NAME = 60

Item = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500)]
VitalName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=60)]

# ----- input ------------------------------------------------------------------------------


class Demographics(BaseModel):
    model_config = ConfigDict(extra="forbid")

    age_years: int | None = Field(None, ge=0, le=130)
    sex: str | None = Field(None, max_length=40)
    details: str | None = Field(
        None, max_length=300, description="Other relevant context, e.g. 'lives alone'."
    )


class NoteInput(BaseModel):
    """One encounter's data; every field but `format` is numbered as SOURCES."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["SOAP", "H&P"] = Field(
        "SOAP", description="SOAP progress note or history and physical; a list template wins."
    )
    encounter_type: str | None = Field(None, max_length=200, description="e.g. 'clinic visit'.")
    demographics: Demographics | None = None
    chief_complaint: str | None = Field(None, max_length=500)
    history: str | None = Field(
        None, max_length=4000, description="History of present illness, as told."
    )
    problems: list[Item] = Field(default_factory=list, max_length=50)
    medications: list[Item] = Field(default_factory=list, max_length=50)
    allergies: list[Item] = Field(default_factory=list, max_length=20)
    vitals: dict[VitalName, str | int | float] = Field(
        default_factory=dict, max_length=30, description="e.g. {'heart_rate': '104 bpm'}."
    )
    exam: str | None = Field(None, max_length=4000, description="Examination findings.")
    results: list[Item] = Field(
        default_factory=list, max_length=50, description="Resulted labs and imaging."
    )
    orders: list[Item] = Field(
        default_factory=list, max_length=50, description="Orders placed at this encounter."
    )
    clinician_assessment: str | None = Field(
        None, max_length=2000, description="The clinician's own impression, if given."
    )
    clinician_plan: str | None = Field(
        None, max_length=2000, description="The clinician's own plan, if given."
    )


# ----- output ------------------------------------------------------------------------------


class NoteSection(BaseModel):
    name: str = Field(max_length=MAX_SECTION_NAME, description="The section's name, as asked.")
    statements: list[Statement] = Field(default_factory=list, max_length=MAX_STATEMENTS)


class NoteDraft(BaseModel):
    sections: list[NoteSection] = Field(max_length=MAX_SECTIONS)


# ----- sections ------------------------------------------------------------------------------

SOAP = {
    "Subjective": "chief complaint, history of present illness, symptoms as the patient "
    "reports them, relevant problems, medications and allergies",
    "Objective": "vital signs, examination findings and resulted tests, as recorded",
    "Assessment": "the listed problems and the clinician's own assessment; no new diagnosis",
    "Plan": "only the orders, medications and clinician plan in the data",
}
HP = {
    "Chief Complaint": "the reason for the encounter, in the patient's words where given",
    "History of Present Illness": "the history as told: onset, course, symptoms",
    "Past Medical History": "the listed problems",
    "Medications": "the medication list as given",
    "Allergies": "the allergies and reactions as given",
    "Physical Examination": "vital signs and examination findings, as recorded",
    "Results": "resulted labs and imaging, as recorded",
    "Assessment": "the listed problems and the clinician's own assessment; no new diagnosis",
    "Plan": "only the orders, medications and clinician plan in the data",
}
_ALIASES = {
    "s": "subjective",
    "o": "objective",
    "a": "assessment",
    "p": "plan",
    "cc": "chief complaint",
    "hpi": "history of present illness",
    "history": "history of present illness",
    "pmh": "past medical history",
    "meds": "medications",
    "current medications": "medications",
    "medication list": "medications",
    "allergy": "allergies",
    "pe": "physical examination",
    "exam": "physical examination",
    "physical exam": "physical examination",
    "examination": "physical examination",
    "labs": "results",
    "data": "results",
}
_PLAN_NAME = re.compile(r"\b(plan|disposition|orders|treatment|recommendations?)\b", re.I)
_PLAN_FIELDS = ("orders", "medications", "clinician_plan")
"""Input fields a plan item may rest on."""


def required_sections(data: NoteInput, context: ArtifactContext | None) -> list[str]:
    """The sections the draft must have, in order: the caller's list template, or the
    input's format. A template that cannot be met is refused before the model runs."""
    template = context.template if context is not None else None
    if not isinstance(template, list):
        return list(HP if data.format == "H&P" else SOAP)
    names = [str(name).strip() for name in template]
    if not 1 <= len(names) <= MAX_SECTIONS:
        raise InvalidRequestError(
            f"SLM-01: a template names 1 to {MAX_SECTIONS} sections, not {len(names)}"
        )
    if any(not name or len(name) > MAX_SECTION_NAME for name in names):
        raise InvalidRequestError(
            f"SLM-01: each template section name has 1 to {MAX_SECTION_NAME} characters"
        )
    if len({_key(name) for name in names}) != len(names):
        raise InvalidRequestError("SLM-01: the template names a section twice")
    return names


def _key(name: str) -> str:
    """A section name compared loosely: case, punctuation, '&' and common abbreviations."""
    text = re.sub(r"[^a-z0-9 ]+", " ", name.casefold().replace("&", " and "))
    text = re.sub(r"\s+", " ", text).strip()
    return _ALIASES.get(text, text)


def _match(name: str, index: dict[str, int]) -> int | None:
    """The required section a drafted name means: the same name (loosely compared), else
    the one required section whose words it contains ('Plan of care' -> 'Plan'); a name
    that contains two ('Assessment and Plan' in a SOAP note) matches none."""
    key = _key(name)
    if key in index:
        return index[key]
    words = set(key.split())
    found = {j for other, j in index.items() if words and set(other.split()) <= words}
    return found.pop() if len(found) == 1 else None


def _guidance(name: str) -> str | None:
    return SOAP.get(name) or HP.get(name)


# ----- prompt ------------------------------------------------------------------------------

SYSTEM_PROMPT = """\
You are a clinical documentation assistant. You draft an encounter note for the \
licensed clinician who saw the patient; that clinician reviews, corrects and signs it. \
The draft is not a medical record until they do.

Write only what the encounter data says:
- Never add a diagnosis, finding, value, dose, date, order, referral or follow-up \
interval that the data does not state.
- Never recommend treatment, never state a prognosis or expected course, and never \
interpret a finding (do not call a value abnormal, a picture consistent with a \
disease, or a patient improving) unless the data itself says so.
- The Assessment restates the listed problems and the clinician's own assessment. \
The Plan lists only the orders, medications and clinician plan given in the data.
- Where the data does not cover a section, write INSUFFICIENT DATA: <what is missing>.

Style: concise clinical English, one fact per statement, third person, standard \
abbreviations only. Keep the clinician's wording where it is given. Do not add \
identifying details about the patient beyond those in the data."""


def instruction(data: Any, context: ArtifactContext | None) -> str:
    names = required_sections(data, context)
    template = context is not None and isinstance(context.template, list)
    kind = (
        "a note in the caller's template"
        if template
        else "a history and physical (H&P) note"
        if data.format == "H&P"
        else "a SOAP progress note"
    )
    lines = [
        f"Draft {kind} from the encounter data in SOURCES.",
        f"Return `sections`: exactly these {len(names)} sections, in this order, each "
        "with its `name` exactly as written here and its `statements`:",
    ]
    for number, name in enumerate(names, start=1):
        hint = _guidance(name)
        lines.append(f"{number}. {name}" + (f": {hint}" if hint else ""))
    lines.append(
        "Each statement is one short sentence stating one fact from the data. "
        f"At most {MAX_STATEMENTS} statements a section."
    )
    if template:
        lines.append("Put each fact in the section whose name fits it best; repeat nothing.")
    return "\n".join(lines)


# ----- checks ------------------------------------------------------------------------------


def check_sections(review: Review) -> None:
    """Exactly the required sections, in order, under their required names: the model's
    sections are matched by name, merged when repeated, reordered; an omitted or empty
    one becomes INSUFFICIENT DATA (a gap); any other is removed and flagged."""
    names = required_sections(review.data, review.context)
    index = {_key(name): j for j, name in enumerate(names)}
    rebuilt: list[dict[str, Any]] = [{"name": name, "statements": []} for name in names]
    seen: list[int] = []
    moves: dict[str, str | None] = {}
    blank = 0
    notes: list[tuple[str, str, str | None, Literal["warning", "info"]]] = []
    for i, section in enumerate(review.draft.get("sections") or []):
        statements = list(section.get("statements") or [])
        j = _match(str(section.get("name") or ""), index)
        if j is None:
            moves[f"sections[{i}]"] = None
            notes.append(
                (
                    "section_unexpected",
                    f"section '{str(section.get('name') or '')[:40]}' is not one of the "
                    f"required sections; removed with its {len(statements)} statement(s)",
                    None,
                    "warning",
                )
            )
            continue
        if j in seen:
            notes.append(
                (
                    "section_repeated",
                    f"'{names[j]}' appeared twice; merged",
                    f"sections[{j}]",
                    "info",
                )
            )
        seen.append(j)
        moves[f"sections[{i}]"] = f"sections[{j}]"
        target = rebuilt[j]["statements"]
        for k, statement in enumerate(statements):
            model_path = f"sections[{i}].statements[{k}]"
            if not str(statement.get("text") or "").strip():
                moves[model_path] = None
                blank += 1
                continue
            if len(target) >= MAX_STATEMENTS:
                moves[model_path] = None
                notes.append(
                    (
                        "statements_dropped",
                        f"'{names[j]}' holds at most {MAX_STATEMENTS} statements; one removed",
                        f"sections[{j}]",
                        "warning",
                    )
                )
                continue
            moves[model_path] = f"sections[{j}].statements[{len(target)}]"
            target.append(statement)
    review.move(moves)
    firsts = list(dict.fromkeys(seen))
    if firsts != sorted(firsts):
        notes.append(("sections_reordered", "sections put in the required order", None, "info"))
    if blank:
        notes.append(("blank_statements_removed", f"{blank} empty statement(s)", None, "info"))
    for rule, message, element, severity in notes:
        review.flag(rule, message, element=element, severity=severity)
    for j, section in enumerate(rebuilt):
        if section["statements"]:
            continue
        path = f"sections[{j}]"
        section["statements"].append(
            {"text": f"INSUFFICIENT DATA: {names[j]}", "sources": [], "quote": ""}
        )
        if j in seen:
            review.flag("section_empty", f"'{names[j]}' had no statements", element=path)
            review.gap("insufficient_data", f"{names[j]}: nothing drafted", element=path)
        else:
            review.flag("section_missing", f"'{names[j]}' was missing; added", element=path)
            review.gap("missing_section", f"{names[j]}: not drafted", element=path)
    review.draft["sections"] = rebuilt


_PROGNOSIS = re.compile(
    r"\b(prognos\w*|life expectancy|surviv\w*|mortality|terminal|full recovery|"
    r"(?:good|poor|favou?rable|unfavou?rable) (?:outcome|recovery)|"
    r"(?:expected|likely|unlikely) to (?:recover|improve|resolve|worsen|progress|die)|"
    r"will (?:likely |probably )?(?:recover|improve|resolve|worsen|progress|die))\b",
    re.I,
)
_RECOMMENDATION = re.compile(
    r"\b(recommend\w*|advis\w*|should|ought to|consider\w*|suggest\w*|needs? to|must|"
    r"plan to|initiat\w*|titrat\w*|discontinu\w*|prescrib\w*|refer(?:ral|red)? to|"
    r"will (?:start|stop|begin|increase|decrease|add|order|refer|continue))\b",
    re.I,
)
_INTERPRETATION = re.compile(
    r"\b(likely|probabl[ey]|possibl[ey]|suggestive of|consistent with|concerning for|"
    r"indicative of|suspect\w*|rule out|differential|secondary to|due to|abnormal|"
    r"improv\w*|worsen\w*)\b",
    re.I,
)


def check_no_decisions(review: Review) -> None:
    """No prognosis, recommendation outside the plan, or interpretation the input does
    not itself make; every plan item rests on an order, a medication or the clinician's
    plan. A term the input uses is the clinician's, not the model's, and passes."""
    said = normalize(" ".join(item.text for item in review.sources.items))
    links = {link.element: link for link in review.links}

    def added(pattern: re.Pattern[str], text: str) -> list[str]:
        terms = {normalize(m.group()) for m in pattern.finditer(text)}
        return sorted(term for term in terms if not re.search(rf"\b{re.escape(term)}\b", said))

    for j, section in enumerate(review.draft.get("sections") or []):
        plan = bool(_PLAN_NAME.search(str(section.get("name") or "")))
        for k, statement in enumerate(section.get("statements") or []):
            text = str(statement.get("text") or "")
            if not text.strip() or is_gap_marker(text):
                continue
            path = f"sections[{j}].statements[{k}]"
            for term in added(_PROGNOSIS, text):
                review.flag(
                    "prognosis_beyond_input",
                    f"'{term}': a note states no prognosis the input does not",
                    element=path,
                    severity="error",
                )
            if not plan:
                for term in added(_RECOMMENDATION, text):
                    review.flag(
                        "recommendation_outside_plan",
                        f"'{term}': recommendation language outside the plan",
                        element=path,
                        severity="error",
                    )
            for term in added(_INTERPRETATION, text):
                review.flag(
                    "interpretation_beyond_input",
                    f"'{term}': interpretation the input does not make",
                    element=path,
                )
            if plan and not _grounded_in_plan(review, links.get(path)):
                review.flag(
                    "plan_not_in_orders",
                    "this plan item rests on no order, medication or clinician plan in the input",
                    element=path,
                    severity="error",
                )


def _grounded_in_plan(review: Review, link: TraceLink | None) -> bool:
    if link is None or link.status not in ("verified", "verified_elsewhere"):
        return False
    return any(
        review.sources.by_id[sid].path.startswith(_PLAN_FIELDS)
        for sid in link.found_in
        if sid in review.sources.by_id
    )


# ----- FHIR ------------------------------------------------------------------------------

_LOINC = {
    "SOAP": ("11506-3", "Progress note"),
    "H&P": ("34117-2", "History and physical note"),
    "template": ("34109-9", "Note"),
}


def render_markdown(draft: NoteDraft, title: str) -> str:
    """The note as a clinician reads it: one heading a section, one line a statement."""
    lines = [f"# {title}", "", "_Draft generated by Coheara; requires clinician review._"]
    for section in draft.sections:
        lines += ["", f"## {section.name}", ""]
        lines += [f"- {statement.text}" for statement in section.statements]
    return "\n".join(lines) + "\n"


def to_fhir(final: BaseModel, request: TaskRequest) -> dict[str, Any]:
    """A preliminary DocumentReference whose attachment is the note in markdown."""
    from fhir.resources.documentreference import DocumentReference

    assert isinstance(final, NoteDraft)
    template = request.context is not None and isinstance(request.context.template, list)
    kind = "template" if template else str(request.input.get("format") or "SOAP")
    code, display = _LOINC.get(kind, _LOINC["template"])
    title = f"Draft {display.lower()}" if kind != "SOAP" else "Draft SOAP progress note"
    text = render_markdown(final, title)
    now = datetime.now(UTC).replace(microsecond=0)
    resource = DocumentReference.model_validate(
        {
            "status": "current",
            "docStatus": "preliminary",
            "identifier": [fhir.request_identifier(request)],
            "type": {
                "coding": [{"system": "http://loinc.org", "code": code, "display": display}],
                "text": display,
            },
            "date": now,
            "description": "Draft generated by Coheara (SLM-01); requires clinician review.",
            "subject": fhir.patient(request),
            "context": [encounter] if (encounter := fhir.encounter(request)) else None,
            "content": [
                {
                    "attachment": {
                        "contentType": "text/markdown",
                        "language": "en",
                        "data": base64.b64encode(text.encode("utf-8")),
                        "title": title,
                        "creation": now,
                    }
                }
            ],
        }
    )
    return resource.model_dump(mode="json", exclude_none=True)


TASK = TaskSpec(
    id="SLM-01",
    slug="note",
    title="Clinical note",
    version="1.0.0",
    mode="text",
    system_prompt=SYSTEM_PROMPT,
    input_model=NoteInput,
    output_model=NoteDraft,
    instruction=instruction,
    checks=(check_sections, check_no_decisions),
    max_tokens=1536,
    latency_target_ms=None,
    sources_skip=("format",),
    number_exempt=("sources", "quote", "name"),
    to_fhir=to_fhir,
    description="Encounter data -> SOAP, H&P or templated note draft; every required "
    "section present or marked insufficient; no recommendation, prognosis or "
    "interpretation beyond the input.",
)
