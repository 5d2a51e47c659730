"""SLM-03 handoff: a patient's state at shift change -> an I-PASS or SBAR handoff draft.

One schema serves both formats; the format changes what the prompt asks each part to
hold and how a reader labels it:

    draft field        I-PASS                               SBAR
    illness_severity   Illness severity (only as stated)    -
    summary            Patient summary                      Situation, Background
    changes            (part of the patient summary)        Assessment: what changed
    actions            Action list                          Recommendation
    concerns           Situation awareness, contingency     Assessment: concerns

The receiver's synthesis (I-PASS's last S) is the receiver's to say, not drafted.

Enforced in code, whatever the model writes: illness severity is the input's own words
or nothing (the model never ranks acuity); every open item and pending result from the
input is carried into the action list; every action has an owner or is marked
UNASSIGNED as a gap.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from coheara.tasks.envelope import TraceLink
from coheara.tasks.sources import SourceItem, normalize
from coheara.tasks.spec import POINT_OF_CARE_MS, Review, Statement, TaskSpec, is_gap_marker

MAX_ACTIONS = 10
UNASSIGNED = "UNASSIGNED"

Item = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500)]

# ----- input ------------------------------------------------------------------------------


class HandoffInput(BaseModel):
    """A patient's state at handoff; every field but `format` is numbered as SOURCES."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["I-PASS", "SBAR"] = "I-PASS"
    patient_summary: str | None = Field(
        None, max_length=1000, description="One-line summary: age, reason for admission, day."
    )
    illness_severity: str | None = Field(
        None,
        max_length=100,
        description="As the handing-off clinician states it (e.g. stable, watcher, unstable). "
        "Never inferred: without it the draft has none.",
    )
    code_status: str | None = Field(None, max_length=100)
    allergies: list[Item] = Field(default_factory=list, max_length=20)
    problems: list[Item] = Field(default_factory=list, max_length=30)
    active_orders: list[Item] = Field(default_factory=list, max_length=50)
    vital_trends: list[Item] = Field(
        default_factory=list, max_length=30, description="e.g. 'HR 88 at 08:00 -> 112 at 16:00'."
    )
    medication_changes: list[Item] = Field(default_factory=list, max_length=30)
    recent_events: list[Item] = Field(
        default_factory=list, max_length=30, description="Events since the last handoff."
    )
    pending_results: list[Item] = Field(default_factory=list, max_length=30)
    open_items: list[Item] = Field(
        default_factory=list, max_length=30, description="Open items from the prior handoff."
    )


# ----- output ------------------------------------------------------------------------------


class HandoffAction(Statement):
    owner: str = Field(
        max_length=80,
        description="Who does it: the role the data names (e.g. 'night nurse'), else UNASSIGNED.",
    )


class HandoffDraft(BaseModel):
    illness_severity: Statement | None = Field(
        None, description="Only when the data states it, in its own words."
    )
    summary: list[Statement] = Field(max_length=4)
    changes: list[Statement] = Field(
        default_factory=list, max_length=6, description="What changed since the last handoff."
    )
    actions: list[HandoffAction] = Field(max_length=MAX_ACTIONS)
    concerns: list[Statement] = Field(default_factory=list, max_length=5)


# ----- prompt ------------------------------------------------------------------------------

SYSTEM_PROMPT = """\
You are a clinical handoff assistant. You draft a shift handoff for the clinician who \
is handing off; they check and correct it before giving it to the receiving clinician. \
It is a draft, never an order.

Write only what the patient data says:
- Never rank, estimate or change illness severity or acuity. Give illness severity only \
when the data states it, in the data's own words; otherwise leave it out.
- Never add a diagnosis, value, dose, time, threshold, order or contingency plan that \
the data does not state.
- Carry every open item from the prior handoff and every pending result into the \
action list. Each action names its owner as the data names it; if the data names no \
owner, write UNASSIGNED.
- Keep what changed since the last handoff (new events, vital sign trends, medication \
changes) separate from the stable background.
- Where the data does not cover something a handoff needs, write INSUFFICIENT DATA: \
<what is missing>.

Style: short, factual clinical English a busy receiver can read aloud in a minute; \
standard abbreviations only; one fact per statement."""

_PARTS = {
    "I-PASS": (
        "Draft an I-PASS handoff from the patient data in SOURCES.",
        "illness_severity: the illness severity exactly as the data states it; leave it "
        "out if the data does not state one",
        "summary: the patient summary (who, why admitted, key problems, code status)",
        "changes: what changed since the last handoff",
        "actions: the action list: every open item and pending result, each with owner",
        "concerns: situation awareness and contingencies, only as the data states them",
    ),
    "SBAR": (
        "Draft an SBAR handoff from the patient data in SOURCES.",
        "illness_severity: leave it out unless the data states it",
        "summary: Situation and Background (who, why admitted, key problems, code status)",
        "changes: Assessment, part 1: what changed since the last handoff",
        "actions: Recommendation: every open item and pending result, each with owner",
        "concerns: Assessment, part 2: concerns the data states",
    ),
}


def instruction(data: Any, context: Any) -> str:
    head, *parts = _PARTS[data.format]
    lines = [head, "Fill these fields:", *(f"- {part}" for part in parts)]
    lines.append("Each statement is one short sentence stating one fact from the data.")
    return "\n".join(lines)


# ----- checks ------------------------------------------------------------------------------


_LISTS = ("summary", "changes", "actions", "concerns")


def check_blank(review: Review) -> None:
    """Elements that say nothing are removed (the trace follows the rest to their new
    places); a handoff without a patient summary says so as a gap."""
    moves: dict[str, str | None] = {}
    removed = 0
    for part in _LISTS:
        kept: list[dict[str, Any]] = []
        for index, element in enumerate(review.draft.get(part) or []):
            if str(element.get("text") or "").strip():
                moves[f"{part}[{index}]"] = f"{part}[{len(kept)}]"
                kept.append(element)
            else:
                moves[f"{part}[{index}]"] = None
                removed += 1
        review.draft[part] = kept
    review.move(moves)
    if removed:
        review.flag("blank_elements_removed", f"{removed} empty element(s)", severity="info")
    if not review.draft["summary"]:
        review.draft["summary"] = [
            {"text": "INSUFFICIENT DATA: patient summary", "sources": [], "quote": ""}
        ]
        review.gap("missing_section", "patient summary: not drafted", element="summary[0]")


def check_severity(review: Review) -> None:
    """Illness severity is the input's own words, cited, or absent: whatever the model
    wrote is replaced by the input's statement, or removed when the input has none."""
    element = "illness_severity"
    stated = (review.data.illness_severity or "").strip()
    drafted = review.draft.get(element)
    text = str((drafted or {}).get("text") or "").strip()
    ranked = bool(text) and not is_gap_marker(text)
    review.move({element: None})  # what the shared checks said of the model's words
    if not stated:
        review.draft[element] = None
        if ranked:
            review.flag(
                "severity_not_in_input",
                "illness severity removed: the input states none, and the model never ranks acuity",
                element=element,
            )
        if review.data.format == "I-PASS":
            review.gap(
                "insufficient_data",
                "illness severity: not stated in the input",
                element=element,
            )
        return
    source = next(item for item in review.sources.items if item.path == element)
    review.draft[element] = {"text": stated, "sources": [source.id], "quote": stated[:300]}
    review.links.append(
        TraceLink(
            element=element,
            sources=[source.id],
            quote=stated[:300],
            status="verified",
            found_in=[source.id],
        )
    )
    if not ranked:
        review.flag(
            "severity_from_input",
            "illness severity filled in from the input",
            element=element,
            severity="info",
        )
    elif normalize(text) != normalize(stated):
        review.flag(
            "severity_replaced",
            "illness severity replaced by the input's own words",
            element=element,
        )


def check_carried(review: Review) -> None:
    """Every open item and pending result of the input is in the draft: one the model
    dropped is added back to the action list, in the input's own words. An entry long
    enough to be split into sentences counts as carried when any of them is cited."""
    carried = {
        sid
        for link in review.links
        if link.status in ("verified", "verified_elsewhere")
        for sid in link.found_in
    }
    entries: dict[str, list[SourceItem]] = {}
    for item in review.sources.items:
        entry = item.path.split("#", 1)[0]
        if entry.split("[", 1)[0] in _CARRIED:
            entries.setdefault(entry, []).append(item)
    actions: list[dict[str, Any]] = review.draft.setdefault("actions", [])
    for entry, items in entries.items():
        ids = [item.id for item in items]
        if carried & set(ids):
            continue
        label, what = _CARRIED[entry.split("[", 1)[0]]
        if len(actions) >= MAX_ACTIONS:
            review.flag(
                "item_not_carried",
                f"{ids[0]} ({what}) is not in the draft and the action list is full",
                element="actions",
                severity="error",
            )
            continue
        path = f"actions[{len(actions)}]"
        text = " ".join(item.text for item in items)
        quote = items[0].text[:300]
        actions.append(
            {
                "text": f"{label}: {text}"[:600],
                "owner": UNASSIGNED,
                "sources": ids[:6],
                "quote": quote,
            }
        )
        review.links.append(
            TraceLink(
                element=path, sources=ids[:6], quote=quote, status="verified", found_in=[ids[0]]
            )
        )
        review.flag(
            "item_restored",
            f"{ids[0]} ({what}) was missing from the draft; added to the action list",
            element=path,
        )


_CARRIED = {
    "open_items": ("Open item from prior handoff", "open item"),
    "pending_results": ("Pending result", "pending result"),
}


def check_owners(review: Review) -> None:
    """Every action has an owner; a blank one becomes UNASSIGNED, a gap to resolve at
    the handoff itself."""
    for index, action in enumerate(review.draft.get("actions") or []):
        owner = str(action.get("owner") or "").strip()
        if owner.upper().startswith(UNASSIGNED) or not owner:
            action["owner"] = UNASSIGNED
            review.gap(
                "documentation_gap",
                "this action has no owner: assign one at handoff",
                element=f"actions[{index}].owner",
            )


_ACUITY = re.compile(
    r"\b(unstable|stable|watcher|critical(?:ly ill)?|guarded|tenuous|sickest|"
    r"deteriorat\w*|decompensat\w*|high[- ]acuity|low[- ]acuity|high[- ]risk|low[- ]risk)\b",
    re.I,
)


def check_acuity(review: Review) -> None:
    """Acuity words the input does not use are the model ranking the patient: flagged."""
    said = normalize(" ".join(item.text for item in review.sources.items))
    for part in _LISTS:
        for index, element in enumerate(review.draft.get(part) or []):
            text = str(element.get("text") or "")
            if is_gap_marker(text):
                continue
            for term in sorted({normalize(m.group()) for m in _ACUITY.finditer(text)}):
                if not re.search(rf"\b{re.escape(term)}\b", said):
                    review.flag(
                        "acuity_not_in_input",
                        f"'{term}': acuity the input does not state",
                        element=f"{part}[{index}]",
                    )


TASK = TaskSpec(
    id="SLM-03",
    slug="handoff",
    title="Shift handoff",
    version="1.0.0",
    mode="text",
    system_prompt=SYSTEM_PROMPT,
    input_model=HandoffInput,
    output_model=HandoffDraft,
    instruction=instruction,
    checks=(check_blank, check_severity, check_carried, check_owners, check_acuity),
    max_tokens=1024,
    latency_target_ms=POINT_OF_CARE_MS,
    sources_skip=("format",),
    number_exempt=("sources", "quote"),
    description="Patient state -> I-PASS or SBAR handoff draft; severity only as the input "
    "states it; every open item and pending result carried as an action with an owner.",
)
