"""The audit database: SQLite in WAL mode, its schema versioned with `PRAGMA user_version`.

Opening a database runs the migrations it lacks, in order, each in its own transaction,
so a trail written by an older Coheara is upgraded in place. Appends take the write
lock (`BEGIN IMMEDIATE`), read where the trail ends, link the new records after it and
move the head seal, all in one transaction: several processes (a server, a CLI run)
may append to one trail without breaking the chain. `synchronous=NORMAL` in WAL mode: a
commit is durable against a process crash, and costs no fsync (a power loss may lose
the last commits, never corrupt the chain).

Retained content (version 3) lives in a table of its own, encrypted, outside the chain;
`secure_delete` zeroes what a purge deletes and the purge truncates the WAL after it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Generator, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coheara.audit.chain import GENESIS, Head, link
from coheara.audit.content import ContentKey
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

_CONTENT_V3 = """
CREATE TABLE content (
    seq INTEGER PRIMARY KEY,
    time TEXT NOT NULL,
    key_id TEXT NOT NULL,
    nonce BLOB NOT NULL,
    ciphertext BLOB NOT NULL
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
    # 3: which endpoint answered and after how many failovers; retained content, encrypted,
    # one row per record (its seq and time), outside the chain so that it can be purged.
    (
        "ALTER TABLE records ADD COLUMN endpoint TEXT",
        "ALTER TABLE records ADD COLUMN failovers INTEGER",
        _CONTENT_V3,
        "CREATE INDEX content_time ON content (time)",
    ),
    # 4: the LoRA adapter a call asked for (null: the base model; older records have none).
    ("ALTER TABLE records ADD COLUMN adapter TEXT",),
)
SCHEMA_VERSION = len(MIGRATIONS)
BUSY_TIMEOUT_S = 10.0


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
                f"{path.resolve().as_uri()}?mode=ro",
                uri=True,
                isolation_level=None,
                timeout=BUSY_TIMEOUT_S,
            )
            connection.row_factory = sqlite3.Row
            return connection
        new = create and not path.exists()
        if create:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        connection = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S
        )
        connection.row_factory = sqlite3.Row
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        # Deleted rows (purged content) are overwritten with zeros, not left in free pages.
        connection.execute("PRAGMA secure_delete=ON")
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
        self._checkpoint_pending = False

    def close(self) -> None:
        self._connection.close()

    def append(
        self,
        records: Sequence[AuditRecord],
        key: AuditKey,
        contents: Sequence[bytes | None] | None = None,
        content_key: ContentKey | None = None,
    ) -> None:
        """Link `records` after the trail's end and move the seal, in one transaction;
        `contents`: each record's content document (or None), encrypted with `content_key`
        and bound to the record once its number and hash are known."""
        if not records:
            return
        if contents is not None and (content_key is None or len(contents) != len(records)):
            raise ValueError("contents need a content key and one entry per record")
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
            if contents is not None and content_key is not None:
                sealed = []
                for record, plaintext in zip(records, contents, strict=True):
                    if plaintext is not None:
                        nonce, ciphertext = content_key.encrypt(
                            plaintext, record.seq, record.record_hash
                        )
                        sealed.append(
                            (record.seq, record.time, content_key.key_id, nonce, ciphertext)
                        )
                connection.executemany(
                    "INSERT INTO content (seq, time, key_id, nonce, ciphertext) "
                    "VALUES (?, ?, ?, ?, ?)",
                    sealed,
                )
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

    # ----- retained content -------------------------------------------------------------

    def content(self, seq: int) -> StoredContent | None:
        """Record `seq`'s encrypted content and the record fields it is bound to."""
        if not self._has_content():
            return None
        row = self._connection.execute(
            "SELECT c.seq, r.record_hash, c.key_id, c.nonce, c.ciphertext "
            "FROM content c JOIN records r ON r.seq = c.seq WHERE c.seq = ?",
            (seq,),
        ).fetchone()
        if row is None:
            return None
        return StoredContent(int(row[0]), str(row[1]), str(row[2]), bytes(row[3]), bytes(row[4]))

    def content_count(self) -> int:
        if not self._has_content():
            return 0
        return int(self._connection.execute("SELECT COUNT(*) FROM content").fetchone()[0])

    def _has_content(self) -> bool:
        """Whether the table exists (a trail read, not migrated, may predate version 3)."""
        return self.version() >= 3

    def purge_content(self, before: str) -> int:
        """Delete the content of records that started before `before` (ISO time as the
        records store it); returns how many rows went. With `secure_delete` their pages are
        zeroed, and the WAL is checkpointed and truncated so no old frame keeps them (a
        checkpoint that a reader held up is tried again at the next purge)."""
        if not self._has_content():
            return 0
        with transaction(self._connection):
            deleted = int(
                self._connection.execute("DELETE FROM content WHERE time < ?", (before,)).rowcount
            )
        if deleted or self._checkpoint_pending:
            self._checkpoint_pending = not self.checkpoint()
        return deleted

    def checkpoint(self, wait_s: float = 1.0) -> bool:
        """Copy the WAL into the database and truncate it, waiting at most `wait_s` for
        readers (the writer must not stall); False when one kept it from completing."""
        connection = self._connection
        connection.execute(f"PRAGMA busy_timeout = {int(wait_s * 1000)}")
        try:
            busy = connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        return busy is None or int(busy[0]) == 0


@dataclass(frozen=True)
class StoredContent:
    """A content row as stored: ciphertext, and what decrypting it needs besides the key."""

    seq: int
    record_hash: str
    key_id: str
    nonce: bytes
    ciphertext: bytes

    def open(self, key: ContentKey) -> dict[str, Any]:
        return key.decrypt(self.seq, self.record_hash, self.key_id, self.nonce, self.ciphertext)


def _head(connection: sqlite3.Connection) -> Head | None:
    row = connection.execute("SELECT seq, record_hash, seal FROM head WHERE id = 1").fetchone()
    return Head(int(row[0]), str(row[1]), str(row[2])) if row is not None else None


def _columns(connection: sqlite3.Connection) -> set[str]:
    return {str(row[1]) for row in connection.execute("PRAGMA table_info(records)")}
