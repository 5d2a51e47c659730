"""Audit records as FHIR R5 AuditEvent resources (fhir.resources 8 validates each one).

One AuditEvent per record: `action` E (execute), `occurredPeriod` the call, `outcome`
the FHIR severity code with Coheara's stable code beside it, the calling client and
the model as agents (the model's `network` is the endpoint that answered), Coheara as
the source, and the request as the entity, whose `detail` carries everything else
(task, tokens, timings, validation flags, digests, failovers, the LoRA adapter and the
chain links), so an export holds the whole record and no patient data. Retained content
is never exported.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from coheara import __version__
from coheara.audit.record import AuditRecord

CODE_SYSTEM = "urn:coheara:audit"
FIELD_SYSTEM = "urn:coheara:audit-field"
OUTCOME_SYSTEM = "http://terminology.hl7.org/CodeSystem/audit-event-outcome"
SOURCE_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/security-source-type"
EVENT_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/audit-event-type"
REQUEST_SYSTEM = "urn:coheara:request"
CLIENT_SYSTEM = "urn:coheara:client"

_OUTCOMES = {"ok": ("0", "Success"), "cancelled": ("4", "Minor failure")}
_SERIOUS = {
    "internal_error",
    "configuration_error",
    "backend_error",
    "backend_unavailable",
    "backend_overloaded",
    "backend_timeout",
}

_DETAILS: tuple[tuple[str, str], ...] = (
    ("seq", "valueInteger"),
    ("v", "valueInteger"),
    ("surface", "valueString"),
    ("task_id", "valueString"),
    ("task_version", "valueString"),
    ("prompt_hash", "valueString"),
    ("mode", "valueString"),
    ("images", "valueInteger"),
    ("prompt_tokens", "valueInteger"),
    ("output_tokens", "valueInteger"),
    ("ttft_us", "valueInteger"),
    ("total_us", "valueInteger"),
    ("error_class", "valueString"),
    ("finish_reason", "valueString"),
    ("warnings", "valueInteger"),
    ("attempts", "valueInteger"),
    ("strategy", "valueString"),
    ("key_id", "valueString"),
    ("input_digest", "valueString"),
    ("output_digest", "valueString"),
    ("image_digests", "valueString"),
    ("endpoint", "valueString"),
    ("failovers", "valueInteger"),
    ("adapter", "valueString"),
    ("prev_hash", "valueString"),
    ("record_hash", "valueString"),
)


def outcome_code(outcome: str) -> tuple[str, str]:
    """FHIR's audit-event-outcome: 0 success, 4 the request was refused or abandoned,
    8 the service failed (backend, configuration, internal)."""
    if outcome in _OUTCOMES:
        return _OUTCOMES[outcome]
    if outcome in _SERIOUS:
        return "8", "Serious failure"
    return "4", "Minor failure"


def audit_event(record: AuditRecord) -> dict[str, Any]:
    """One record as a validated FHIR R5 AuditEvent (JSON-ready dict)."""
    from fhir.resources.auditevent import AuditEvent

    started = datetime.fromisoformat(record.time.replace("Z", "+00:00"))
    ended = started + timedelta(microseconds=record.total_us or 0)
    code, display = outcome_code(record.outcome)
    model = ":".join(part for part in (record.backend, record.model) if part) or "unknown"
    client: dict[str, Any] = (
        {"identifier": {"system": CLIENT_SYSTEM, "value": record.client}}
        if record.client
        else {"display": "unauthenticated client"}
    )
    details = [
        {"type": {"coding": [{"system": FIELD_SYSTEM, "code": name}]}, kind: getattr(record, name)}
        for name, kind in _DETAILS
        if getattr(record, name) is not None
    ]
    entity: dict[str, Any] = {
        "role": {"text": "model call"},
        "detail": details,
    }
    if record.request_id:
        entity["what"] = {"identifier": {"system": REQUEST_SYSTEM, "value": record.request_id}}
    resource = {
        "resourceType": "AuditEvent",
        "id": f"coheara-audit-{record.seq}",
        "category": [
            {
                "coding": [
                    {"system": EVENT_TYPE_SYSTEM, "code": "rest", "display": "RESTful Operation"}
                ]
            }
        ],
        "code": {
            "coding": [{"system": CODE_SYSTEM, "code": "model-call", "display": "MedGemma call"}],
            "text": f"{record.surface or 'python'} model call",
        },
        "action": "E",
        "severity": "informational" if record.outcome == "ok" else "notice",
        "occurredPeriod": {"start": _instant(started), "end": _instant(ended)},
        "recorded": _instant(ended),
        "outcome": {
            "code": {"system": OUTCOME_SYSTEM, "code": code, "display": display},
            "detail": [
                {
                    "coding": [{"system": CODE_SYSTEM, "code": record.outcome}],
                    **({"text": record.error_class} if record.error_class else {}),
                }
            ],
        },
        "agent": [
            {"type": {"text": "client"}, "who": client, "requestor": True},
            {
                "type": {"text": "model"},
                "who": {"display": model},
                "requestor": False,
                **_network(record.endpoint),
            },
        ],
        "source": {
            "observer": {"display": f"coheara {__version__}"},
            "type": [
                {
                    "coding": [
                        {"system": SOURCE_TYPE_SYSTEM, "code": "4", "display": "Application Server"}
                    ]
                }
            ],
        },
        "entity": [entity],
    }
    return AuditEvent.model_validate(resource).model_dump(mode="json", exclude_none=True)


def bundle(records: list[AuditRecord]) -> dict[str, Any]:
    """A collection Bundle of the records' AuditEvents, in sequence order."""
    from fhir.resources.bundle import Bundle

    entries = [
        {
            "fullUrl": "urn:uuid:" + str(uuid.uuid5(uuid.NAMESPACE_URL, record.record_hash)),
            "resource": audit_event(record),
        }
        for record in records
    ]
    document = {"resourceType": "Bundle", "type": "collection", "entry": entries}
    return Bundle.model_validate(document).model_dump(mode="json", exclude_none=True)


def _network(endpoint: str | None) -> dict[str, str]:
    """Where the model answered: the endpoint's URL (credentials never stored), or its name."""
    if not endpoint:
        return {}
    return {"networkUri" if "://" in endpoint else "networkString": endpoint}


def _instant(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
