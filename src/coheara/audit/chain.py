"""The hash chain: each record's hash covers its fields and the hash of the record before.

    record_hash = SHA-256(canonical JSON of the record's fields, `prev_hash` and `seq`
                          included, nulls left out)

The first record's `prev_hash` is 64 zeros. Editing, deleting, reordering or inserting
a record breaks the link at that point. Whoever can write the database could still
rehash everything after an edit, or cut the tail; the head seal (an HMAC, with the
audit key, of the last sequence number and hash, updated in the same transaction as
each append) catches both: without the key the seal cannot be moved.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass

from coheara.audit.digest import AuditKey
from coheara.audit.record import AuditRecord

GENESIS = "0" * 64


def record_hash(record: AuditRecord) -> str:
    canonical = json.dumps(
        record.hashed_fields(), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def link(record: AuditRecord, seq: int, prev_hash: str) -> AuditRecord:
    """Place `record` after the record whose hash is `prev_hash`, as number `seq`."""
    record.seq = seq
    record.prev_hash = prev_hash
    record.record_hash = record_hash(record)
    return record


@dataclass(frozen=True)
class Head:
    """Where the trail ends, sealed with the key."""

    seq: int
    record_hash: str
    seal: str


@dataclass(frozen=True)
class Verdict:
    records: int
    """How many records were read."""
    broken_at: int | None = None
    """The sequence number of the first record that does not link (None: intact)."""
    reason: str = ""

    @property
    def intact(self) -> bool:
        return self.broken_at is None


def verify(records: Iterable[AuditRecord], head: Head | None, key: AuditKey) -> Verdict:
    """Walk the trail in sequence order and report the first record that does not link:
    a number missing or out of order, a hash that does not match the record's fields, a
    previous hash that does not match the record before, or an end the seal disowns."""
    expected_seq, previous, count = 1, GENESIS, 0
    for record in records:
        count += 1
        if record.seq != expected_seq:
            what = "is missing" if record.seq > expected_seq else "is out of order"
            return Verdict(count, expected_seq, f"record {expected_seq} {what}")
        if record.prev_hash != previous:
            return Verdict(
                count,
                record.seq,
                "its previous hash does not match the record before it "
                "(a record was deleted, inserted or moved)",
            )
        if record_hash(record) != record.record_hash:
            return Verdict(count, record.seq, "its hash does not match its fields (edited)")
        previous = record.record_hash
        expected_seq += 1
    last = expected_seq - 1
    if head is None:
        if last:
            return Verdict(count, 1, "the trail has records but no head seal")
        return Verdict(0)
    if head.seal != key.seal(head.seq, head.record_hash):
        return Verdict(
            count,
            min(head.seq, last) or 1,
            "the head seal does not verify (the trail was rewritten, or another key)",
        )
    if head.seq > last:
        return Verdict(
            count, last + 1, f"record {last + 1} is missing (the trail was sealed at {head.seq})"
        )
    if head.seq < last:
        return Verdict(count, head.seq + 1, f"records after {head.seq} were added without the key")
    if head.record_hash != previous:
        return Verdict(count, last, "the last record is not the one the seal names")
    return Verdict(count)
