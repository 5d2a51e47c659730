"""What a task request carries in, and what its response carries back.

The response is a draft for a clinician, never a decision: besides the content it
says where each element came from (`trace`), what is missing (`gaps`), what the
checks found (`validation`), how sure the layer is per section (`confidence`,
computed from verified citations, not claimed by the model) and how it was made
(`metadata`: model, prompt version and hash, timings, tokens, strategy).
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

OpaqueId = Annotated[str, StringConstraints(max_length=128, pattern=r"^[A-Za-z0-9._:\-]+$")]
"""An id Coheara echoes back and never interprets (an encounter, a patient scope)."""


class ArtifactContext(BaseModel):
    """What the caller wants the draft to be for, and within which bounds."""

    model_config = ConfigDict(extra="forbid")

    purpose: str | None = Field(None, max_length=500, description="e.g. 'discharge planning'.")
    boundaries: str | None = Field(
        None, max_length=1000, description="What the draft must not do or cover."
    )
    template: (
        Annotated[str, StringConstraints(max_length=2000)]
        | Annotated[list[Annotated[str, StringConstraints(max_length=100)]], Field(max_length=32)]
        | None
    ) = Field(
        None,
        description="Free-text guidance, or the section names the draft must have in order.",
    )


class TaskRequest(BaseModel):
    """The envelope of `POST /v1/tasks/{task_id}`: the same JSON as `coheara run --input`."""

    model_config = ConfigDict(extra="forbid")

    task: str | None = Field(None, max_length=32, description="Task id; the URL's wins.")
    request_id: str = Field(
        default_factory=lambda: uuid.uuid4().hex,
        max_length=128,
        pattern=r"^[A-Za-z0-9._:\-]+$",
        description="Generated when absent; echoed in the response and the audit trail.",
    )
    clinical_event_id: OpaqueId | None = None
    patient_scope_id: OpaqueId | None = None
    agent: str | None = Field(
        None, max_length=128, description="Who or what asked (a user id, a service name)."
    )
    input: dict[str, Any] = Field(description="The task's input, as its input schema says.")
    images: list[str] = Field(
        default_factory=list,
        max_length=256,
        description="Base64 images (DICOM or pictures) for an imaging task; several DICOM "
        "files of one series make one volume.",
    )
    context: ArtifactContext | None = None
    fhir: bool = Field(False, description="Also return the draft as FHIR R5 resources.")
    max_tokens: int | None = Field(None, ge=1, le=8192)
    adapter: str | None = Field(
        None,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]*$",
        description="A registered LoRA adapter (`coheara adapters list`) trained for this "
        "task, applied to this request only; the Transformers backend only (vLLM serves an "
        "exported adapter under its own model name instead). Absent: the base model.",
    )


class Finding(BaseModel):
    """One check's outcome on one element of the draft."""

    rule: str = Field(description="e.g. quote_unverified, number_not_in_input, code_not_billable")
    severity: Literal["error", "warning", "info"]
    element: str | None = Field(None, description="Path in the draft, e.g. assessment[1].text.")
    message: str


class Gap(BaseModel):
    """Something the draft could not say from the input."""

    kind: Literal[
        "insufficient_data",
        "documentation_gap",
        "evidence_gap",
        "missing_section",
        "unsupported_statement",
    ]
    element: str | None = None
    detail: str = Field(max_length=500)


class TraceLink(BaseModel):
    """One cited element of the draft and what its citation was found to be."""

    element: str
    sources: list[str] = Field(description="The ids the model cited.")
    quote: str = ""
    status: Literal["verified", "verified_elsewhere", "unverified", "uncited", "unknown_source"]
    found_in: list[str] = Field(
        default_factory=list, description="The ids where the quote was actually found."
    )


class SectionConfidence(BaseModel):
    statements: int = Field(description="Cited elements in the section.")
    verified_share: float | None = Field(
        default=None, description="Share of them whose quote was found in the input."
    )
    level: Literal["high", "medium", "low", "unknown"]


class Validation(BaseModel):
    passed: bool = Field(description="No finding of severity error.")
    findings: list[Finding] = Field(default_factory=list)


class TaskMetadata(BaseModel):
    task_version: str
    prompt_hash: str = Field(
        description="sha256 (16 hex) of the task id, version, system prompt and citation rules."
    )
    model: str
    backend: str
    adapter: str | None = Field(None, description="The LoRA adapter the draft was made with.")
    strategy: str = Field(description="whole, repaired or field_by_field (see ExtractionResult).")
    revisions: int = Field(0, description="Bounded re-asks a task made (e.g. reading grade).")
    processing_ms: float
    time_to_first_token_ms: float | None
    latency_target_ms: int | None
    within_target: bool | None
    prompt_tokens: int
    output_tokens: int
    attempts: int
    warnings: list[str] = Field(default_factory=list)
    images: list[dict[str, Any]] = Field(default_factory=list)


class TaskResponse(BaseModel):
    task_id: str
    request_id: str
    clinical_event_id: str | None = None
    patient_scope_id: str | None = None
    status: Literal["draft"] = Field(
        default="draft", description="Always a draft: a clinician reviews it before any use."
    )
    requires_review: Literal[True] = True
    draft: dict[str, Any]
    confidence: dict[str, SectionConfidence] = Field(default_factory=dict)
    gaps: list[Gap] = Field(default_factory=list)
    trace: list[TraceLink] = Field(default_factory=list)
    validation: Validation
    metadata: TaskMetadata
    fhir: dict[str, Any] | None = Field(
        default=None,
        description="A FHIR R5 resource (or a Bundle) built from the draft, on request.",
    )
