"""SLM-05 plain language: clinical text rewritten for a patient at a target reading grade.

What the layer enforces, whatever the model writes:

- The reading grade is computed (Flesch-Kincaid, `coheara.tasks.readability`), never
  taken from the model: the output schema the model sees has no grade field; the check
  writes `readability` into the draft. Above the target, the task asks again (at most
  `MAX_REVISIONS` times) and reports the grade the last draft reached.
- Glossary terms must occur in the clinical text (whole words, case folded, a plural
  `s`/`es` tolerated); one that does not is removed from the draft and flagged. Each
  kept term is traced to the items that hold it.
- Numbers and drug names are preserved: a number of the clinical text missing from the
  plain text is flagged (spelled-out one ... twelve count; numbers inside dates are
  exempt, since "3/14/2025" may become "March 14, 2025"); a drug name of the text
  missing from the plain text is flagged, and a drug name the text does not contain is
  flagged as an error. There is no drug list on premises, so drug names are found by a
  documented heuristic (`drug_names`): INN stems (-pril, -sartan, -olol, -statin, -mab,
  -nib, -parin, -xaban, -cillin, -mycin, -oxacin, ...) and a short list of common drugs
  whose names carry no stem (warfarin, insulin, aspirin, ...). A brand name without such
  a stem is not recognised.
- MedGemma 1.5 is English only: a `target_language` other than English, or a clinical
  text or context that asks for a translation, is refused with `TaskRefusedError`.
"""

from __future__ import annotations

import base64
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from coheara.errors import REFUSAL, TaskRefusedError
from coheara.tasks import fhir
from coheara.tasks.envelope import ArtifactContext, TaskRequest, TraceLink
from coheara.tasks.readability import flesch_kincaid
from coheara.tasks.sources import normalize, numbers_in
from coheara.tasks.spec import POINT_OF_CARE_MS, Review, Statement, TaskSpec, is_gap_marker

VERSION = "1.0.0"
DEFAULT_GRADE = 6.0
MAX_REVISIONS = 2

ENGLISH_ONLY = (
    "MedGemma 1.5 is English-only: plain-language drafts are written in English. Have the "
    "reviewed English text translated by a qualified medical interpreter or translation "
    "service"
)

_LANGUAGES = (
    "spanish|french|german|italian|portuguese|chinese|mandarin|cantonese|japanese|korean|"
    "arabic|hindi|urdu|bengali|bangla|punjabi|gujarati|tamil|telugu|marathi|nepali|russian|"
    "ukrainian|polish|czech|slovak|romanian|hungarian|greek|turkish|hebrew|farsi|persian|"
    "dari|pashto|vietnamese|tagalog|filipino|thai|khmer|lao|burmese|hmong|indonesian|malay|"
    "swahili|somali|amharic|tigrinya|yoruba|igbo|hausa|haitian creole|creole|dutch|swedish|"
    "norwegian|danish|finnish|navajo|albanian|serbian|croatian|bosnian"
)
_TRANSLATION_REQUEST = re.compile(
    rf"\btranslat(?:e|ion|ing)\b[^.\n]{{0,60}}?\b(?:in|into|to)\s+(?:{_LANGUAGES})\b"
    rf"|(?:^|[.!?:\n]\s*)(?:please\s+)?(?:write|rewrite|explain|answer|respond|reply|provide|"
    rf"give|produce|output)\b[^.\n]{{0,80}}?\b(?:in|into)\s+(?:{_LANGUAGES})\b"
    rf"|\b(?:{_LANGUAGES})\s+(?:version|translation)\b",
    re.IGNORECASE,
)
"""An explicit request for another language: "translate ... into Spanish", an imperative
"write/explain ... in French", "a Vietnamese version". A clinical record that says what
happened ("explained to the patient in Spanish via interpreter") is not a request."""

_ENGLISH = re.compile(r"^(?:en|eng|english)(?:[-_][A-Za-z]{2,3})?$", re.IGNORECASE)


def asks_for_translation(text: str) -> bool:
    return bool(_TRANSLATION_REQUEST.search(text))


# ----- input and output ------------------------------------------------------------------


class PlainLanguageInput(BaseModel):
    """Clinical text to explain, and for whom."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(
        min_length=1,
        max_length=8000,
        description="The clinical text to explain: a discharge summary, a result, a plan.",
    )
    target_grade: float = Field(
        DEFAULT_GRADE,
        ge=1,
        le=14,
        description="US school reading grade to write at or below (Flesch-Kincaid).",
    )
    audience: str | None = Field(
        None,
        max_length=200,
        description="Who will read it, e.g. 'the patient', 'a parent of a young child'.",
    )
    target_language: str = Field(
        "en",
        max_length=35,
        description="Only English: MedGemma 1.5 is English-only; anything else is refused.",
    )

    @field_validator("target_language")
    @classmethod
    def _english_only(cls, value: str) -> str:
        if not _ENGLISH.match(value.strip()):
            raise PydanticCustomError(REFUSAL, ENGLISH_ONLY)
        return value

    @field_validator("text")
    @classmethod
    def _no_translation(cls, value: str) -> str:
        if asks_for_translation(value):
            raise PydanticCustomError(REFUSAL, "the text asks for a translation. " + ENGLISH_ONLY)
        return value


class GlossaryEntry(BaseModel):
    """A medical term kept in the plain text, explained."""

    term: str = Field(
        min_length=1,
        max_length=80,
        description="A medical word or phrase copied exactly from the clinical text.",
    )
    meaning: str = Field(max_length=240, description="What it means, in everyday words.")


class Readability(BaseModel):
    """Computed by Coheara from `plain_text`, never written by the model."""

    method: Literal["flesch_kincaid"] = "flesch_kincaid"
    grade: float | None = Field(description="Flesch-Kincaid grade of plain_text.")
    target: float
    within_target: bool | None
    words: int
    sentences: int


class PlainLanguageDraft(BaseModel):
    plain_text: str = Field(
        max_length=4000,
        description="The clinical text rewritten in plain English: short sentences, "
        "everyday words, every number, dose, date and drug name kept exactly.",
    )
    glossary: list[GlossaryEntry] = Field(
        default_factory=list,
        max_length=12,
        description="Medical terms that remain in plain_text, each copied from the text.",
    )
    explain_in_person: list[Statement] = Field(
        default_factory=list,
        max_length=6,
        description="What a clinician should explain face to face (a new diagnosis, a "
        "risk, a complex schedule), each citing where the text says it.",
    )
    accuracy_flags: list[Statement] = Field(
        default_factory=list,
        max_length=6,
        description="Places where plain wording may lose a detail that matters, citing it.",
    )
    readability: SkipJsonSchema[Readability | None] = Field(
        None, description="Filled by Coheara (Flesch-Kincaid), not by the model."
    )


# ----- prompt ----------------------------------------------------------------------------

SYSTEM_PROMPT = """\
You are a clinical writer who turns clinical text into plain English for patients and \
their families. Your output is a DRAFT: a clinician reviews and corrects it before any \
patient sees it.

How to write:
- Short sentences (about 10 to 15 words). Everyday words of one or two syllables. Active \
voice. Speak to the reader as "you".
- Keep every number, dose, unit, date, time and drug name exactly as the clinical text \
writes it. Never round, convert or drop one.
- Where a medical word must stay, keep it and explain it in the glossary.

Never:
- add a fact, diagnosis, cause, prognosis, risk, advice or instruction the text does not \
contain;
- reassure ("nothing to worry about") or alarm beyond what the text says;
- change what the text says is certain or uncertain;
- write in any language other than English.
If the text is unclear or incomplete, say so plainly and flag it; do not guess."""


def _instruction(data: Any, context: ArtifactContext | None) -> str:
    assert isinstance(data, PlainLanguageInput)
    _refuse_translation_context(context)
    grade = _grade_text(data.target_grade)
    audience = data.audience or "the patient"
    return (
        f"Rewrite the clinical text in SOURCES in plain English for {audience}, at US "
        f"school reading grade {grade} or below.\n"
        "- plain_text: the whole message, in order, nothing added. Keep every number, dose, "
        "date and drug name exactly.\n"
        "- glossary: each medical term you keep, copied exactly from the text, with its "
        "meaning in everyday words.\n"
        "- explain_in_person: what a clinician should explain face to face.\n"
        "- accuracy_flags: where plain wording may lose a detail that matters.\n"
        "The citation rules below apply to explain_in_person and accuracy_flags."
    )


def _refuse_translation_context(context: ArtifactContext | None) -> None:
    if context is None:
        return
    template = context.template
    texts = [context.purpose or "", context.boundaries or ""]
    texts += template if isinstance(template, list) else [template or ""]
    if any(asks_for_translation(text) for text in texts):
        raise TaskRefusedError(
            "SLM-05 context asks for a translation; " + ENGLISH_ONLY,
            hint="remove the translation request from the context",
        )


def _grade_text(grade: float) -> str:
    return f"{grade:g}"


# ----- checks ----------------------------------------------------------------------------


def check_reading_grade(review: Review) -> None:
    """Compute the grade of plain_text and write it into the draft, with a finding."""
    data = review.data
    assert isinstance(data, PlainLanguageInput)
    text = str(review.draft.get("plain_text") or "")
    stats = flesch_kincaid(text) if not is_gap_marker(text) else flesch_kincaid("")
    target = data.target_grade
    within = None if stats.grade is None else stats.grade <= target
    review.draft["readability"] = Readability(
        grade=stats.grade,
        target=target,
        within_target=within,
        words=stats.words,
        sentences=stats.sentences,
    ).model_dump(mode="json")
    if stats.grade is None:
        review.flag(
            "reading_grade_unknown",
            "plain_text has no words: no reading grade",
            element="plain_text",
            severity="warning",
        )
    elif within:
        review.flag(
            "reading_grade",
            f"Flesch-Kincaid grade {stats.grade:.1f}, target {_grade_text(target)}",
            element="plain_text",
            severity="info",
        )
    else:
        review.flag(
            "reading_grade_above_target",
            f"Flesch-Kincaid grade {stats.grade:.1f} is above the target {_grade_text(target)}",
            element="plain_text",
            severity="warning",
        )


def _term_pattern(term: str) -> re.Pattern[str]:
    """A whole-word match of the normalized term, singular or plural (s, es, y/ies)."""
    base = normalize(term)
    if len(base) > 4 and base.endswith("ies"):
        stem = re.escape(base[:-3]) + "(?:y|ies)"
    elif len(base) > 3 and base.endswith("s"):
        stem = re.escape(re.sub(r"e?s$", "", base)) + "(?:e?s)?"
    elif base.endswith("y"):
        stem = re.escape(base[:-1]) + "(?:y|ies)"
    else:
        stem = re.escape(base) + "(?:e?s)?"
    return re.compile(r"(?<!\w)" + stem + r"(?!\w)")


def check_glossary(review: Review) -> None:
    """Every glossary term must occur in the clinical text; others are removed, flagged."""
    entries = review.draft.get("glossary") or []
    kept: list[Any] = []
    for index, entry in enumerate(entries):
        term = str(entry.get("term") or "") if isinstance(entry, dict) else ""
        element = f"glossary[{index}]"
        pattern = _term_pattern(term) if term.strip() else None
        found = (
            [
                item.id
                for item in review.sources.items
                if item.path.split("#")[0] == "text" and pattern.search(normalize(item.text))
            ]
            if pattern is not None
            else []
        )
        if not found:
            review.flag(
                "glossary_term_not_in_source",
                "the glossary term does not occur in the clinical text: removed",
                element=element,
                severity="warning",
            )
            continue
        review.links.append(
            TraceLink(
                element=f"glossary[{len(kept)}]",
                sources=found[:6],
                quote=term,
                status="verified",
                found_in=found,
            )
        )
        kept.append(entry)
    if "glossary" in review.draft:
        review.draft["glossary"] = kept


_NUMBER_WORDS = {
    word: str(value)
    for value, word in enumerate(
        [
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
        ]
    )
}
_DATE = re.compile(r"\b\d{1,4}[/\-.]\d{1,2}[/\-.]\d{1,4}\b")


def _numbers_kept(text: str) -> set[str]:
    spelled = re.sub(
        r"\b(" + "|".join(_NUMBER_WORDS) + r")\b",
        lambda m: _NUMBER_WORDS[m.group(1).lower()],
        text,
        flags=re.IGNORECASE,
    )
    return numbers_in(spelled)


def check_numbers_kept(review: Review) -> None:
    """A number of the clinical text (not inside a date) missing from plain_text."""
    data = review.data
    assert isinstance(data, PlainLanguageInput)
    plain = str(review.draft.get("plain_text") or "")
    if is_gap_marker(plain) or not plain.strip():
        return
    wanted = numbers_in(_DATE.sub(" ", data.text))
    missing = sorted(wanted - _numbers_kept(plain), key=lambda n: (len(n), n))
    if missing:
        review.flag(
            "number_dropped",
            f"{', '.join(missing[:8])} from the clinical text does not appear in the plain "
            "text: check that no dose, value or date was lost",
            element="plain_text",
            severity="warning",
        )


DRUG_STEMS = (
    "pril",
    "sartan",
    "olol",
    "alol",
    "statin",
    "mab",
    "nib",
    "parin",
    "xaban",
    "gatran",
    "cillin",
    "mycin",
    "micin",
    "oxacin",
    "cycline",
    "azole",
    "conazole",
    "vir",
    "dipine",
    "semide",
    "thiazide",
    "profen",
    "prazole",
    "tidine",
    "gliflozin",
    "gliptin",
    "glutide",
    "formin",
    "glinide",
    "lukast",
    "afil",
    "triptan",
    "azepam",
    "azolam",
    "oxetine",
    "triptyline",
    "pramine",
    "apine",
    "peridone",
    "peridol",
    "osin",
    "terol",
    "tropium",
    "codone",
    "morphone",
    "caine",
    "platin",
    "taxel",
    "rubicin",
    "limus",
    "grel",
    "grelor",
    "isone",
    "asone",
    "olone",
    "onide",
    "tadine",
    "setron",
    "dronate",
    "lamide",
    "barbital",
    "vudine",
    "navir",
    "tegravir",
)
"""INN stems that end many drug names (WHO's stem book): -pril ACE inhibitors, -olol beta
blockers, -statin, -mab antibodies, ... A word is taken as a drug when it ends with one
and has at least three letters before it (so "April" and "Nib" are not)."""

COMMON_DRUGS = frozenset(
    [
        "warfarin",
        "insulin",
        "aspirin",
        "heparin",
        "digoxin",
        "amiodarone",
        "levothyroxine",
        "lithium",
        "morphine",
        "acetaminophen",
        "paracetamol",
        "naproxen",
        "allopurinol",
        "spironolactone",
        "nitroglycerin",
        "gabapentin",
        "pregabalin",
        "tramadol",
        "methotrexate",
        "colchicine",
        "clonidine",
        "hydralazine",
        "furosemide",
        "bumetanide",
        "torsemide",
        "metformin",
        "prednisone",
        "dexamethasone",
        "hydrocortisone",
        "amoxicillin",
        "penicillin",
        "vancomycin",
        "ceftriaxone",
        "cefazolin",
        "cephalexin",
        "doxycycline",
        "nitrofurantoin",
        "trimethoprim",
        "sulfamethoxazole",
        "fentanyl",
        "hydromorphone",
        "oxycodone",
        "naloxone",
        "buprenorphine",
        "methadone",
        "lorazepam",
        "diazepam",
        "midazolam",
        "haloperidol",
        "quetiapine",
        "sertraline",
        "fluoxetine",
        "citalopram",
        "escitalopram",
        "bupropion",
        "mirtazapine",
        "trazodone",
        "ondansetron",
        "metoclopramide",
        "omeprazole",
        "pantoprazole",
        "famotidine",
        "levetiracetam",
        "phenytoin",
        "valproate",
        "carbamazepine",
        "lamotrigine",
        "topiramate",
        "tacrolimus",
        "cyclosporine",
        "mycophenolate",
        "hydroxychloroquine",
        "adalimumab",
        "albuterol",
        "salbutamol",
        "ipratropium",
        "tiotropium",
        "montelukast",
        "epinephrine",
        "norepinephrine",
        "dopamine",
        "dobutamine",
        "vasopressin",
    ]
)
"""Common drugs whose names carry no stem above, or that are worth naming outright."""

_DRUG_STEM = re.compile(r"\b([a-z]{3,}(?:" + "|".join(DRUG_STEMS) + r"))\b")
_NOT_DRUGS = frozenset({"cholesterol"})
"""Ordinary words that end like a drug stem."""
_WORD = re.compile(r"[a-z][a-z\-]+")


def drug_names(text: str) -> set[str]:
    """Drug-like words of a text, lower case (the heuristic in the module docstring)."""
    lowered = text.lower()
    found = {m.group(1) for m in _DRUG_STEM.finditer(lowered)}
    found |= {w for w in _WORD.findall(lowered) if w in COMMON_DRUGS}
    return found - _NOT_DRUGS


def check_drug_names(review: Review) -> None:
    """Drug names of the text kept in plain_text; none added that the text lacks."""
    data = review.data
    assert isinstance(data, PlainLanguageInput)
    source = drug_names(data.text)
    plain = str(review.draft.get("plain_text") or "")
    if plain.strip() and not is_gap_marker(plain):
        dropped = sorted(source - drug_names(plain))
        if dropped:
            review.flag(
                "drug_name_dropped",
                f"{len(dropped)} drug name(s) of the clinical text are missing from the "
                f"plain text: {', '.join(dropped[:6])}",
                element="plain_text",
                severity="warning",
            )
    for path, text in _draft_texts(review.draft):
        added = sorted(drug_names(text) - source)
        if added:
            review.flag(
                "drug_name_not_in_source",
                f"names a drug the clinical text does not: {', '.join(added[:4])}",
                element=path,
                severity="error",
            )


def _draft_texts(draft: dict[str, Any]) -> list[tuple[str, str]]:
    out = [("plain_text", str(draft.get("plain_text") or ""))]
    for section in ("glossary", "explain_in_person", "accuracy_flags"):
        for index, entry in enumerate(draft.get(section) or []):
            if not isinstance(entry, dict):
                continue
            for key in ("meaning", "text"):
                if isinstance(entry.get(key), str):
                    out.append((f"{section}[{index}].{key}", entry[key]))
    return out


def revise(review: Review) -> str | None:
    """Ask again while the computed grade is above the target."""
    readability = review.draft.get("readability") or {}
    grade, target = readability.get("grade"), readability.get("target")
    if grade is None or target is None or grade <= target:
        return None
    keep = [f.message for f in review.findings if f.rule in ("number_dropped", "drug_name_dropped")]
    return (
        f"Your plain_text reads at US school grade {grade:.1f} (Flesch-Kincaid); the target "
        f"is grade {_grade_text(target)} or below. Rewrite it with shorter sentences (about "
        "10 words) and shorter, everyday words; move medical words you must keep into the "
        "glossary. Keep every number, dose, date and drug name exactly. Add nothing. "
        + (" ".join(keep) + " " if keep else "")
        + "Reply with the whole JSON object again."
    )


# ----- FHIR ------------------------------------------------------------------------------


def to_fhir(draft: BaseModel, request: TaskRequest) -> dict[str, Any]:
    """A preliminary DocumentReference holding the plain text (patient education)."""
    from fhir.resources.documentreference import DocumentReference

    assert isinstance(draft, PlainLanguageDraft)
    grade = draft.readability.grade if draft.readability else None
    resource = DocumentReference.model_validate(
        {
            "status": "current",
            "docStatus": "preliminary",
            "identifier": [fhir.request_identifier(request)],
            "subject": fhir.patient(request),
            "context": [encounter] if (encounter := fhir.encounter(request)) else None,
            "type": {"text": "Plain-language explanation for a patient (draft)"},
            "description": f"Draft by {TASK.id} {TASK.version}"
            + (f"; Flesch-Kincaid grade {grade:.1f}" if grade is not None else ""),
            "content": [
                {
                    "attachment": {
                        "contentType": "text/plain; charset=utf-8",
                        "language": "en",
                        "title": "Plain-language explanation (draft, needs clinician review)",
                        "data": base64.b64encode(draft.plain_text.encode("utf-8")).decode(),
                    }
                }
            ],
        }
    )
    return resource.model_dump(mode="json", exclude_none=True)


TASK = TaskSpec(
    id="SLM-05",
    slug="plain-language",
    title="Plain-language explanation",
    version=VERSION,
    mode="text",
    system_prompt=SYSTEM_PROMPT,
    input_model=PlainLanguageInput,
    output_model=PlainLanguageDraft,
    instruction=_instruction,
    checks=(check_reading_grade, check_glossary, check_numbers_kept, check_drug_names),
    revise=revise,
    max_revisions=MAX_REVISIONS,
    max_tokens=1536,
    latency_target_ms=POINT_OF_CARE_MS,
    sources_skip=("target_grade", "audience", "target_language"),
    to_fhir=to_fhir,
    description="Clinical text -> plain English at a target reading grade (computed "
    "Flesch-Kincaid, re-asked when above), glossary of terms found in the text, items to "
    "explain in person, accuracy flags; numbers and drug names checked as kept.",
)
