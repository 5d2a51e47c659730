"""`/readyz`: whether this service can take traffic now, for a load balancer or orchestrator.

Ready means at least one backend endpoint is healthy and, when an audit trail is attached,
its writer is alive (a call that cannot be audited must not be taken). A single backend is
asked its `health()` within a short bound; a pool of replicas answers from the state its
health loop keeps (probing only endpoints never checked), so a probe every second costs
the replicas nothing. `/healthz` stays the cheap liveness check.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from coheara.server.common import ServerState

router = APIRouter(tags=["health"])


class EndpointReport(BaseModel):
    name: str = Field(description="The endpoint's URL without credentials, or the backend name.")
    healthy: bool | None = Field(description="None: not checked yet.")
    in_flight: int = Field(description="Model calls in flight on this endpoint.")
    consecutive_failures: int = Field(description="Failed calls since its last success.")


class ReadinessReport(BaseModel):
    status: Literal["ready", "unavailable"]
    endpoints: list[EndpointReport]
    audit_ok: bool | None = Field(
        description="Whether the audit trail's writer is alive; null when no trail is attached."
    )


@router.get(
    "/readyz",
    response_model=ReadinessReport,
    responses={
        503: {
            "model": ReadinessReport,
            "description": "Not ready: no backend endpoint is healthy, or the audit writer "
            "has stopped",
        }
    },
    summary="Readiness: a healthy backend endpoint and a live audit writer",
)
async def readyz(request: Request) -> JSONResponse:
    """200 when the service can take traffic, 503 otherwise; the body says why."""
    state: ServerState = request.app.state.coheara
    bound = state.settings.connect_timeout_s + 1
    endpoints = await state.engine.backend.readiness(bound)
    audit = getattr(request.app.state, "audit", None)
    audit_ok = audit.alive if audit is not None else None
    ready = any(e.healthy for e in endpoints) and audit_ok is not False
    report = ReadinessReport(
        status="ready" if ready else "unavailable",
        endpoints=[
            EndpointReport(
                name=e.name,
                healthy=e.healthy,
                in_flight=e.in_flight,
                consecutive_failures=e.consecutive_failures,
            )
            for e in endpoints
        ],
        audit_ok=audit_ok,
    )
    return JSONResponse(report.model_dump(), status_code=200 if ready else 503)
