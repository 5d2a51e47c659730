"""One audit record: what an engine call was, never what it said.

Identifiers, counts, timings, codes and keyed digests only: no text, no image, no file
name, no warning text (their count), no exception message (the error's class and
stable code). A caller's free-text identifier is stored as its keyed digest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

from coheara.access.egress import public_url
from coheara.audit.digest import AuditKey
from coheara.engine.engine import CallRecord
from coheara.engine.result import ExtractionResult

RECORD_FORMAT = 1
SURFACES = frozenset({"native", "tasks", "openai", "ollama", "cli", "python"})


@dataclass
class AuditRecord:
    """A row of the `records` table; `seq`, `prev_hash` and `record_hash` are set on append."""

    time: str
    """When the call started, UTC, ISO 8601 with microseconds."""
    outcome: str
    """"ok", "cancelled", or the error's stable code (invalid_image, backend_timeout, ...)."""
    key_id: str
    """Which key made the digests."""
    seq: int = 0
    v: int = RECORD_FORMAT
    request_id: str | None = None
    client: str | None = None
    """The API key's name, never the key."""
    surface: str | None = None
    task_id: str | None = None
    task_version: str | None = None
    prompt_hash: str | None = None
    backend: str | None = None
    model: str | None = None
    mode: str | None = None
    """text, image or extract; None when the call was refused before its input was read."""
    images: int | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    ttft_us: int | None = None
    total_us: int | None = None
    error_class: str | None = None
    finish_reason: str | None = None
    warnings: int | None = None
    attempts: int | None = None
    strategy: str | None = None
    input_digest: str | None = None
    output_digest: str | None = None
    image_digests: str | None = None
    """A JSON array of each image's digest, in prompt order (schema version 2)."""
    endpoint: str | None = None
    """Which backend endpoint answered (a replica's URL, without credentials; version 3)."""
    failovers: int | None = None
    """How many endpoints failed before the one that answered (version 3)."""
    adapter: str | None = None
    """The LoRA adapter the call asked for, by its registered name; None: the base model
    alone (version 4)."""
    prev_hash: str = ""
    record_hash: str = ""

    def hashed_fields(self) -> dict[str, Any]:
        """What the record hash covers: every field but the hash itself, nulls left out (so a
        column added by a later schema version leaves older records' hashes unchanged)."""
        return {
            name: value
            for name in COLUMNS
            if (value := getattr(self, name)) is not None and name != "record_hash"
        }

    def row(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in COLUMNS}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> AuditRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in known})

    @property
    def image_digest_list(self) -> list[str]:
        return json.loads(self.image_digests) if self.image_digests else []


COLUMNS = tuple(f.name for f in fields(AuditRecord))


def build(
    call: CallRecord, key: AuditKey, backend: str | None = None, model: str | None = None
) -> AuditRecord:
    """The record of one engine call; the digests are computed here (off the event loop)."""
    context = call.context
    result = call.result
    turns = call.turns
    image_digests = key.image_digests(turns) if turns else []
    outcome, error_class = call.outcome, call.error_class
    record = AuditRecord(
        time=iso_time(call.started_at),
        outcome=outcome,
        key_id=key.key_id,
        request_id=key.token(context.request_id),
        client=key.token(context.client),
        surface=_surface(context.surface, key),
        task_id=key.token(context.task_id),
        task_version=key.token(context.task_version),
        prompt_hash=key.token(context.prompt_hash),
        backend=(result.backend if result is not None else backend),
        model=result.model if result is not None else model,
        mode=_mode(call, len(image_digests)),
        images=len(image_digests) if turns else None,
        total_us=round(call.duration_s * 1e6),
        error_class=error_class,
        input_digest=key.input_digest(turns, call.schema, image_digests) if turns else None,
        image_digests=json.dumps(image_digests, separators=(",", ":")) if image_digests else None,
        adapter=key.token(call.adapter),
    )
    if result is not None:
        record.prompt_tokens = result.prompt_tokens
        record.output_tokens = result.output_tokens
        if result.time_to_first_token_s is not None:
            record.ttft_us = round(result.time_to_first_token_s * 1e6)
        record.finish_reason = result.finish_reason
        record.warnings = len(result.warnings)
        record.attempts = result.attempts
        if isinstance(result, ExtractionResult):
            record.strategy = result.strategy
        record.output_digest = key.output_digest(result)
        record.endpoint = endpoint_name(getattr(result, "endpoint", None))
        failovers = getattr(result, "failovers", None)
        record.failovers = failovers if isinstance(failovers, int) and failovers >= 0 else None
    return record


def endpoint_name(endpoint: object) -> str | None:
    """An endpoint as a record keeps it (`public_url`): never credentials or tokens."""
    return None if endpoint is None else (public_url(str(endpoint)) or None)


def iso_time(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _surface(surface: str | None, key: AuditKey) -> str:
    if surface is None:
        return "python"
    return surface if surface in SURFACES else key.token(surface) or "python"


def _mode(call: CallRecord, images: int) -> str | None:
    if call.schema is not None:
        return "extract"
    if not call.turns:
        return None
    return "image" if images else "text"
