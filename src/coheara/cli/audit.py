"""`coheara audit`: verify the trail's chain, export it as FHIR AuditEvents, list and show it;
make a content key, show a record's retained content, purge content past its retention.

Also `audited(settings)`, with which `ask` and `run` record their calls (surface "cli")
when `COHEARA_AUDIT_ENABLED=true`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from coheara.audit import AuditKey, AuditLog, AuditStore, ContentKey, default_key_file, verify
from coheara.audit.export import audit_event, bundle
from coheara.audit.record import iso_time
from coheara.cli.common import err_console, write
from coheara.errors import AuditIntegrityError, ConfigurationError, InvalidRequestError
from coheara.settings import Settings, load_settings

audit_app = typer.Typer(
    help="The audit trail: verify its hash chain, export it as FHIR AuditEvents, list it.",
    no_args_is_help=True,
)

PathOption = Annotated[
    Path | None,
    typer.Option("--path", help="The audit database (default: COHEARA_AUDIT_PATH)."),
]
KeyOption = Annotated[
    Path | None,
    typer.Option(
        "--key-file", help="Its HMAC key (default: COHEARA_AUDIT_KEY_FILE, or beside it)."
    ),
]


@contextmanager
def audited(
    settings: Settings, *, backend: str | None = None, model: str | None = None
) -> Iterator[AuditLog | None]:
    """A CLI command's audit scope where the trail is configured on (off by default):
    attach the yielded log to the engine; a command refused before any model call
    leaves one record too."""
    audit = AuditLog.from_settings(settings, default=False)
    if audit is None:
        yield None
        return
    try:
        with audit.scope(surface="cli", request_id=uuid.uuid4().hex, backend=backend, model=model):
            yield audit
    finally:
        audit.close()


def _open(path: Path | None) -> tuple[Path, Settings]:
    settings = load_settings()
    return (path or settings.audit_path).expanduser(), settings


@audit_app.command("verify")
def verify_command(path: PathOption = None, key_file: KeyOption = None) -> None:
    """Check the hash chain and the head seal; exit 11 at the first broken link."""
    db, settings = _open(path)
    store = AuditStore(db, create=False, readonly=True)
    try:
        key = AuditKey.load(
            key_file or settings.audit_key_file or default_key_file(db), create=False
        )
        with store.snapshot() as (records, head):
            verdict = verify(records, head, key)
    finally:
        store.close()
    if not verdict.intact:
        raise AuditIntegrityError(
            f"audit trail broken at record {verdict.broken_at}: {verdict.reason}",
            hint=f"{verdict.records} record(s) read from {db}",
        )
    write(f"audit trail intact: {verdict.records} record(s), sealed at the last one\n")


@audit_app.command("export")
def export_command(
    path: PathOption = None,
    since: Annotated[
        str | None,
        typer.Option("--since", help="Only records from this time on (ISO 8601, UTC if bare)."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write here (default: standard output).")
    ] = None,
    ndjson: Annotated[
        bool, typer.Option("--ndjson", help="One AuditEvent per line instead of a Bundle.")
    ] = False,
) -> None:
    """Write the records as FHIR R5 AuditEvent JSON: a collection Bundle, or NDJSON."""
    db, _ = _open(path)
    store = AuditStore(db, create=False, readonly=True)
    try:
        records = list(store.iter_records(since=_since(since)))
    finally:
        store.close()
    if ndjson:
        text = "".join(json.dumps(audit_event(r), separators=(",", ":")) + "\n" for r in records)
    else:
        text = json.dumps(bundle(records), indent=2) + "\n"
    if out is None:
        write(text)
    else:
        out.write_text(text, encoding="utf-8")
        err_console.print(f"{len(records)} AuditEvent(s) written to {escape(str(out))}")


@audit_app.command("list")
def list_command(
    path: PathOption = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="The last N records.")] = 20,
) -> None:
    """The last records: when, where from, which task, outcome, tokens, time."""
    db, _ = _open(path)
    store = AuditStore(db, create=False, readonly=True)
    try:
        after = max(0, (store.last_seq() or 0) - limit)
        records = list(store.iter_records(after_seq=after))
    finally:
        store.close()
    table = Table(title=f"audit trail {db}")
    for column in ("seq", "time", "surface", "client", "task", "outcome", "tokens", "ms"):
        table.add_column(column, justify="right" if column in ("seq", "ms") else "left")
    for r in records:
        tokens = f"{r.prompt_tokens}/{r.output_tokens}" if r.prompt_tokens is not None else "-"
        total = f"{r.total_us / 1000:.0f}" if r.total_us is not None else "-"
        row = (str(r.seq), r.time, r.surface, r.client, r.task_id, r.outcome, tokens, total)
        table.add_row(*(escape(v or "-") for v in row))
    Console().print(table)


@audit_app.command("show")
def show_command(
    seq: Annotated[int, typer.Argument(help="The record's sequence number.")],
    path: PathOption = None,
    content: Annotated[
        bool,
        typer.Option("--content", help="Add its retained content, decrypted with the content key."),
    ] = False,
    content_key_file: Annotated[
        Path | None,
        typer.Option(
            "--content-key-file",
            help="The content key (default: COHEARA_AUDIT_CONTENT_KEY_FILE or _KEY).",
        ),
    ] = None,
) -> None:
    """One record, every field, as JSON; with --content, what the call said, decrypted."""
    db, settings = _open(path)
    key = None
    if content:
        key = (
            ContentKey.load(content_key_file)
            if content_key_file is not None
            else ContentKey.from_settings(settings)
        )
        if key is None:
            raise ConfigurationError(
                "no content key is configured",
                hint="give --content-key-file, or set COHEARA_AUDIT_CONTENT_KEY_FILE",
            )
    store = AuditStore(db, create=False, readonly=True)
    try:
        record = store.get(seq)
        stored = store.content(seq) if key is not None else None
    finally:
        store.close()
    if record is None:
        raise InvalidRequestError(f"no audit record {seq} in {db}")
    shown: dict[str, object] = record.row()
    if key is not None:
        if stored is None:
            raise InvalidRequestError(
                f"audit record {seq} has no retained content",
                hint="retention was off for it, or its content was purged",
            )
        shown["content"] = stored.open(key)
    write(json.dumps(shown, indent=2, ensure_ascii=False) + "\n")


@audit_app.command("purge")
def purge_command(
    path: PathOption = None,
    days: Annotated[
        float | None,
        typer.Option(
            "--days",
            min=0,
            help="Purge content older than this (default: COHEARA_AUDIT_RETENTION_DAYS).",
        ),
    ] = None,
) -> None:
    """Delete retained content past its retention period; the records and their chain stay."""
    db, settings = _open(path)
    keep = settings.audit_retention_days if days is None else days
    store = AuditStore(db, create=False)
    try:
        purged = store.purge_content(iso_time(time.time() - keep * 86400.0))
        left = store.content_count()
    finally:
        store.close()
    write(
        f"purged the retained content of {purged} record(s) older than {keep:g} day(s); "
        f"{left} kept\n"
    )


@audit_app.command("content-key")
def content_key_command(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="The new key file (created 0600, never replaced).")
    ],
) -> None:
    """Make a content key (32 random bytes, base64) for COHEARA_AUDIT_CONTENT_KEY_FILE."""
    ContentKey.generate().write(out)
    err_console.print(
        f"content key written to {escape(str(out))} (mode 0600); keep a copy apart from the "
        f"audit trail, then set COHEARA_AUDIT_CONTENT_KEY_FILE={escape(str(out))}",
        soft_wrap=True,
    )


def _since(text: str | None) -> str | None:
    """An ISO 8601 time as the trail stores it (UTC, microseconds), to compare as text."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequestError(
            "--since must be an ISO 8601 date or time, e.g. 2025-01-31 or 2025-01-31T08:00Z"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return iso_time(moment.timestamp())
