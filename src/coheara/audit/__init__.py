"""The audit trail: one record per model call, hash-chained, with no patient data in it.

digest.py    the HMAC key and the keyed digests of inputs and outputs
record.py    what a record holds (identifiers, counts, timings, codes, digests)
chain.py     the hash chain, the head seal and `verify`
store.py     SQLite (WAL) with versioned migrations
observer.py  `AuditLog`: the engine observer and its writer thread
export.py    records as FHIR R5 AuditEvents
content.py   optional retention of each call's content, AES-GCM encrypted, purged on time
"""

from coheara.audit.chain import Verdict, verify
from coheara.audit.content import ContentKey
from coheara.audit.digest import AuditKey
from coheara.audit.observer import AuditLog, attach, current_scope, default_key_file
from coheara.audit.record import AuditRecord
from coheara.audit.store import AuditStore

__all__ = [
    "AuditKey",
    "AuditLog",
    "AuditRecord",
    "AuditStore",
    "ContentKey",
    "Verdict",
    "attach",
    "current_scope",
    "default_key_file",
    "verify",
]
