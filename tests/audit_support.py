"""Writing an audit trail as an older schema version left it, for the migration tests."""

from __future__ import annotations

from pathlib import Path

from coheara.audit.chain import GENESIS, link
from coheara.audit.digest import AuditKey
from coheara.audit.record import AuditRecord
from coheara.audit.store import connect, migrate


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
