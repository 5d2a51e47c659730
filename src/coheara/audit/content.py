"""Content retention: each call's full input and output, encrypted, for sites that must keep it.

Off by default (`audit_retain_content`). Each call's content is one canonical JSON
document: its turns (role, system text, each part in order: a text as it was sent, an
image as its keyed digest, never its pixels), the output schema, and the output text
(and value, for an extraction). It is encrypted with AES-256-GCM under the content key
(a random 96-bit nonce per row) into the `content` table, apart from the records: the
record hash does not cover it, so purging it leaves the chain verifiable. The associated
data binds a ciphertext to its record (the record's `seq` and `record_hash`): moved to
another row, it no longer decrypts.

The key is 32 bytes, base64, from the environment (`COHEARA_AUDIT_CONTENT_KEY`) or a
file of its own (`COHEARA_AUDIT_CONTENT_KEY_FILE`, refused if other users can read it);
never from the database, which holds only a key id (which key, without revealing it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from coheara.audit.digest import _check_private, schema_document
from coheara.errors import AuditIntegrityError, ConfigurationError
from coheara.settings import Settings

if TYPE_CHECKING:
    from coheara.engine.engine import CallRecord

KEY_BYTES = 32
NONCE_BYTES = 12
DOCUMENT_FORMAT = 1
_AAD = b"coheara-content/1\x00"
_FIX = (
    "make one with `coheara audit content-key --out FILE` and set "
    "COHEARA_AUDIT_CONTENT_KEY_FILE=FILE (or COHEARA_AUDIT_CONTENT_KEY to its base64)"
)


@dataclass(frozen=True)
class ContentKey:
    """The AES-256-GCM key of retained content."""

    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.secret) != KEY_BYTES:
            raise ConfigurationError(f"a content key is {KEY_BYTES} bytes", hint=_FIX)

    @classmethod
    def generate(cls) -> ContentKey:
        return cls(secrets.token_bytes(KEY_BYTES))

    @classmethod
    def from_settings(cls, settings: Settings) -> ContentKey | None:
        """The configured key, or None where none is configured."""
        inline, path = settings.audit_content_key, settings.audit_content_key_file
        if inline is not None and path is not None:
            raise ConfigurationError(
                "both COHEARA_AUDIT_CONTENT_KEY and COHEARA_AUDIT_CONTENT_KEY_FILE are set",
                hint="set one of them",
            )
        if inline is not None:
            return cls(_decode(inline.get_secret_value().encode("ascii", "replace"), None))
        if path is not None:
            return cls.load(path)
        return None

    @classmethod
    def required(cls, settings: Settings) -> ContentKey:
        """The key retention needs: a missing one stops start-up, with the fix."""
        key = cls.from_settings(settings)
        if key is None:
            raise ConfigurationError(
                "audit content retention is on (COHEARA_AUDIT_RETAIN_CONTENT) but no content "
                "key is configured",
                hint=_FIX,
            )
        return key

    @classmethod
    def load(cls, path: Path) -> ContentKey:
        path = path.expanduser()
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise ConfigurationError(f"no content key at {path}", hint=_FIX) from None
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read the content key {path}: {exc.strerror}"
            ) from None
        _check_private(path)
        return cls(_decode(raw, path))

    def write(self, path: Path) -> None:
        """A new key file, 0600; an existing file is never overwritten (it may be the key
        a trail's content was encrypted with)."""
        path = path.expanduser()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise ConfigurationError(
                f"{path} exists", hint="choose a new file: a key in use must not be replaced"
            ) from None
        except OSError as exc:
            raise ConfigurationError(f"cannot create {path}: {exc.strerror}") from None
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(base64.b64encode(self.secret).decode("ascii") + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    @property
    def key_id(self) -> str:
        """Which key encrypted a row, without revealing the key."""
        return hmac.new(self.secret, b"coheara-content-key-id", hashlib.sha256).hexdigest()[:16]

    def encrypt(self, plaintext: bytes, seq: int, record_hash: str) -> tuple[bytes, bytes]:
        """(nonce, ciphertext and tag) of `plaintext`, bound to record `seq`."""
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce, AESGCM(self.secret).encrypt(nonce, plaintext, _bound(seq, record_hash))

    def decrypt(
        self, seq: int, record_hash: str, key_id: str, nonce: bytes, ciphertext: bytes
    ) -> dict[str, Any]:
        """The content document of record `seq`. Another key is a configuration error (exit
        3); a ciphertext that does not open under the right key was altered or moved
        (exit 11)."""
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if key_id != self.key_id:
            raise ConfigurationError(
                f"the content of audit record {seq} was encrypted with another content key "
                f"(key id {key_id}; the configured key is {self.key_id})",
                hint="set COHEARA_AUDIT_CONTENT_KEY_FILE to the key it was written with",
            )
        try:
            plaintext = AESGCM(self.secret).decrypt(
                bytes(nonce), bytes(ciphertext), _bound(seq, record_hash)
            )
        except (InvalidTag, ValueError):
            raise AuditIntegrityError(
                f"the retained content of audit record {seq} does not decrypt: it was altered "
                "or moved from another record",
            ) from None
        document: dict[str, Any] = json.loads(plaintext)
        return document


def document(call: CallRecord, image_digests: list[str]) -> bytes | None:
    """The call's content as canonical JSON; None when there is none (a request refused
    before its input was read)."""
    result = call.result
    if not call.turns and result is None:
        return None
    digests = iter(image_digests)
    turns = [
        {
            "role": turn.role,
            "system": turn.system,
            "parts": [
                {"text": part} if isinstance(part, str) else {"image": next(digests)}
                for part in turn.ordered_parts
            ],
        }
        for turn in call.turns
    ]
    output: dict[str, Any] | None = None
    if result is not None:
        output = {"text": result.text}
        if hasattr(result, "value"):
            output["value"] = _jsonable(result.value)
    body = {
        "format": DOCUMENT_FORMAT,
        "input": {
            "turns": turns,
            "schema": _jsonable(schema_document(call.schema)) if call.schema is not None else None,
        },
        "output": output,
    }
    return json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
    ).encode("utf-8")


def _jsonable(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def _bound(seq: int, record_hash: str) -> bytes:
    return _AAD + f"{seq}\x00{record_hash}".encode("ascii")


def _decode(raw: bytes, path: Path | None) -> bytes:
    where = str(path) if path is not None else "COHEARA_AUDIT_CONTENT_KEY"
    try:
        secret = base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError):
        secret = b""
    if len(secret) != KEY_BYTES:
        raise ConfigurationError(f"{where} is not base64 of {KEY_BYTES} bytes", hint=_FIX)
    return secret
