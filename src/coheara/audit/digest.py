"""Keyed digests (HMAC-SHA256) of what went into the model and what came out.

A digest lets a given document be matched later (recompute it with the key, look it
up) without the document being stored. It is keyed because a plain SHA-256 of a short
note can be reversed by hashing candidate notes; without the key nobody can test a
guess. The key is 32 random bytes in a file of its own, created 0600 on first use and
never written into the database.

Canonical serialization: every field is framed (a one-byte tag, its length as 8 bytes
big-endian, the bytes), so no two different inputs serialize alike. An input is its
Gemma turns in order (role, system text, then each part: a text as UTF-8, an image as
its own keyed digest over its 896x896x3 uint8 pixels) and the output schema, if any, as
canonical JSON. An output is its visible text and, for an extraction, its value as
canonical JSON.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from coheara.backends.base import Message
from coheara.engine.result import GenerationResult
from coheara.errors import ConfigurationError
from coheara.imaging import PreparedImage

KEY_BYTES = 32
SAFE_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
"""An identifier kept as it is in a record (no spaces, no e-mail address, no path);
anything else is stored as its keyed digest."""


@dataclass(frozen=True)
class AuditKey:
    """The HMAC key of the digests and of the trail's head seal."""

    secret: bytes = field(repr=False)
    path: Path | None = None

    @classmethod
    def load(cls, path: Path, *, create: bool = True) -> AuditKey:
        """Read the key file (64 hex digits), creating it 0600 if `create` and it is absent."""
        path = path.expanduser()
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            if not create:
                raise ConfigurationError(
                    f"no audit key at {path}",
                    hint="give the key file the trail was written with (COHEARA_AUDIT_KEY_FILE)",
                ) from None
            return cls._create(path)
        except OSError as exc:
            raise ConfigurationError(f"cannot read the audit key {path}: {exc.strerror}") from None
        _check_private(path)
        return cls(_parse(raw, path), path)

    @classmethod
    def _create(cls, path: Path) -> AuditKey:
        secret = secrets.token_bytes(KEY_BYTES)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: use theirs
            return cls.load(path, create=False)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot create the audit key {path}: {exc.strerror}",
                hint="set COHEARA_AUDIT_KEY_FILE to a writable place",
            ) from None
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(secret.hex() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return cls(secret, path)

    @property
    def key_id(self) -> str:
        """Which key made a record's digests (its rotation), without revealing the key."""
        return hmac.new(self.secret, b"coheara-audit-key-id", hashlib.sha256).hexdigest()[:16]

    def mac(self, data: bytes) -> str:
        return hmac.new(self.secret, data, hashlib.sha256).hexdigest()

    def token(self, value: str | None) -> str | None:
        """An identifier as it is when it is a plain token, else its keyed digest: a caller's
        request id may be free text, and free text may name a patient."""
        if value is None or SAFE_TOKEN.fullmatch(value):
            return value
        return "hmac:" + self.mac(b"coheara-id\x00" + value.encode("utf-8"))[:32]

    def seal(self, seq: int, record_hash: str) -> str:
        """The head seal: only the key's holder can say where the trail ends."""
        return self.mac(f"coheara-head\x00{seq}\x00{record_hash}".encode("ascii"))

    def image_digest(self, image: PreparedImage) -> str:
        pixels = np.ascontiguousarray(image.pixels)
        shape = "x".join(map(str, pixels.shape)) + "|" + pixels.dtype.str
        mac = hmac.new(self.secret, b"coheara-image/1", hashlib.sha256)
        _frame(mac, b"D", shape.encode("ascii"))
        _frame(mac, b"P", pixels.data.cast("B"))  # the buffer itself, not a copy
        return mac.hexdigest()

    def input_digest(
        self, turns: Sequence[Message], schema: Any = None, images: Sequence[str] | None = None
    ) -> str:
        """The conversation as sent (and the output schema); `images`: their digests in prompt
        order, if already computed (each image is hashed once)."""
        digests = iter(images if images is not None else self.image_digests(turns))
        mac = hmac.new(self.secret, b"coheara-input/1", hashlib.sha256)
        for turn in turns:
            _frame(mac, b"R", turn.role.encode())
            _frame(mac, b"S", turn.system.encode("utf-8"))
            for part in turn.ordered_parts:
                if isinstance(part, str):
                    _frame(mac, b"T", part.encode("utf-8"))
                else:
                    _frame(mac, b"I", bytes.fromhex(next(digests)))
        if schema is not None:
            _frame(mac, b"J", canonical_json(schema_document(schema)))
        return mac.hexdigest()

    def image_digests(self, turns: Sequence[Message]) -> list[str]:
        return [
            self.image_digest(part)
            for turn in turns
            for part in turn.ordered_parts
            if not isinstance(part, str)
        ]

    def output_digest(self, result: GenerationResult) -> str:
        mac = hmac.new(self.secret, b"coheara-output/1", hashlib.sha256)
        _frame(mac, b"T", result.text.encode("utf-8"))
        if hasattr(result, "value"):
            _frame(mac, b"V", canonical_json(result.value))
        return mac.hexdigest()


def _frame(mac: Any, tag: bytes, data: bytes | memoryview) -> None:
    mac.update(tag + len(data).to_bytes(8, "big"))
    mac.update(data)


def schema_document(schema: Any) -> Any:
    """A JSON Schema as a document: a Pydantic model's own schema, a dict as it is."""
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        return schema.model_json_schema()
    return schema


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no spaces, UTF-8: one serialization per value."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
    ).encode("utf-8")


def _parse(raw: bytes, path: Path) -> bytes:
    text = raw.strip()
    try:
        secret = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        secret = b""
    if len(secret) < KEY_BYTES:
        raise ConfigurationError(
            f"the audit key {path} is not {KEY_BYTES * 2} or more hex digits",
            hint="restore the key file the trail was written with",
        )
    return secret


def _check_private(path: Path) -> None:
    if os.name != "posix":
        return
    mode = path.stat().st_mode
    if mode & 0o077:
        raise ConfigurationError(
            f"the audit key {path} is readable by other users", hint=f"chmod 600 {path}"
        )
