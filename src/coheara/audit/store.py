"""The audit database: SQLite in WAL mode, its schema versioned with `PRAGMA user_version`.

Opening a database runs the migrations it lacks, in order, each in its own transaction,
so a trail written by an older Coheara is upgraded in place. Appends take the write
lock (`BEGIN IMMEDIATE`), read where the trail ends, link the new records after it and
move the head seal, all in one transaction: several processes (a server, a CLI run)
may append to one trail without breaking the chain. `synchronous=NORMAL` in WAL mode: a
commit is durable against a process crash, and costs no fsync (a power loss may lose
the last commits, never corrupt the chain).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Generator, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path

from coheara.audit.chain import GENESIS, Head, link
from coheara.audit.digest import AuditKey
from coheara.audit.record import COLUMNS, AuditRecord
from coheara.errors import ConfigurationError

_RECORDS_V1 = """
CREATE TABLE records (
    seq INTEGER PRIMARY KEY,
    v INTEGER NOT NULL,
    time TEXT NOT NULL,
    request_id TEXT,
    client TEXT,
    surface TEXT,
    task_id TEXT,
    task_version TEXT,
    prompt_hash TEXT,
    backend TEXT,
    model TEXT,
    mode TEXT,
    images INTEGER,
    prompt_tokens INTEGER,
    output_tokens INTEGER,
    ttft_us INTEGER,
    total_us INTEGER,
    outcome TEXT NOT NULL,
    error_class TEXT,
    finish_reason TEXT,
    warnings INTEGER,
    attempts INTEGER,
    strategy TEXT,
    key_id TEXT NOT NULL,
    input_digest TEXT,
    output_digest TEXT,
    prev_hash TEXT NOT NULL,
    record_hash TEXT NOT NULL
)
"""
_HEAD_V1 = """
CREATE TABLE head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    record_hash TEXT NOT NULL,
    seal TEXT NOT NULL
)
"""

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: the records and the sealed head.
    (_RECORDS_V1, _HEAD_V1),
    # 2: each image's own digest; export --since reads by time.
    (
        "ALTER TABLE records ADD COLUMN image_digests TEXT",
        "CREATE INDEX records_time ON records (time)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


def connect(path: Path, *, create: bool = True, readonly: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, NORMAL sync;
    `readonly`: for reading only (verify, export), which never migrates or writes."""
    path = path.expanduser()
    if (readonly or not create) and not path.is_file():
        raise ConfigurationError(
            f"no audit trail at {path}", hint="set COHEARA_AUDIT_PATH to the trail's database"
        )
    try:
        if readonly:
            connection = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None, timeout=10.0
            )
            connection.row_factory = sqlite3.Row
            return connection
        new = create and not path.exists()
        if create:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        connection = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=10.0
        )
        connection.row_factory = sqlite3.Row
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        if new:  # the journal files SQLite makes beside it take the same permissions
            path.chmod(0o600)
    except (OSError, sqlite3.Error) as exc:
        raise ConfigurationError(
            f"cannot open the audit trail {path} ({type(exc).__name__})",
            hint="set COHEARA_AUDIT_PATH to a writable place",
        ) from None
    return connection


def _check_version(connection: sqlite3.Connection) -> int:
    version = int(connection.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise ConfigurationError(
            f"the audit trail is at schema version {version}; this Coheara knows {SCHEMA_VERSION}",
            hint="upgrade Coheara",
        )
    return version


def migrate(connection: sqlite3.Connection, *, upto: int = SCHEMA_VERSION) -> int:
    """Run the migrations the database lacks (up to `upto`); returns the version now."""
    version = _check_version(connection)
    for number in range(version + 1, upto + 1):
        with transaction(connection):
            current = int(connection.execute("PRAGMA user_version").fetchone()[0])
            if current >= number:  # another process migrated meanwhile
                continue
            for statement in MIGRATIONS[number - 1]:
                connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {number}")
    return max(version, upto)


@contextmanager
def transaction(connection: sqlite3.Connection, kind: str = "IMMEDIATE") -> Iterator[None]:
    connection.execute(f"BEGIN {kind}")
    try:
        yield
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


class AuditStore:
    """Append and read records of one database."""

    def __init__(self, path: Path, *, create: bool = True, readonly: bool = False) -> None:
        self.path = path.expanduser()
        self._connection = connect(self.path, create=create, readonly=readonly)
        try:
            version = _check_version(self._connection) if readonly else migrate(self._connection)
        except sqlite3.Error as exc:
            self._connection.close()
            raise ConfigurationError(
                f"cannot read the audit trail {self.path} ({type(exc).__name__})",
                hint="is it an audit database? (COHEARA_AUDIT_PATH)",
            ) from None
        except ConfigurationError:
            self._connection.close()
            raise
        if version < 1:
            self._connection.close()
            raise ConfigurationError(f"{self.path} is not an audit trail (no schema)")
        self._columns = _columns(self._connection)

    def close(self) -> None:
        self._connection.close()

    def append(self, records: Sequence[AuditRecord], key: AuditKey) -> None:
        """Link `records` after the trail's end and move the seal, in one transaction."""
        if not records:
            return
        connection = self._connection
        names = [c for c in COLUMNS if c in self._columns]
        insert = (
            f"INSERT INTO records ({', '.join(names)}) VALUES ({', '.join('?' for _ in names)})"
        )
        with transaction(connection):
            head = _head(connection)
            seq, previous = (head.seq, head.record_hash) if head else (0, GENESIS)
            rows = []
            for record in records:
                seq += 1
                link(record, seq, previous)
                previous = record.record_hash
                row = record.row()
                rows.append([row[name] for name in names])
            connection.executemany(insert, rows)
            connection.execute(
                "INSERT INTO head (id, seq, record_hash, seal) VALUES (1, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, "
                "record_hash = excluded.record_hash, seal = excluded.seal",
                (seq, previous, key.seal(seq, previous)),
            )

    @contextmanager
    def snapshot(self) -> Iterator[tuple[Generator[AuditRecord, None, None], Head | None]]:
        """Every record in sequence order and the head, read in one transaction."""
        with transaction(self._connection, "DEFERRED"):
            head = _head(self._connection)
            records = self.iter_records()
            try:
                yield records, head
            finally:
                records.close()  # a verdict may stop reading early

    def iter_records(
        self, *, since: str | None = None, after_seq: int = 0, limit: int | None = None
    ) -> Generator[AuditRecord, None, None]:
        query = "SELECT * FROM records WHERE seq > ?"
        parameters: list[object] = [after_seq]
        if since is not None:
            query += " AND time >= ?"
            parameters.append(since)
        query += " ORDER BY seq"
        if limit is not None:
            query += " LIMIT ?"
            parameters.append(limit)
        with closing(self._connection.execute(query, parameters)) as cursor:
            for row in cursor:
                yield AuditRecord.from_row(dict(row))

    def get(self, seq: int) -> AuditRecord | None:
        row = self._connection.execute("SELECT * FROM records WHERE seq = ?", (seq,)).fetchone()
        return AuditRecord.from_row(dict(row)) if row is not None else None

    def last_seq(self) -> int | None:
        row = self._connection.execute("SELECT MAX(seq) FROM records").fetchone()
        return int(row[0]) if row and row[0] is not None else None

    def count(self) -> int:
        return int(self._connection.execute("SELECT COUNT(*) FROM records").fetchone()[0])

    def version(self) -> int:
        return int(self._connection.execute("PRAGMA user_version").fetchone()[0])


def _head(connection: sqlite3.Connection) -> Head | None:
    row = connection.execute("SELECT seq, record_hash, seal FROM head WHERE id = 1").fetchone()
    return Head(int(row[0]), str(row[1]), str(row[2])) if row is not None else None


def _columns(connection: sqlite3.Connection) -> set[str]:
    return {str(row[1]) for row in connection.execute("PRAGMA table_info(records)")}
