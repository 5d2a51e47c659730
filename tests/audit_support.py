"""Audit trails for the tests: written as an older schema version left them (the
migration tests), and checked the way `coheara audit verify` checks them."""

from __future__ import annotations

from pathlib import Path

from coheara.audit.chain import GENESIS, link, verify
from coheara.audit.digest import AuditKey
from coheara.audit.record import AuditRecord
from coheara.audit.store import AuditStore, connect, migrate


def write_old_trail(
    path: Path, key: AuditKey, record: AuditRecord, *, version: int, later: tuple[str, ...]
) -> None:
    """A one-record, sealed trail at schema `version`; `later` names the columns that
    versions after it added (left out of the row, as that version had no such column)."""
    connection = connect(path)
    assert migrate(connection, upto=version) == version
    link(record, 1, GENESIS)
    row = {k: v for k, v in record.row().items() if k not in later}
    connection.execute(
        f"INSERT INTO records ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})",
        list(row.values()),
    )
    connection.execute(
        "INSERT INTO head (id, seq, record_hash, seal) VALUES (1, 1, ?, ?)",
        (record.record_hash, key.seal(1, record.record_hash)),
    )
    connection.close()


def verdict(path: Path, key_file: Path | None = None) -> tuple[int | None, str]:
    """(first broken record, why) of the trail at `path`, read-only; (None, "") when it
    verifies. The key defaults to the one beside the database."""
    key = AuditKey.load(key_file or path.with_suffix(".key"), create=False)
    store = AuditStore(path, readonly=True)
    try:
        with store.snapshot() as (records, head):
            result = verify(records, head, key)
    finally:
        store.close()
    return result.broken_at, result.reason
