"""What every FHIR form of a draft shares: the subject by opaque id, a collection Bundle.

Resources are FHIR R5 (fhir.resources 8) and always drafts (preliminary, provisional,
draft status): a clinician reviews them before anything is filed.
"""

from __future__ import annotations

import uuid
from typing import Any

from coheara.tasks.envelope import TaskRequest


def subject(request: TaskRequest) -> dict[str, Any]:
    """The patient a resource is about: the request's opaque patient scope, as an identifier
    (it is not known to be a FHIR Patient id), never a name."""
    if request.patient_scope_id:
        return {
            "identifier": {"system": "urn:coheara:patient-scope", "value": request.patient_scope_id}
        }
    return {"display": "patient of this request (no patient scope given)"}


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
            "identifier": {"system": "urn:coheara:request", "value": request.request_id},
            "entry": entries or None,
        }
    )
    return resource.model_dump(mode="json", exclude_none=True)
