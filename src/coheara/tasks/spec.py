"""A task is data plus small functions: this is their shape, and the pieces drafts share.

A role module declares one `TASK = TaskSpec(...)`: its id, version, mode, system
prompt, input and output models, how the instruction is written from the input,
the checks that run on the draft (`checks`, which may correct it in code, such as
never downgrading a critical alert), an optional bounded re-ask (`revise`), the
generation defaults, the latency target and an optional FHIR mapping.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, Field, StringConstraints

from coheara.tasks.envelope import ArtifactContext, Finding, Gap, TraceLink

if TYPE_CHECKING:
    from coheara.imaging.limits import ImageLimits
    from coheara.imaging.prepare import Prepared
    from coheara.tasks.envelope import TaskRequest
    from coheara.tasks.sources import Sources

Mode = Literal["text", "image", "extract"]

POINT_OF_CARE_MS = 3000
"""The founding spec's target for point-of-care tasks on a GPU."""

SourceId = Annotated[str, StringConstraints(pattern=r"^S[1-9][0-9]{0,3}$")]


class Cited(BaseModel):
    """The fields every element that states something carries: what it rests on."""

    sources: list[SourceId] = Field(
        default_factory=list,
        max_length=6,
        description="Ids of the SOURCES items this rests on, e.g. ['S3'].",
    )
    quote: str = Field(
        "", max_length=300, description="Words copied exactly from one of those items."
    )


class Statement(Cited):
    """One sentence of a draft with its evidence."""

    text: str = Field(max_length=600)


GAP_MARKERS = ("INSUFFICIENT DATA", "DOCUMENTATION GAP", "EVIDENCE GAP")


def is_gap_marker(text: str) -> bool:
    """Whether a text is the model saying what is missing (`INSUFFICIENT DATA: x`...):
    a gap, not a claim to check."""
    return text.strip().upper().startswith(GAP_MARKERS)


CITATION_RULES = (
    "Use only the SOURCES below. For every statement, put the ids of the SOURCES items it "
    "rests on in `sources` and copy a short phrase from one of them, word for word, into "
    "`quote`. Never invent values, doses, dates or findings. Where the sources do not say "
    "something a section needs, write `INSUFFICIENT DATA: <what is missing>` as its text, "
    "with no sources."
)


@dataclass
class Review:
    """What the checks see and may change: the draft (a plain dict, corrected in place),
    the input, its sources, the trace so far, and the lists they add to."""

    spec: TaskSpec
    data: Any
    """The validated input model."""
    sources: Sources
    draft: dict[str, Any]
    context: ArtifactContext | None = None
    links: list[TraceLink] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)

    def flag(
        self,
        rule: str,
        message: str,
        *,
        element: str | None = None,
        severity: Literal["error", "warning", "info"] = "warning",
    ) -> None:
        self.findings.append(
            Finding(rule=rule, severity=severity, element=element, message=message)
        )

    def gap(self, kind: Any, detail: str, *, element: str | None = None) -> None:
        self.gaps.append(Gap(kind=kind, element=element, detail=detail[:500]))

    def status(self, element: str) -> str:
        """The trace status of one cited element ("uncited" when it has no link)."""
        return next((link.status for link in self.links if link.element == element), "uncited")

    def move(self, moves: Mapping[str, str | None]) -> None:
        """After a check moved, merged or removed elements of the draft, re-path the trace,
        findings and gaps that speak of an element (or of what lies inside it) to its new
        path, all moves at once so that a reorder cannot collide; the longest moved path
        an element lies in wins. An element moved to None was removed: what was said
        about it goes too (the draft no longer states it)."""

        def where(element: str | None) -> tuple[bool, str | None]:
            old = max((path for path in moves if _within(element, path)), key=len, default=None)
            if element is None or old is None:
                return True, element
            new = moves[old]
            return (False, None) if new is None else (True, new + element[len(old) :])

        def moved(items: list[_Located]) -> list[_Located]:
            return [
                item.model_copy(update={"element": element})
                for item in items
                for keep, element in [where(item.element)]
                if keep
            ]

        self.links[:] = moved(self.links)
        self.findings[:] = moved(self.findings)
        self.gaps[:] = moved(self.gaps)

    def reindex(self, section: str, mapping: dict[int, int | None]) -> None:
        """After a check removed, merged or reordered the entries of `draft[section]`, make
        the trace, findings and gaps point at the entries' new places. An entry mapped to
        None was removed: its links and gaps go (the draft no longer states it); its
        findings stay, without an element, naming the model's item."""
        removed = [f"{section}[{old}]" for old, new in mapping.items() if new is None]
        self.findings[:] = [
            finding.model_copy(
                update={
                    "element": None,
                    "message": f"(model's {finding.element}, removed) {finding.message}",
                }
            )
            if any(_within(finding.element, path) for path in removed)
            else finding
            for finding in self.findings
        ]
        self.move(
            {
                f"{section}[{old}]": None if new is None else f"{section}[{new}]"
                for old, new in mapping.items()
            }
        )

    def verified(self, element_prefix: str) -> bool:
        """Whether every cited element under `element_prefix` has a verified quote."""
        links = [link for link in self.links if _within(link.element, element_prefix)]
        return bool(links) and all(
            link.status in ("verified", "verified_elsewhere") for link in links
        )


_Located = TypeVar("_Located", TraceLink, Finding, Gap)


def _within(element: str | None, path: str) -> bool:
    """Whether `element` is the draft element at `path` or lies inside it."""
    return element is not None and (element == path or element.startswith((path + ".", path + "[")))


Check = Callable[[Review], None]
"""A check reads the review, adds findings and gaps, and may correct `review.draft`."""


@dataclass(frozen=True)
class TaskSpec:
    id: str
    """`SLM-01` ... `SLM-06`, `IMG-...`, `EXT-...`."""
    slug: str
    """Short name for files and URLs: the example is `examples/{id.lower()}-{slug}.json`."""
    title: str
    version: str
    mode: Mode
    system_prompt: str
    input_model: type[BaseModel]
    output_model: type[BaseModel]
    instruction: Callable[[Any, ArtifactContext | None], str]
    """The task-specific part of the user turn, from the validated input and the context;
    the citation rules and the numbered SOURCES follow it."""
    checks: tuple[Check, ...] = ()
    revise: Callable[[Review], str | None] | None = None
    """After the checks: a follow-up instruction when the draft must be asked for again
    (at most `max_revisions` times), else None."""
    max_revisions: int = 0
    max_tokens: int = 1024
    temperature: float = 0.0
    latency_target_ms: int | None = POINT_OF_CARE_MS
    """None: best effort (long EHR context)."""
    sources_skip: tuple[str, ...] = ()
    """Input fields that are settings, not clinical content (not numbered): top-level names
    or dotted paths (`requested_service.urgency`)."""
    number_exempt: tuple[str, ...] = ("sources", "quote", "code", "rank", "confidence")
    """Draft keys whose numbers are not checked against the input (ids, codes, ranks)."""
    to_fhir: Callable[[BaseModel, TaskRequest], dict[str, Any]] | None = None
    prepare_images: Callable[[list[Any], ImageLimits], Prepared] | None = None
    """How an imaging task turns its images into what the model sees (default
    `coheara.imaging.prepare`; a prior/current comparison uses `prepare_pair`)."""
    description: str = ""

    @property
    def prompt_hash(self) -> str:
        """Travels with every result: which exact prompt made a draft."""
        digest = hashlib.sha256()
        for part in (self.id, self.version, self.system_prompt, CITATION_RULES):
            digest.update(part.encode("utf-8") + b"\0")
        return digest.hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """What `GET /v1/tasks` and `coheara tasks` show."""
        return {
            "id": self.id,
            "slug": self.slug,
            "title": self.title,
            "version": self.version,
            "mode": self.mode,
            "description": self.description,
            "prompt_hash": self.prompt_hash,
            "latency_target_ms": self.latency_target_ms,
            "input_schema": self.input_model.model_json_schema(),
            "output_schema": self.output_model.model_json_schema(),
        }
