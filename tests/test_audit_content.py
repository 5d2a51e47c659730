"""Retained content: each call's input and output, AES-GCM encrypted beside the audit trail.

What is proven here: what a real server request sent comes back, decrypted, from
`coheara audit show --content`; the database files (db, -wal, -shm) hold neither the
text nor the key; another key, an altered or a moved ciphertext fail in one line;
purging by age (at start, periodically, on command) keeps the chain verifiable and
leaves no ciphertext behind; retention off stores nothing; a version 2 trail upgrades
in place; the endpoint and failover columns are stored, exported and hashed.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from audit_support import verdict, write_old_trail
from cli_support import run_coheara
from coheara import Engine, Settings
from coheara.audit import AuditKey, AuditLog, AuditRecord, AuditStore, ContentKey
from coheara.audit.content import document
from coheara.audit.export import audit_event
from coheara.audit.record import endpoint_name, iso_time
from coheara.audit.store import SCHEMA_VERSION
from coheara.backends.base import Message
from coheara.context import CallContext
from coheara.engine.engine import CallRecord
from coheara.engine.result import GenerationResult
from coheara.errors import AuditIntegrityError, ConfigurationError
from coheara.server import create_app
from servers import serve

CANARY = "CANARY-c0n7e47"
SCHEMA = {
    "type": "object",
    "properties": {"urgent": {"type": "boolean"}},
    "required": ["urgent"],
    "additionalProperties": False,
}
DAY = 86400.0


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (32, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_coheara(*args, env=env, timeout=300)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def new_key_file(folder: Path, name: str = "content.key") -> tuple[Path, ContentKey]:
    folder.mkdir(parents=True, exist_ok=True)
    key = ContentKey.generate()
    key.write(folder / name)
    return folder / name, key


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COHEARA_", "OLLAMA_"))}
    env.update({"HOME": str(home), "NO_COLOR": "1", "COLUMNS": "200"})
    return env


def synthetic(number: int, started_at: float, text: str = "") -> CallRecord:
    """A finished text call made `started_at`, saying `text` (and answering it)."""
    turns = (Message("user", text or f"note {number}"),)
    result = GenerationResult(
        text=f"reply {number}",
        finish_reason="stop",
        prompt_tokens=5,
        prompt_tokens_exact=True,
        output_tokens=2,
        time_to_first_token_s=0.001,
        total_s=0.002,
        tokens_per_s=None,
        backend="fake",
        model="fake-model",
    )
    return CallRecord(
        started_at=started_at,
        duration_s=0.01,
        outcome="ok",
        error_class=None,
        context=CallContext(request_id=f"r-{number}", surface="python"),
        turns=turns,
        schema=None,
        result=result,
    )


def content_rows(path: Path) -> dict[int, tuple[str, bytes, bytes]]:
    with sqlite3.connect(path) as connection:
        rows = connection.execute("SELECT seq, key_id, nonce, ciphertext FROM content").fetchall()
    return {int(r[0]): (str(r[1]), bytes(r[2]), bytes(r[3])) for r in rows}


# ----- a real server, and the command line ----------------------------------------------------


class Retaining:
    """A server whose audit trail retains content, and the trail's files."""

    def __init__(self, folder: Path, key_file: Path, log: AuditLog, http: httpx.Client) -> None:
        self.folder, self.key_file, self.log, self.http = folder, key_file, log, http

    @property
    def db(self) -> Path:
        return self.folder / "audit.sqlite3"

    def post(self, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], AuditRecord]:
        self.log.flush()
        store = self.log.reader()
        try:
            mark = store.last_seq() or 0
        finally:
            store.close()
        response = self.http.post(path, json=body)
        assert response.status_code == 200, response.text
        deadline = time.monotonic() + 10
        while True:  # recorded when the engine's stream closes, maybe just after the reply
            self.log.flush()
            store = self.log.reader()
            try:
                records = list(store.iter_records(after_seq=mark))
            finally:
                store.close()
            if records or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        [record] = records
        return response.json(), record


@pytest.fixture(scope="module")
def retaining(tiny_engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Retaining]:
    engine = Engine(tiny_engine.backend, Settings(max_output_tokens=6, extract_max_string=24))
    folder = tmp_path_factory.mktemp("retaining")
    key_file, key = new_key_file(tmp_path_factory.mktemp("content-key"))
    with (
        AuditLog.open(folder / "audit.sqlite3", content_key=key) as log,
        serve(create_app(engine, audit=log)) as url,
        httpx.Client(base_url=url, timeout=120) as client,
    ):
        yield Retaining(folder, key_file, log, client)


def show_content(
    trail: Retaining, seq: int, env: dict[str, str], key_file: Path | None = None
) -> subprocess.CompletedProcess[str]:
    settings = {
        **env,
        "COHEARA_AUDIT_CONTENT_KEY_FILE": str(key_file or trail.key_file),
        "COHEARA_AUDIT_KEY_FILE": str(trail.folder / "audit.key"),
    }
    return run_cli("audit", "show", str(seq), "--content", "--path", str(trail.db), env=settings)


def test_what_was_sent_comes_back_through_audit_show_content(
    retaining: Retaining, cli_env: dict[str, str]
) -> None:
    image = png(1)
    system = f"{CANARY} system: you are a radiologist."
    prompt = f"{CANARY} Jane Roe, MRN 0042: describe the film.\nSecond line, naïve café."
    answer, record = retaining.post(
        "/v1/generate",
        {
            "system": system,
            "prompt": prompt,
            "images": [base64.b64encode(image).decode()],
            "max_tokens": 6,
        },
    )
    shown = show_content(retaining, record.seq, cli_env)
    assert shown.returncode == 0, shown.stderr
    out = json.loads(shown.stdout)
    assert out["seq"] == record.seq and out["record_hash"] == record.record_hash
    content = out["content"]
    [turn] = content["input"]["turns"]
    assert (turn["role"], turn["system"]) == ("user", system)
    # The image as its keyed digest (the record's), never its pixels; then the text as sent.
    assert turn["parts"] == [{"image": record.image_digest_list[0]}, {"text": prompt}]
    assert content["input"]["schema"] is None
    assert content["output"] == {"text": answer["text"]}

    value_answer, extracted = retaining.post(
        "/v1/extract", {"prompt": f"{CANARY} urgent?", "schema": SCHEMA, "max_tokens": 32}
    )
    shown = show_content(retaining, extracted.seq, cli_env)
    assert shown.returncode == 0, shown.stderr
    content = json.loads(shown.stdout)["content"]
    assert content["input"]["schema"] == SCHEMA
    assert content["input"]["turns"][0]["parts"][0]["text"].startswith(f"{CANARY} urgent?")
    assert content["output"]["text"] == value_answer["text"]
    assert content["output"]["value"] == value_answer["value"]

    # The export never carries content: no marker, no ciphertext.
    exported = run_cli("audit", "export", "--path", str(retaining.db), "--ndjson", env=cli_env)
    assert exported.returncode == 0, exported.stderr
    ciphertext = content_rows(retaining.db)[record.seq][2]
    assert CANARY not in exported.stdout
    assert base64.b64encode(ciphertext[:24]).decode()[:24] not in exported.stdout
    assert ciphertext[:24].hex() not in exported.stdout


def test_the_database_files_hold_no_plaintext_and_no_key(retaining: Retaining) -> None:
    retaining.post("/v1/generate", {"prompt": f"{CANARY} chest pain, Jane Roe.", "max_tokens": 4})
    secret = ContentKey.load(retaining.key_file).secret
    store = retaining.log.reader()
    try:
        assert store.content_count() >= 1  # content was retained: the search means something
    finally:
        store.close()
    files = {p.name: p.read_bytes() for p in retaining.folder.iterdir() if p.is_file()}
    assert {"audit.sqlite3", "audit.sqlite3-wal", "audit.sqlite3-shm"} <= set(files)
    needles = [
        CANARY.encode(),
        CANARY.encode("utf-16-le"),
        CANARY.lower().encode(),
        b"Jane Roe",
        b"chest pain",
        secret,
        base64.b64encode(secret),
        secret.hex().encode(),
    ]
    for name, data in files.items():
        for needle in needles:
            assert needle not in data, (name, needle[:8])


def test_a_wrong_key_or_an_altered_ciphertext_fails_in_one_line(
    retaining: Retaining, cli_env: dict[str, str], tmp_path: Path
) -> None:
    _, record = retaining.post("/v1/generate", {"prompt": "Summarise: stable.", "max_tokens": 3})
    other, _ = new_key_file(tmp_path)
    wrong = show_content(retaining, record.seq, cli_env, key_file=other)
    assert wrong.returncode == 3
    assert "encrypted with another content key" in one_error_line(wrong)

    # The same trail, one byte of the ciphertext flipped: the right key, exit 11.
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(retaining.folder / "audit.key", copy / "audit.key")
    retaining.log.flush()
    with sqlite3.connect(retaining.db) as source, sqlite3.connect(copy / "audit.sqlite3") as dest:
        source.backup(dest)  # the WAL's commits included
        ciphertext = dest.execute(
            "SELECT ciphertext FROM content WHERE seq = ?", (record.seq,)
        ).fetchone()[0]
        flipped = bytes([ciphertext[0] ^ 1]) + bytes(ciphertext[1:])
        dest.execute("UPDATE content SET ciphertext = ? WHERE seq = ?", (flipped, record.seq))
    moved = Retaining(copy, retaining.key_file, retaining.log, retaining.http)
    altered = show_content(moved, record.seq, cli_env)
    assert altered.returncode == 11
    assert "does not decrypt: it was altered or moved" in one_error_line(altered)
    missing = run_cli(
        "audit", "show", str(record.seq), "--content", "--path", str(retaining.db), env=cli_env
    )
    assert missing.returncode == 3 and "no content key" in one_error_line(missing)


# ----- the content table, directly -------------------------------------------------------------


def write_trail(
    folder: Path, key: ContentKey | None, ages_days: list[float], now: float
) -> AuditLog:
    """A trail with one call per age (days before `now`), its clock fixed at `now`."""
    log = AuditLog.open(folder / "audit.sqlite3", content_key=key, clock=lambda: now)
    for number, age in enumerate(ages_days):
        log.observe(synthetic(number, now - age * DAY, f"{CANARY} note {number}"))
    log.flush()
    return log


def test_swapped_ciphertexts_do_not_decrypt(tmp_path: Path) -> None:
    key = ContentKey.generate()
    now = time.time()
    write_trail(tmp_path, key, [1, 1, 1], now).close()
    db = tmp_path / "audit.sqlite3"
    store = AuditStore(db)
    try:
        second = store.content(2)
        assert second is not None
        assert second.open(key)["input"]["turns"][0]["parts"] == [{"text": f"{CANARY} note 1"}]
    finally:
        store.close()
    with sqlite3.connect(db) as connection:
        for statement in (
            "CREATE TEMP TABLE saved AS SELECT * FROM content WHERE seq IN (1, 2)",
            "UPDATE content SET (nonce, ciphertext) = "
            "(SELECT nonce, ciphertext FROM saved WHERE seq = 2) WHERE seq = 1",
            "UPDATE content SET (nonce, ciphertext) = "
            "(SELECT nonce, ciphertext FROM saved WHERE seq = 1) WHERE seq = 2",
        ):
            connection.execute(statement)
    store = AuditStore(db, readonly=True)
    try:
        for seq in (1, 2):
            stored = store.content(seq)
            assert stored is not None
            with pytest.raises(AuditIntegrityError, match="altered or moved"):
                stored.open(key)
        third = store.content(3)
        assert third is not None and third.open(key)["output"] == {"text": "reply 2"}
    finally:
        store.close()
    # Renumbering a row onto another record fails too (the seq and the hash are bound).
    with sqlite3.connect(db) as connection:
        connection.execute("DELETE FROM content WHERE seq = 1")
        connection.execute("UPDATE content SET seq = 1 WHERE seq = 3")
    store = AuditStore(db, readonly=True)
    try:
        renumbered = store.content(1)
        assert renumbered is not None
        with pytest.raises(AuditIntegrityError):
            renumbered.open(key)
    finally:
        store.close()


def test_purge_removes_old_content_keeps_young_and_the_chain_verifies(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    key = ContentKey.generate()
    now = time.time()
    db = tmp_path / "audit.sqlite3"
    log = write_trail(tmp_path, key, [45, 35, 20, 5, 0.5], now)
    assert set(content_rows(db)) == {1, 2, 3, 4, 5}
    old = {seq: row[2] for seq, row in content_rows(db).items()}
    assert log.purge() == 2  # 30 days by default: records 1 and 2 go
    assert set(content_rows(db)) == {3, 4, 5}
    log.close()
    # Nothing of the purged ciphertexts is left in any file (secure_delete, WAL truncated).
    for file in tmp_path.iterdir():
        data = file.read_bytes()
        for seq in (1, 2):
            assert old[seq][:32] not in data, (file.name, seq)
        assert old[3][:32] in data or file.name != "audit.sqlite3"
    assert verdict(db, tmp_path / "audit.key") == (None, "")

    # On command, with a shorter period: the 20-day one goes, the younger stay.
    purged = run_cli("audit", "purge", "--path", str(db), "--days", "10", env=cli_env)
    assert purged.returncode == 0, purged.stderr
    assert "of 1 record(s) older than 10 day(s); 2 kept" in purged.stdout
    assert set(content_rows(db)) == {4, 5}
    intact = run_cli("audit", "verify", "--path", str(db), env=cli_env)
    assert intact.returncode == 0 and "intact: 5 record(s)" in intact.stdout
    store = AuditStore(db, readonly=True)
    try:
        assert store.count() == 5  # the records themselves stay
    finally:
        store.close()


def test_the_writer_purges_at_start_and_then_periodically(tmp_path: Path) -> None:
    key = ContentKey.generate()
    now = time.time()
    db = tmp_path / "audit.sqlite3"
    write_trail(tmp_path, key, [40, 25, 10], now).close()  # purged at start: before any row
    assert set(content_rows(db)) == {1, 2, 3}
    clock = [now + 10 * DAY]  # ten days on: records 1 (50 days) and 2 (35) are past 30
    log = AuditLog.open(db, content_key=key, clock=lambda: clock[0], purge_interval_s=0.05)
    try:
        log.flush()  # the writer purges before it reads its queue
        assert set(content_rows(db)) == {3}
        clock[0] = now + 25 * DAY  # record 3 is now 35 days old
        deadline = time.monotonic() + 10
        while content_rows(db) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert content_rows(db) == {} and log.purged == 3
    finally:
        log.close()
    assert verdict(db, tmp_path / "audit.key") == (None, "")


def test_written_content_is_never_purged_at_once_when_young(tmp_path: Path) -> None:
    """The start-up purge right after writing leaves records younger than the period."""
    key = ContentKey.generate()
    now = time.time()
    write_trail(tmp_path, key, [29, 0], now).close()
    log = AuditLog.open(tmp_path / "audit.sqlite3", content_key=key, clock=lambda: now)
    log.close()
    assert set(content_rows(tmp_path / "audit.sqlite3")) == {1, 2}


def test_retention_off_keeps_no_content(tmp_path: Path) -> None:
    now = time.time()
    write_trail(tmp_path, None, [0, 0, 0], now).close()
    db = tmp_path / "audit.sqlite3"
    store = AuditStore(db)
    try:
        assert store.count() == 3 and store.content_count() == 0 and store.content(1) is None
    finally:
        store.close()
    for file in tmp_path.iterdir():
        assert CANARY.encode() not in file.read_bytes()


def test_a_refused_call_has_no_content_but_a_failed_one_keeps_its_input(tmp_path: Path) -> None:
    key = ContentKey.generate()
    refused = CallRecord(
        started_at=time.time(),
        duration_s=0.001,
        outcome="invalid_image",
        error_class="ImageError",
        context=CallContext(surface="native"),
        turns=(),
        schema=None,
        result=None,
    )
    failed = CallRecord(
        started_at=time.time(),
        duration_s=0.001,
        outcome="backend_timeout",
        error_class="BackendTimeoutError",
        context=CallContext(surface="native"),
        turns=(Message("user", "timed out"),),
        schema=SCHEMA,
        result=None,
    )
    assert document(refused, []) is None
    with AuditLog.open(tmp_path / "audit.sqlite3", content_key=key) as log:
        log.observe(refused)
        log.observe(failed)
    store = AuditStore(tmp_path / "audit.sqlite3")
    try:
        assert store.content(1) is None
        kept = store.content(2)
        assert kept is not None
        assert kept.open(key) == {
            "format": 1,
            "input": {
                "turns": [{"role": "user", "system": "", "parts": [{"text": "timed out"}]}],
                "schema": SCHEMA,
            },
            "output": None,
        }
    finally:
        store.close()


# ----- keys and start-up -----------------------------------------------------------------------


def test_retention_without_a_key_stops_start_up(tmp_path: Path) -> None:
    settings = Settings(
        audit_enabled=True, audit_retain_content=True, audit_path=tmp_path / "a.sqlite3"
    )
    with pytest.raises(ConfigurationError, match="no content key is configured") as caught:
        AuditLog.from_settings(settings, default=True)
    assert "coheara audit content-key --out" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "a.sqlite3").exists()  # refused before anything was written

    key = ContentKey.generate()
    inline = Settings(
        audit_enabled=True,
        audit_retain_content=True,
        audit_path=tmp_path / "a.sqlite3",
        audit_content_key=base64.b64encode(key.secret).decode(),
    )
    log = AuditLog.from_settings(inline, default=True)
    assert log is not None and log.content_key == key
    log.close()
    bad = Settings(
        audit_enabled=True,
        audit_retain_content=True,
        audit_path=tmp_path / "a.sqlite3",
        audit_content_key="not-a-key",
    )
    with pytest.raises(ConfigurationError, match="not base64 of 32 bytes") as caught:
        AuditLog.from_settings(bad, default=True)
    assert "not-a-key" not in str(caught.value)


def test_serve_refuses_to_start_with_retention_and_no_key(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    env = {
        **cli_env,
        "COHEARA_AUDIT_RETAIN_CONTENT": "true",
        "COHEARA_AUDIT_PATH": str(tmp_path / "audit.sqlite3"),
    }
    # An Ollama backend on a closed loopback port: refused before anything is reached.
    args = ("serve", "--backend", "ollama", "--url", "http://127.0.0.1:9", "--port", "1")
    refused = run_cli(*args, env=env)
    assert refused.returncode == 3, refused.stderr
    line = one_error_line(refused)
    assert "no content key is configured" in line and "content-key --out" in line
    assert not (tmp_path / "audit.sqlite3").exists()


def test_content_key_command_makes_a_private_key_file(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    out = tmp_path / "keys" / "content.key"
    out.parent.mkdir()
    made = run_cli("audit", "content-key", "--out", str(out), env=cli_env)
    assert made.returncode == 0, made.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    key = ContentKey.load(out)
    assert len(base64.b64decode(out.read_text().strip())) == 32
    assert base64.b64encode(key.secret).decode() not in made.stdout + made.stderr
    again = run_cli("audit", "content-key", "--out", str(out), env=cli_env)
    assert again.returncode == 3 and "exists" in one_error_line(again)
    assert ContentKey.load(out) == key  # never replaced
    out.chmod(0o644)
    with pytest.raises(ConfigurationError, match="readable by other users"):
        ContentKey.load(out)
    (tmp_path / "short.key").write_text(base64.b64encode(b"x" * 16).decode())
    (tmp_path / "short.key").chmod(0o600)
    with pytest.raises(ConfigurationError, match="not base64 of 32 bytes"):
        ContentKey.load(tmp_path / "short.key")


# ----- migrations ------------------------------------------------------------------------------


def test_a_version_2_trail_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite3"
    key = AuditKey.load(tmp_path / "audit.key")
    old = AuditRecord(
        time=iso_time(time.time() - 100 * DAY),
        outcome="ok",
        key_id=key.key_id,
        images=1,
        image_digests=json.dumps(["ab" * 32]),
    )
    write_old_trail(path, key, old, version=2, later=("endpoint", "failovers", "adapter"))
    assert verdict(path, tmp_path / "audit.key") == (None, "")
    store = AuditStore(path, readonly=True)  # reading never migrates; no content yet
    try:
        assert store.version() == 2 and store.content(1) is None and store.content_count() == 0
    finally:
        store.close()

    content_key = ContentKey.generate()
    with AuditLog.open(path, content_key=content_key) as log:
        log.observe(synthetic(1, time.time()))
    store = AuditStore(path)
    try:
        assert store.version() == SCHEMA_VERSION == 4 and store.count() == 2
        first = store.get(1)
        assert first is not None and first.record_hash == old.record_hash  # unchanged
        assert first.endpoint is None and first.failovers is None
        assert store.content(1) is None
        second = store.content(2)
        assert second is not None and second.open(content_key)["output"] == {"text": "reply 1"}
    finally:
        store.close()
    assert verdict(path, tmp_path / "audit.key") == (None, "")


# ----- endpoint and failovers ------------------------------------------------------------------


class RoutedResult(GenerationResult):
    """A result as a replica pool returns it (the fields GenerationResult is gaining)."""

    endpoint: str | None = None
    failovers: int = 0


def routed(number: int, endpoint: str, failovers: int) -> CallRecord:
    call = synthetic(number, time.time())
    assert call.result is not None
    fields = {**call.result.model_dump(), "endpoint": endpoint, "failovers": failovers}
    result = RoutedResult(**fields)
    return dataclasses.replace(call, result=result)


def test_endpoint_and_failovers_are_stored_exported_and_hashed(tmp_path: Path) -> None:
    db = tmp_path / "audit.sqlite3"
    with AuditLog.open(db) as log:
        log.observe(dataclasses.replace(synthetic(0, time.time()), result=None))  # no result
        log.observe(routed(1, "http://ops:s3cret@10.0.0.5:11434/v1?token=T0K3N#x", 2))
        log.observe(routed(2, "http://[::1]:8000", 0))
    store = AuditStore(db)
    try:
        plain, first, second = store.iter_records()
    finally:
        store.close()
    assert (plain.endpoint, plain.failovers) == (None, None)
    assert (first.endpoint, first.failovers) == ("http://10.0.0.5:11434/v1", 2)
    assert (second.endpoint, second.failovers) == ("http://[::1]:8000", 0)
    assert "endpoint" not in plain.hashed_fields()  # nulls left out: old hashes unchanged
    assert first.hashed_fields()["endpoint"] == "http://10.0.0.5:11434/v1"
    assert first.hashed_fields()["failovers"] == 2
    data = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert b"s3cret" not in data and b"T0K3N" not in data and b"ops:" not in data

    event = audit_event(first)
    assert event["agent"][1]["networkUri"] == "http://10.0.0.5:11434/v1"
    details = {d["type"]["coding"][0]["code"]: d for d in event["entity"][0]["detail"]}
    assert details["failovers"]["valueInteger"] == 2
    assert details["endpoint"]["valueString"] == "http://10.0.0.5:11434/v1"
    assert "network" not in json.dumps(audit_event(plain)["agent"])

    assert verdict(db, tmp_path / "audit.key") == (None, "")
    for statement, seq in (
        ("UPDATE records SET failovers = 0 WHERE seq = 2", 2),
        ("UPDATE records SET endpoint = 'http://10.0.0.6:11434' WHERE seq = 3", 3),
        ("UPDATE records SET failovers = 1 WHERE seq = 1", 1),  # a null filled in
    ):
        copy = tmp_path / f"edit-{seq}"
        copy.mkdir()
        shutil.copy(db, copy / "audit.sqlite3")
        shutil.copy(tmp_path / "audit.key", copy / "audit.key")
        with sqlite3.connect(copy / "audit.sqlite3") as connection:
            connection.execute(statement)
        broken_at, reason = verdict(copy / "audit.sqlite3", copy / "audit.key")
        assert broken_at == seq and "edited" in reason


def test_endpoint_names_lose_their_credentials() -> None:
    assert endpoint_name(None) is None
    assert endpoint_name("transformers") == "transformers"
    assert endpoint_name("https://u:p@gpu-1.local:8443/v1/?api_key=k") == (
        "https://gpu-1.local:8443/v1/"
    )
    assert endpoint_name("user:pw@gpu-2:11434") == "gpu-2:11434"
    assert endpoint_name("http://gpu-3") == "http://gpu-3"
