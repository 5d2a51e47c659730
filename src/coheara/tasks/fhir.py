"""What every FHIR form of a draft shares: patient and encounter by opaque id, a Bundle.

Resources are FHIR R5 (fhir.resources 8) and always drafts (preliminary, provisional,
draft status): a clinician reviews them before anything is filed.
"""

from __future__ import annotations

import uuid
from typing import Any

from coheara.tasks.envelope import TaskRequest


def patient(request: TaskRequest) -> dict[str, Any] | None:
    """The patient a resource is about: the request's opaque patient scope, as an identifier
    (it is not known to be a FHIR Patient id), never a name; None without one."""
    return _by_identifier("urn:coheara:patient-scope", request.patient_scope_id)


def subject(request: TaskRequest) -> dict[str, Any]:
    """`patient(request)` for a resource that must name its subject: a display saying so
    when the request gives no patient scope."""
    return patient(request) or {"display": "patient of this request (no patient scope given)"}


def encounter(request: TaskRequest) -> dict[str, Any] | None:
    """The request's clinical event, by its opaque id; None without one."""
    return _by_identifier("urn:coheara:clinical-event", request.clinical_event_id)


def _by_identifier(system: str, value: str | None) -> dict[str, Any] | None:
    """A logical reference by the caller's opaque id (not known to be a FHIR resource id)."""
    return {"identifier": {"system": system, "value": value}} if value else None


REQUEST_SYSTEM = "urn:coheara:request"
"""The identifier system of the request a resource was drafted for (its request_id)."""


def request_identifier(request: TaskRequest) -> dict[str, Any]:
    return {"system": REQUEST_SYSTEM, "value": request.request_id}


def bundle(request: TaskRequest, resources: list[dict[str, Any]]) -> dict[str, Any]:
    """A collection Bundle of draft resources, with stable urn:uuid ids per request."""
    from fhir.resources.bundle import Bundle

    entries = [
        {
            "fullUrl": "urn:uuid:"
            + str(uuid.uuid5(uuid.NAMESPACE_URL, f"coheara:{request.request_id}:{i}")),
            "resource": resource,
        }
        for i, resource in enumerate(resources)
    ]
    resource = Bundle.model_validate(
        {
            "resourceType": "Bundle",
            "type": "collection",
            "identifier": request_identifier(request),
            "entry": entries or None,
        }
    )
    return resource.model_dump(mode="json", exclude_none=True)
