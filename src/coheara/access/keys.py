"""The API key store: `keys.json`, salted hashes only, read again whenever it changes.

A key is `coh_<id>_<secret>`: the id (12 hex digits) finds the record, the secret (32
random bytes, URL-safe base64) proves the holder. The full key is shown once, when it is
made; the file keeps only its id, name, salt, hash, dates and what it may call.

The hash is HMAC-SHA256 of the secret under a per-key salt. A slow KDF (bcrypt, scrypt,
Argon2) protects low-entropy passwords from guessing; a 256-bit random secret cannot be
guessed, so a single HMAC is as strong and keeps a request's check at microseconds.

Verification does the same work whatever is wrong with a key: an unknown id or a
malformed key still costs one HMAC and one `hmac.compare_digest` against a dummy, so the
time taken does not tell a caller which part was wrong.

The file is written atomically (a 0600 temporary file in the same folder, then
`os.replace`) under an exclusive lock, and refused if other users can read it. A server
stats it per request and reloads it when it changed, so a new or revoked key counts
without a restart.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from coheara.audit.digest import _check_private
from coheara.errors import ConfigurationError, InvalidRequestError
from coheara.private_files import exclusive, write_atomic

ENDPOINTS = ("native", "tasks", "openai", "ollama", "metrics")
"""What a key may be allowed to call: the three dialects, the tasks, and /metrics."""
ALL = "*"
FORMAT = 1
PREFIX = "coh"
SECRET_BYTES = 32
SALT_BYTES = 16
ID_HEX = 12
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_KEY = re.compile(rf"{PREFIX}_([0-9a-f]{{{ID_HEX}}})_([A-Za-z0-9_-]{{43}})")

_DUMMY_SALT = secrets.token_bytes(SALT_BYTES)
_DUMMY_HASH = secrets.token_bytes(32)
_DUMMY_SECRET = secrets.token_bytes(SECRET_BYTES)


def _digest(salt: bytes, secret: bytes) -> bytes:
    return hmac.new(salt, secret, hashlib.sha256).digest()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class KeyRecord:
    """One key as stored: never the key, never its secret."""

    id: str
    name: str
    salt: str
    """hex"""
    hash: str
    """hex: HMAC-SHA256(salt, secret)"""
    created: str
    revoked: str | None
    tasks: tuple[str, ...]
    """Task ids, or ("*",) for every task."""
    endpoints: tuple[str, ...]
    """Drawn from ENDPOINTS, or ("*",) for all."""

    @property
    def active(self) -> bool:
        return self.revoked is None

    def allows_endpoint(self, endpoint: str) -> bool:
        return ALL in self.endpoints or endpoint in self.endpoints

    def allows_task(self, task_id: str | None) -> bool:
        return ALL in self.tasks or (task_id is not None and task_id in self.tasks)

    def public(self) -> dict[str, Any]:
        """What `coheara keys list` shows: no salt, no hash."""
        return {
            "name": self.name,
            "id": self.id,
            "created": self.created,
            "status": "active" if self.active else "revoked",
            "revoked": self.revoked,
            "tasks": list(self.tasks),
            "endpoints": list(self.endpoints),
        }

    def stored(self) -> dict[str, Any]:
        row = asdict(self)
        row["tasks"], row["endpoints"] = list(self.tasks), list(self.endpoints)
        return row


def parse_key(key: str | None) -> tuple[str, bytes] | None:
    """(id, secret) of a well-formed key, else None."""
    if key is None:
        return None
    match = _KEY.fullmatch(key)
    if match is None:
        return None
    encoded = match.group(2)
    secret = base64.urlsafe_b64decode(encoded + "=")
    if len(secret) != SECRET_BYTES:
        return None
    # The last of 43 characters carries 2 unused bits: only the canonical spelling of a
    # secret is its key (else 4 different strings would all be the same key).
    if base64.urlsafe_b64encode(secret).decode("ascii").rstrip("=") != encoded:
        return None
    return match.group(1), secret


class Keyring:
    """The keys as read at one moment; `verify` is the constant-work check."""

    def __init__(self, records: Iterable[KeyRecord] = ()) -> None:
        self.records = tuple(records)
        self._by_id = {
            r.id: (r, bytes.fromhex(r.salt), bytes.fromhex(r.hash)) for r in self.records
        }
        self.active = sum(1 for r in self.records if r.active)

    def verify(self, key: str | None) -> KeyRecord | None:
        """The active record `key` belongs to, else None (missing, malformed, unknown,
        wrong secret or revoked alike); always exactly one HMAC and one compare_digest."""
        parsed = parse_key(key)
        found = self._by_id.get(parsed[0]) if parsed is not None else None
        secret = parsed[1] if parsed is not None else _DUMMY_SECRET
        salt, expected = (found[1], found[2]) if found is not None else (_DUMMY_SALT, _DUMMY_HASH)
        matches = hmac.compare_digest(_digest(salt, secret), expected)
        if found is None or not matches or not found[0].active:
            return None
        return found[0]

    def by_name(self, name: str) -> KeyRecord | None:
        wanted = name.lower()
        return next((r for r in self.records if r.name.lower() == wanted), None)


class KeyStore:
    """The key file at `path` (it need not exist: no file, no keys)."""

    def __init__(self, path: Path) -> None:
        self.path = path.expanduser()
        self._seen: tuple[int, ...] | None = None
        self._ring = Keyring()

    # ----- reading --------------------------------------------------------------------

    def load(self) -> Keyring:
        """Read the file now; ConfigurationError if others can read it or it is not valid."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return Keyring()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read the key store {self.path}: {exc.strerror}"
            ) from None
        try:
            _check_private(self.path)
        except ConfigurationError:
            raise ConfigurationError(
                f"the key store {self.path} is readable by other users",
                hint=f"chmod 600 {self.path}",
            ) from None
        return Keyring(self._parse(raw))

    def current(self) -> Keyring:
        """The keys, reread only if the file changed (one stat per call): replaced, written
        or its mode changed (a chmod that opens it to others must close the server)."""
        try:
            st = os.stat(self.path)
            seen: tuple[int, ...] = (
                st.st_dev,
                st.st_ino,
                st.st_mtime_ns,
                st.st_ctime_ns,
                st.st_size,
                st.st_mode,
            )
        except FileNotFoundError:
            seen = ()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read the key store {self.path}: {exc.strerror}"
            ) from None
        if seen != self._seen:
            ring = self.load()
            self._ring, self._seen = ring, seen
        return self._ring

    def records(self) -> tuple[KeyRecord, ...]:
        return self.load().records

    def active_count(self) -> int:
        return self.load().active

    def _parse(self, raw: bytes) -> list[KeyRecord]:
        try:
            document = json.loads(raw)
            rows = document["keys"]
            records = [
                KeyRecord(
                    id=str(row["id"]),
                    name=str(row["name"]),
                    salt=str(row["salt"]),
                    hash=str(row["hash"]),
                    created=str(row["created"]),
                    revoked=None if row["revoked"] is None else str(row["revoked"]),
                    tasks=tuple(str(t) for t in row["tasks"]),
                    endpoints=tuple(str(e) for e in row["endpoints"]),
                )
                for row in rows
            ]
            for record in records:
                bytes.fromhex(record.salt), bytes.fromhex(record.hash)
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigurationError(
                f"the key store {self.path} is not valid ({type(exc).__name__})",
                hint="restore it, or move it away and create the keys again",
            ) from None
        return records

    # ----- writing --------------------------------------------------------------------

    def create(
        self, name: str, tasks: Iterable[str] = (), endpoints: Iterable[str] = ()
    ) -> tuple[KeyRecord, str]:
        """A new key: its record and the key itself (shown once, never stored).

        Empty `tasks` means every task. Empty `endpoints` means all of them, except for a
        key limited to some tasks: it gets the `tasks` endpoint only, since the dialects
        (native, OpenAI, Ollama) would let it send any prompt, that of another task too."""
        tasks = tuple(tasks)
        endpoints = tuple(endpoints) or (("tasks",) if tasks else ())
        if not NAME.fullmatch(name):
            raise InvalidRequestError(
                f"invalid key name {name[:64]!r}",
                hint="at most 64 letters, digits, '.', '_' or '-', e.g. radiology-pacs",
            )
        task_ids = canonical_tasks(tasks)
        endpoint_names = canonical_endpoints(endpoints)
        with self._locked():
            ring = self.load()
            if ring.by_name(name) is not None:
                raise InvalidRequestError(
                    f"a key named {name!r} already exists",
                    hint="names stay unique, revoked keys included; choose another",
                )
            taken = {r.id for r in ring.records}
            key_id = secrets.token_hex(ID_HEX // 2)
            while key_id in taken:
                key_id = secrets.token_hex(ID_HEX // 2)
            secret, salt = secrets.token_bytes(SECRET_BYTES), secrets.token_bytes(SALT_BYTES)
            record = KeyRecord(
                id=key_id,
                name=name,
                salt=salt.hex(),
                hash=_digest(salt, secret).hex(),
                created=_now(),
                revoked=None,
                tasks=task_ids,
                endpoints=endpoint_names,
            )
            self._write([*ring.records, record])
        encoded = base64.urlsafe_b64encode(secret).decode("ascii").rstrip("=")
        return record, f"{PREFIX}_{key_id}_{encoded}"

    def revoke(self, name: str) -> KeyRecord:
        """Revoke the key called `name` (InvalidRequestError if there is none); revoking a
        revoked key changes nothing."""
        with self._locked():
            ring = self.load()
            found = ring.by_name(name)
            if found is None:
                raise InvalidRequestError(
                    f"no key named {name[:64]!r}", hint="see `coheara keys list`"
                )
            if not found.active:
                return found
            revoked = replace(found, revoked=_now())
            self._write([revoked if r is found else r for r in ring.records])
        return revoked

    def _write(self, records: list[KeyRecord]) -> None:
        document = {"format": FORMAT, "keys": [r.stored() for r in records]}
        write_atomic(self.path, json.dumps(document, indent=2).encode("utf-8") + b"\n")

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        """One writer at a time (two `coheara keys create` must not lose one another)."""
        return exclusive(
            self.path.with_name(self.path.name + ".lock"),
            what=f"the key store {self.path}",
            hint="set COHEARA_KEYS_PATH to a writable place",
        )


def canonical_tasks(tasks: Iterable[str]) -> tuple[str, ...]:
    """Task ids as registered (slugs and any case accepted); empty or "*" means all."""
    wanted = [t.strip() for t in tasks if t.strip()]
    if not wanted or ALL in wanted:
        return (ALL,)
    from coheara.tasks import get_task

    return tuple(dict.fromkeys(get_task(t).id for t in wanted))


def canonical_endpoints(endpoints: Iterable[str]) -> tuple[str, ...]:
    wanted = [e.strip().lower() for e in endpoints if e.strip()]
    if not wanted or ALL in wanted:
        return (ALL,)
    for endpoint in wanted:
        if endpoint not in ENDPOINTS:
            raise InvalidRequestError(
                f"unknown endpoint {endpoint[:32]!r}", hint="one of " + ", ".join(ENDPOINTS)
            )
    return tuple(dict.fromkeys(wanted))
