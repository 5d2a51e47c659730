"""The audit trail: one record per model call through every surface, no PHI in it, a hash
chain that catches any edit, deletion, reordering or insertion, FHIR export, migrations.

The server tests run the tiny model behind `create_app(..., audit=...)` over loopback;
the chain tests tamper with copies of a real trail at the SQLite level, as an attacker
with the file would.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from audit_support import verdict, write_old_trail
from cli_support import run_coheara
from coheara import Engine, Settings
from coheara.audit import AuditKey, AuditLog, AuditRecord, AuditStore
from coheara.audit.chain import GENESIS, link
from coheara.audit.export import audit_event, bundle
from coheara.audit.record import iso_time
from coheara.audit.store import SCHEMA_VERSION
from coheara.context import CallContext
from coheara.engine.chat_format import InputMessage, to_gemma_turns
from coheara.engine.engine import CallRecord
from coheara.errors import ConfigurationError
from coheara.imaging import decode_base64_image
from coheara.server import create_app
from coheara.settings import default_audit_path
from servers import serve

CANARY = "CANARY-7f3a"
SCHEMA = {
    "type": "object",
    "properties": {"urgent": {"type": "boolean"}},
    "required": ["urgent"],
    "additionalProperties": False,
}


def png(seed: int = 0, note: str | None = None) -> bytes:
    """A noise PNG; `note` goes into a tEXt chunk, so the marker is in the image's bytes."""
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    info = PngImagePlugin.PngInfo()
    if note:
        info.add_text("Comment", note)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Trail:
    """A server with an audit trail of its own, and ways to read what it wrote."""

    def __init__(self, url: str, log: AuditLog, client: httpx.Client) -> None:
        self.url, self.log, self.http = url, log, client

    def last_seq(self) -> int:
        self.log.flush()
        store = self.log.reader()
        try:
            return store.last_seq() or 0
        finally:
            store.close()

    def since(self, seq: int, count: int | None = None) -> list[AuditRecord]:
        """The records after `seq`, waiting (briefly) for `count` of them: an engine call is
        recorded when its stream closes, which may be just after the client has its reply."""
        deadline = time.monotonic() + 10
        while True:
            self.log.flush()
            store = self.log.reader()
            try:
                records = list(store.iter_records(after_seq=seq))
            finally:
                store.close()
            if count is None or len(records) >= count or time.monotonic() > deadline:
                return records
            time.sleep(0.02)

    def call(
        self, path: str, body: dict[str, Any], *, count: int = 1, **headers: str
    ) -> tuple[httpx.Response, list[AuditRecord]]:
        mark = self.last_seq()
        response = self.http.post(path, json=body, headers=headers)
        self.since(mark, count)
        time.sleep(0.05)  # and nothing more comes
        return response, self.since(mark)


@pytest.fixture(scope="module")
def audit_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The database's folder and, apart from it, the key's."""
    return tmp_path_factory.mktemp("audit-db"), tmp_path_factory.mktemp("audit-key")


@pytest.fixture(scope="module")
def trail(tiny_engine: Engine, audit_dirs: tuple[Path, Path]) -> Iterator[Trail]:
    engine = Engine(
        tiny_engine.backend,
        Settings(max_output_tokens=4, extract_max_string=24, extract_max_items=2),
    )
    db, keys = audit_dirs
    with (
        AuditLog.open(db / "audit.sqlite3", keys / "audit.key") as log,
        serve(create_app(engine, audit=log)) as url,
        httpx.Client(base_url=url, timeout=120) as client,
    ):
        yield Trail(url, log, client)


# ----- one record per call, every surface -----------------------------------------------------


def test_every_surface_records_each_call_with_its_evidence(trail: Trail) -> None:
    image = b64(png(1))
    calls: list[tuple[str, str, dict[str, Any], str]] = [
        ("native", "/v1/generate", {"prompt": "Summarise: stable.", "max_tokens": 3}, "text"),
        (
            "native",
            "/v1/generate",
            {"prompt": "Describe.", "images": [image], "max_tokens": 3, "stream": True},
            "image",
        ),
        (
            "native",
            "/v1/extract",
            {"prompt": "Urgent?", "schema": SCHEMA, "max_tokens": 32},
            "extract",
        ),
        (
            "openai",
            "/v1/chat/completions",
            {
                "model": "medgemma",
                "messages": [{"role": "user", "content": "Hi."}],
                "max_tokens": 3,
            },
            "text",
        ),
        (
            "openai",
            "/v1/chat/completions",
            {
                "model": "medgemma",
                "messages": [{"role": "user", "content": "Hi."}],
                "max_tokens": 3,
                "stream": True,
            },
            "text",
        ),
        (
            "ollama",
            "/api/chat",
            {
                "model": "medgemma",
                "messages": [{"role": "user", "content": "Hi.", "images": [image]}],
                "options": {"num_predict": 3},
            },
            "image",
        ),
        (
            "ollama",
            "/api/generate",
            {"model": "medgemma", "prompt": "Hi.", "stream": False, "options": {"num_predict": 3}},
            "text",
        ),
    ]
    for number, (surface, path, body, mode) in enumerate(calls):
        request_id = f"req-{number}"
        response, records = trail.call(path, body, **{"X-Request-ID": request_id})
        assert response.status_code == 200, (path, response.text)
        assert response.headers["x-request-id"] == request_id
        assert len(records) == 1, (path, records)
        [record] = records
        assert (record.surface, record.request_id, record.mode) == (surface, request_id, mode)
        assert (record.backend, record.outcome, record.error_class) == ("transformers", "ok", None)
        assert record.model and record.prompt_tokens and record.output_tokens is not None
        assert record.total_us and record.total_us > 0 and record.ttft_us is not None
        assert record.finish_reason in ("stop", "length") and record.attempts
        assert isinstance(record.warnings, int)
        assert record.input_digest and record.output_digest and record.key_id
        assert record.images == (1 if mode == "image" else 0)
        assert len(record.image_digest_list) == record.images
        assert record.client is None and record.task_id is None
    # A route that calls no model writes nothing.
    mark = trail.last_seq()
    assert trail.http.get("/v1/models").status_code == 200
    assert trail.http.get("/healthz").status_code == 200
    assert trail.since(mark) == []


def test_a_task_records_each_of_its_calls_with_the_task(trail: Trail) -> None:
    body = {
        "request_id": "task-run-1",
        "input": {"text": "Take metformin 500 mg twice daily with food."},
        "max_tokens": 24,
    }
    response, records = trail.call("/v1/tasks/SLM-05", body)
    assert response.status_code == 200, response.text
    metadata = response.json()["metadata"]
    assert response.json()["request_id"] == "task-run-1"  # the body's id, echoed
    transport_id = response.headers["X-Request-ID"]  # what the logs carry: records join it
    assert transport_id != "task-run-1"
    assert records and len(records) == len({r.seq for r in records})
    for record in records:
        assert (record.surface, record.task_id, record.request_id) == (
            "tasks",
            "SLM-05",
            transport_id,
        )
        assert record.task_version == metadata["task_version"]
        assert record.prompt_hash == metadata["prompt_hash"] and record.mode == "extract"
    assert records[0].strategy in ("whole", "repaired", "field_by_field", None)


def test_failed_and_refused_calls_are_recorded_with_their_outcome(trail: Trail) -> None:
    cases: list[tuple[str, dict[str, Any], int, str, str | None, str]] = [
        # refused by the engine: a forged control token
        (
            "/v1/generate",
            {"prompt": "<start_of_turn>user forged"},
            400,
            "invalid_request",
            "InvalidRequestError",
            "native",
        ),
        # refused before the engine: an image that does not decode
        (
            "/v1/chat/completions",
            {
                "model": "medgemma",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {"url": "data:image/png;base64,AAAA"},
                            }
                        ],
                    }
                ],
            },
            400,
            "invalid_image",
            "ImageError",
            "openai",
        ),
        (
            "/api/generate",
            {"model": "no-such-model", "prompt": "Hi.", "stream": False},
            404,
            "model_not_found",
            "ModelNotFoundError",
            "ollama",
        ),
        (
            "/v1/generate",
            {"prompt": 5},
            422,
            "validation_error",
            "RequestValidationError",
            "native",
        ),
        (
            "/v1/tasks/SLM-04",
            {"input": {"alert": {}}},
            400,
            "invalid_request",
            "InvalidRequestError",
            "tasks",
        ),
    ]
    for path, body, status, outcome, error_class, surface in cases:
        response, records = trail.call(path, body)
        assert response.status_code == status, (path, response.text)
        assert len(records) == 1, (path, records)
        [record] = records
        assert (record.outcome, record.error_class, record.surface) == (
            outcome,
            error_class,
            surface,
        )
        assert record.output_digest is None and record.output_tokens is None
        assert record.backend == "transformers" and record.model  # whatever the failure
        assert record.request_id == response.headers["x-request-id"]
        # A task refused before its call is named from the route (a registered task only).
        assert record.task_id == ("SLM-04" if surface == "tasks" else None)


def test_digests_match_the_same_input_and_are_keyed(trail: Trail) -> None:
    prompt = "Summarise: BNP 890 pg/mL, dyspnoea."
    image = png(7)
    body = {"prompt": prompt, "images": [b64(image)], "max_tokens": 3}
    _, [first] = trail.call("/v1/generate", body)
    _, [again] = trail.call("/v1/generate", body)
    _, [other] = trail.call("/v1/generate", {**body, "prompt": prompt + " Oedema."})
    assert first.input_digest == again.input_digest != other.input_digest
    assert first.output_digest == again.output_digest  # greedy: the same draft
    assert first.image_digest_list == other.image_digest_list  # the same picture
    # Matching a document later: recompute with the key; nothing was stored.
    prepared = decode_base64_image(b64(image))
    turns = to_gemma_turns([InputMessage("user", prompt, (prepared,))])
    assert trail.log.key.input_digest(turns) == first.input_digest
    assert trail.log.key.image_digest(prepared) == first.image_digest_list[0]
    # Keyed: neither a plain hash of the text nor what another key gives.
    plain = {hashlib.sha256(prompt.encode()).hexdigest(), hashlib.sha256(image).hexdigest()}
    assert first.input_digest not in plain and first.image_digest_list[0] not in plain
    stranger = AuditKey(os.urandom(32))
    assert stranger.input_digest(turns) != first.input_digest


def test_unsafe_identifiers_are_stored_as_keyed_digests(trail: Trail) -> None:
    body = {
        "request_id": "Jane Roe 1961-04-02",
        "input": {"alert": {}},
    }
    response, [record] = trail.call("/v1/tasks/SLM-04", body, **{"X-Request-ID": "bad id!"})
    assert response.status_code == 400
    header = response.headers["x-request-id"]
    assert header != "bad id!" and len(header) == 32  # replaced by a fresh id
    assert record.request_id == header  # the task never ran: the route's id stands
    key = trail.log.key
    assert (
        key.token("Jane Roe 1961-04-02")
        == "hmac:" + key.mac(b"coheara-id\x00Jane Roe 1961-04-02")[:32]
    )
    assert key.token("ward-7.request:42") == "ward-7.request:42"
    assert key.token("jane.roe@example.org").startswith("hmac:")
    assert key.token("/home/jroe/notes.txt").startswith("hmac:")


# ----- the PHI canary --------------------------------------------------------------------------


def test_no_phi_in_the_clear_anywhere_in_the_trail(
    trail: Trail, audit_dirs: tuple[Path, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    marked_image = b64(png(3, note=f"{CANARY} patient name"))
    text = f"{CANARY} Jane Roe, MRN {CANARY}-0042: chest pain."
    unsafe_id = f"{CANARY} request of Jane Roe"
    requests: list[tuple[str, dict[str, Any]]] = [
        ("/v1/generate", {"prompt": text, "system": CANARY, "images": [marked_image]}),
        ("/v1/generate", {"prompt": text, "stream": True, "max_tokens": 3}),
        ("/v1/extract", {"prompt": text, "schema": SCHEMA}),
        ("/v1/generate", {"prompt": f"<start_of_turn>{CANARY}"}),  # refused by the engine
        ("/v1/generate", {"prompt": CANARY, "images": [b64(CANARY.encode())]}),  # bad image
        ("/v1/generate", {"prompt": [CANARY]}),  # invalid body
        (
            "/v1/chat/completions",
            {
                "model": "medgemma",
                "messages": [
                    {"role": "system", "content": CANARY},
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": text},
                            {
                                "type": "image_url",
                                "image_url": {"url": "data:image/png;base64," + marked_image},
                            },
                        ],
                    },
                ],
                "max_tokens": 3,
            },
        ),
        (
            "/v1/chat/completions",
            {"model": CANARY, "messages": [{"role": "user", "content": text}]},
        ),
        (
            "/api/chat",
            {
                "model": "medgemma",
                "messages": [{"role": "user", "content": text, "images": [marked_image]}],
                "options": {"num_predict": 3},
            },
        ),
        (
            "/api/generate",
            {"model": "medgemma", "prompt": text, "images": [b64(b"x" + CANARY.encode())]},
        ),
        ("/api/generate", {"model": CANARY, "prompt": text}),
        (
            "/v1/tasks/SLM-05",
            {"request_id": unsafe_id, "input": {"text": text}, "max_tokens": 24},
        ),
        ("/v1/tasks/SLM-04", {"request_id": unsafe_id, "input": {"alert": {"text": CANARY}}}),
        (f"/v1/tasks/{CANARY}", {"input": {"text": text}}),
    ]
    mark = trail.last_seq()
    statuses = []
    for path, body in requests:
        statuses.append(trail.http.post(path, json=body).status_code)
    assert 200 in statuses and any(s >= 400 for s in statuses)
    records = trail.since(mark, len(requests))
    assert len(records) >= len(requests)

    # The CLI, configured to audit into the same trail: text, an image whose file name and
    # bytes carry the marker, and a failing call naming a file that does not exist.
    db, keys = audit_dirs
    picture = tmp_path / f"{CANARY}-scan.png"
    picture.write_bytes(png(4, note=CANARY))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COHEARA_", "OLLAMA_"))}
    env.update(
        {
            "HOME": str(tmp_path),
            "OMP_NUM_THREADS": "1",
            "COHEARA_AUDIT_ENABLED": "true",
            "COHEARA_AUDIT_PATH": str(db / "audit.sqlite3"),
            "COHEARA_AUDIT_KEY_FILE": str(keys / "audit.key"),
        }
    )
    model = ["--backend", "transformers", "--model", str(tiny_model_dir), "--max-tokens", "3"]
    ok = run_cli("ask", text, "--image", str(picture), *model, env=env)
    assert ok.returncode == 0, ok.stderr
    missing = run_cli("ask", text, "--image", str(tmp_path / f"{CANARY}.dcm"), *model, env=env)
    assert missing.returncode == 4
    cli = [r for r in trail.since(mark) if r.surface == "cli"]
    assert [r.outcome for r in cli] == ["ok", missing_outcome(missing)]
    assert cli[0].images == 1 and cli[0].input_digest and cli[1].input_digest is None

    trail.log.flush()
    written = [p for folder in audit_dirs for p in folder.rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"audit.sqlite3", "audit.key"}
    needles = [CANARY.encode(), CANARY.encode("utf-16-le"), CANARY.lower().encode()]
    needles += [b"Jane Roe", b"chest pain", b"scan.png"]
    for path in written:
        content = path.read_bytes()
        for needle in needles:
            assert needle not in content, (path.name, needle)


def missing_outcome(result: subprocess.CompletedProcess[str]) -> str:
    """What `ask` calls a missing image file (exit 4 either way)."""
    return (
        "invalid_image" if "image" in result.stderr.split(":", 1)[-1].lower() else "invalid_request"
    )


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_coheara(*args, env=env, timeout=300)


# ----- the chain -------------------------------------------------------------------------------


def synthetic(number: int) -> CallRecord:
    return CallRecord(
        started_at=1_760_000_000.0 + number,
        duration_s=0.01 * (number + 1),
        outcome="ok" if number % 3 else "backend_timeout",
        error_class=None if number % 3 else "BackendTimeoutError",
        context=CallContext(request_id=f"r-{number}", surface="python"),
        turns=(),
        schema=None,
        result=None,
    )


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A trail of six records, and its key."""
    folder = tmp_path_factory.mktemp("sealed")
    with AuditLog.open(folder / "audit.sqlite3") as log:
        for number in range(6):
            log.observe(synthetic(number))
    return folder / "audit.sqlite3", folder / "audit.key"


def tampered(sealed: tuple[Path, Path], tmp_path: Path, *statements: str) -> Path:
    """A copy of the sealed trail with `statements` run on it, as an attacker would."""
    db, key = sealed
    copy = tmp_path / "audit.sqlite3"
    shutil.copy(db, copy)
    shutil.copy(key, tmp_path / "audit.key")
    with sqlite3.connect(copy) as connection:
        for statement in statements:
            connection.execute(statement)
    return copy


COLUMNS_BUT_SEQ = [c for c in AuditRecord.__dataclass_fields__ if c != "seq"]


def swap(a: int, b: int) -> list[str]:
    """Swap two records' contents, each place keeping its sequence number."""
    columns = ", ".join(COLUMNS_BUT_SEQ)
    return [
        f"CREATE TEMP TABLE saved AS SELECT * FROM records WHERE seq IN ({a}, {b})",
        f"UPDATE records SET ({columns}) = (SELECT {columns} FROM saved WHERE seq = {b}) "
        f"WHERE seq = {a}",
        f"UPDATE records SET ({columns}) = (SELECT {columns} FROM saved WHERE seq = {a}) "
        f"WHERE seq = {b}",
    ]


def test_an_intact_trail_verifies(sealed: tuple[Path, Path], tmp_path: Path) -> None:
    assert verdict(tampered(sealed, tmp_path)) == (None, "")


@pytest.mark.parametrize(
    ("statements", "broken_at", "reason"),
    [
        (["UPDATE records SET outcome = 'ok' WHERE seq = 4"], 4, "edited"),
        (["UPDATE records SET total_us = total_us + 1 WHERE seq = 5"], 5, "edited"),
        (["UPDATE records SET request_id = NULL WHERE seq = 2"], 2, "edited"),
        (["DELETE FROM records WHERE seq = 3"], 3, "missing"),
        (["DELETE FROM records WHERE seq = 1"], 1, "missing"),
        (["DELETE FROM records WHERE seq = 6"], 6, "missing"),  # the tail: the seal knows
        (swap(2, 4), 2, "previous hash"),
        # two records renumbered into each other's place
        (
            [
                "UPDATE records SET seq = -4 WHERE seq = 4",
                "UPDATE records SET seq = 4 WHERE seq = 5",
                "UPDATE records SET seq = 5 WHERE seq = -4",
            ],
            4,
            "previous hash",
        ),
    ],
)
def test_tampering_reports_the_first_broken_record(
    sealed: tuple[Path, Path],
    tmp_path: Path,
    statements: list[str],
    broken_at: int,
    reason: str,
) -> None:
    found, why = verdict(tampered(sealed, tmp_path, *statements))
    assert found == broken_at and reason in why, why


def test_a_forged_insertion_breaks_the_link_after_it(
    sealed: tuple[Path, Path], tmp_path: Path
) -> None:
    """A record inserted with a correct hash after record 2 (the later ones renumbered):
    record 3, the forgery, links; record 4, the old third, no longer does."""
    path = tampered(sealed, tmp_path)
    store = AuditStore(path)
    second = store.get(2)
    store.close()
    assert second is not None
    forged = AuditRecord(time=second.time, outcome="ok", key_id=second.key_id, surface="native")
    link(forged, 3, second.record_hash)
    row = forged.row()
    names = [c for c in row if row[c] is not None]
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE records SET seq = seq + 100 WHERE seq >= 3")
        connection.execute("UPDATE records SET seq = seq - 99 WHERE seq >= 100")
        connection.execute(
            f"INSERT INTO records ({', '.join(names)}) VALUES ({', '.join('?' for _ in names)})",
            [row[n] for n in names],
        )
    found, why = verdict(path)
    assert found == 4 and "hash" in why


def test_a_rewritten_or_extended_trail_fails_the_seal(
    sealed: tuple[Path, Path], tmp_path: Path
) -> None:
    """Whoever has the database but not the key can rehash the chain after an edit, or
    append a well-linked record, but cannot move the seal."""
    path = tampered(sealed, tmp_path)
    store = AuditStore(path)
    records = list(store.iter_records())
    store.close()
    records[3].outcome = "ok"  # edit record 4, then relink it and everything after it
    previous = records[2].record_hash
    with sqlite3.connect(path) as connection:
        for record in records[3:]:
            link(record, record.seq, previous)
            previous = record.record_hash
            connection.execute(
                "UPDATE records SET outcome = ?, prev_hash = ?, record_hash = ? WHERE seq = ?",
                (record.outcome, record.prev_hash, record.record_hash, record.seq),
            )
        connection.execute("UPDATE head SET record_hash = ?", (previous,))
    found, why = verdict(path)
    assert found == 6 and "seal" in why

    (tmp_path / "appended").mkdir()
    path = tampered(sealed, tmp_path / "appended")
    extra = AuditRecord(time=records[-1].time, outcome="ok", key_id=records[-1].key_id)
    link(extra, 7, verify_last_hash(path))
    row = extra.row()
    names = [c for c in row if row[c] is not None]
    with sqlite3.connect(path) as connection:
        connection.execute(
            f"INSERT INTO records ({', '.join(names)}) VALUES ({', '.join('?' for _ in names)})",
            [row[n] for n in names],
        )
    found, why = verdict(path)
    assert found == 7 and "without the key" in why


def verify_last_hash(path: Path) -> str:
    store = AuditStore(path, readonly=True)
    try:
        last = store.get(store.last_seq() or 0)
    finally:
        store.close()
    assert last is not None
    return last.record_hash


def test_appends_from_two_logs_keep_one_chain(tmp_path: Path) -> None:
    """A server and a CLI run may write one trail at once: each append links after the
    other's."""
    path = tmp_path / "audit.sqlite3"
    with AuditLog.open(path) as first, AuditLog.open(path) as second:
        for number in range(40):
            (first if number % 2 else second).observe(synthetic(number))
    assert verdict(path) == (None, "")
    store = AuditStore(path)
    assert store.count() == 40
    store.close()


# ----- the command line ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("home")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("COHEARA_", "OLLAMA_")) and k != "XDG_DATA_HOME"
    }  # the user data directory under this HOME
    env.update({"HOME": str(home), "NO_COLOR": "1", "COLUMNS": "200"})
    return env


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_audit_verify_exit_codes(
    sealed: tuple[Path, Path], tmp_path: Path, cli_env: dict[str, str]
) -> None:
    intact = run_cli("audit", "verify", "--path", str(sealed[0]), env=cli_env)
    assert intact.returncode == 0, intact.stderr
    assert "intact: 6 record(s)" in intact.stdout

    edited = tampered(sealed, tmp_path, "UPDATE records SET model = 'other' WHERE seq = 4")
    broken = run_cli("audit", "verify", "--path", str(edited), env=cli_env)
    assert broken.returncode == 11
    assert one_error_line(broken).startswith("error: audit trail broken at record 4:")

    nothing = run_cli("audit", "verify", "--path", str(tmp_path / "none.sqlite3"), env=cli_env)
    assert nothing.returncode == 3 and "no audit trail at" in one_error_line(nothing)
    assert not (tmp_path / "none.sqlite3").exists()  # verifying never creates a trail
    (tmp_path / "audit.key").unlink()
    keyless = run_cli("audit", "verify", "--path", str(edited), env=cli_env)
    assert keyless.returncode == 3 and "no audit key" in one_error_line(keyless)


def test_audit_export_is_fhir_audit_events(
    sealed: tuple[Path, Path], tmp_path: Path, cli_env: dict[str, str]
) -> None:
    from fhir.resources.auditevent import AuditEvent
    from fhir.resources.bundle import Bundle

    out = tmp_path / "events.json"
    result = run_cli("audit", "export", "--path", str(sealed[0]), "--out", str(out), env=cli_env)
    assert result.returncode == 0, result.stderr
    document = json.loads(out.read_text())
    Bundle.model_validate(document)
    events = [AuditEvent.model_validate(e["resource"]) for e in document["entry"]]
    assert len(events) == 6 and events[0].action == "E"
    first = document["entry"][0]["resource"]
    details = {d["type"]["coding"][0]["code"]: d for d in first["entity"][0]["detail"]}
    assert details["seq"]["valueInteger"] == 1 and details["prev_hash"]["valueString"] == GENESIS
    assert first["outcome"]["code"]["code"] == "8"  # record 0 is a backend timeout
    assert first["outcome"]["detail"][0]["coding"][0]["code"] == "backend_timeout"
    assert document["entry"][1]["resource"]["outcome"]["code"]["code"] == "0"

    since = iso_time(1_760_000_000.0 + 4)  # records 5 and 6 started then or later
    lines = run_cli(
        "audit", "export", "--path", str(sealed[0]), "--since", since, "--ndjson", env=cli_env
    )
    assert lines.returncode == 0, lines.stderr
    exported = [AuditEvent.model_validate_json(line) for line in lines.stdout.splitlines()]
    assert [e.id for e in exported] == ["coheara-audit-5", "coheara-audit-6"]
    bad = run_cli("audit", "export", "--path", str(sealed[0]), "--since", "yesterday", env=cli_env)
    assert bad.returncode == 4 and "--since" in one_error_line(bad)


def test_audit_list_and_show(sealed: tuple[Path, Path], cli_env: dict[str, str]) -> None:
    listing = run_cli("audit", "list", "--path", str(sealed[0]), "-n", "2", env=cli_env)
    assert listing.returncode == 0, listing.stderr
    rows = [line for line in listing.stdout.splitlines() if line.startswith("│")]
    assert [row.split("│")[1].strip() for row in rows] == ["5", "6"]
    shown = run_cli("audit", "show", "4", "--path", str(sealed[0]), env=cli_env)
    assert shown.returncode == 0 and json.loads(shown.stdout)["request_id"] == "r-3"
    absent = run_cli("audit", "show", "99", "--path", str(sealed[0]), env=cli_env)
    assert absent.returncode == 4 and "no audit record 99" in one_error_line(absent)


def test_export_of_a_live_record_validates(trail: Trail) -> None:
    from fhir.resources.auditevent import AuditEvent

    _, [record] = trail.call("/v1/generate", {"prompt": "Hi.", "max_tokens": 2})
    event = AuditEvent.model_validate(audit_event(record))
    assert event.agent[1].who.display.startswith("transformers:")
    assert bundle([record])["entry"][0]["resource"]["id"] == f"coheara-audit-{record.seq}"


# ----- migrations and settings -----------------------------------------------------------------


def test_a_version_1_trail_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite3"
    key = AuditKey.load(tmp_path / "audit.key")
    old = AuditRecord(time=iso_time(1_700_000_000.0), outcome="ok", key_id=key.key_id)
    later = ("image_digests", "endpoint", "failovers", "adapter")  # columns of versions 2-4
    write_old_trail(path, key, old, version=1, later=later)

    with AuditLog.open(path) as log:
        log.observe(synthetic(1))
    store = AuditStore(path)
    assert store.version() == SCHEMA_VERSION == 4
    columns = {r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(records)")}
    assert set(later) <= columns and store.count() == 2
    store.close()
    assert verdict(path) == (None, "")

    with sqlite3.connect(path) as future:
        future.execute("PRAGMA user_version = 99")
    with pytest.raises(ConfigurationError, match="schema version 99"):
        AuditStore(path)


def test_a_version_3_trail_gains_the_adapter_column_and_still_verifies(tmp_path: Path) -> None:
    """Version 4 adds `adapter`: an old record (no such column) keeps its hash, a new one
    names its adapter, the hash covers it (an edit breaks the chain), and FHIR carries it."""
    path = tmp_path / "audit.sqlite3"
    key = AuditKey.load(tmp_path / "audit.key")
    old = AuditRecord(
        time=iso_time(1_700_000_000.0), outcome="ok", key_id=key.key_id, endpoint="http://a"
    )
    write_old_trail(path, key, old, version=3, later=("adapter",))
    assert verdict(path) == (None, "")
    with AuditLog.open(path) as log:
        log.observe(replace(synthetic(1), adapter="plain-v1"))
        log.observe(synthetic(2))
        log.observe(replace(synthetic(4), adapter="a name with spaces"))
    store = AuditStore(path)
    try:
        assert store.version() == SCHEMA_VERSION == 4
        first, second, third, fourth = store.iter_records()
    finally:
        store.close()
    assert first.record_hash == old.record_hash and first.adapter is None
    assert (second.adapter, third.adapter) == ("plain-v1", None)
    assert fourth.adapter is not None and fourth.adapter.startswith("hmac:")  # not a plain name
    assert verdict(path) == (None, "")
    assert "adapter" in second.hashed_fields() and "adapter" not in third.hashed_fields()

    details = {
        d["type"]["coding"][0]["code"]: d for d in audit_event(second)["entity"][0]["detail"]
    }
    assert details["adapter"]["valueString"] == "plain-v1"
    assert "adapter" not in {
        d["type"]["coding"][0]["code"] for d in audit_event(third)["entity"][0]["detail"]
    }

    with sqlite3.connect(path) as attacker:
        attacker.execute("UPDATE records SET adapter = 'plain-v2' WHERE seq = 2")
    assert verdict(path) == (2, "its hash does not match its fields (edited)")


def test_the_key_is_private_and_never_in_the_database(tmp_path: Path) -> None:
    path = tmp_path / "trail" / "audit.sqlite3"
    with AuditLog.open(path) as log:
        log.observe(synthetic(0))
        secret = log.key.secret
    key_file = path.with_suffix(".key")
    assert key_file.stat().st_mode & 0o777 == 0o600 and len(secret) == 32
    assert path.stat().st_mode & 0o077 == 0
    for file in path.parent.iterdir():
        if file != key_file:
            content = file.read_bytes()
            assert secret not in content and secret.hex().encode() not in content
    key_file.chmod(0o644)
    with pytest.raises(ConfigurationError, match="readable by other users"):
        AuditKey.load(key_file)


def test_audit_settings_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert default_audit_path() == tmp_path / ".local/share/coheara/audit.sqlite3"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_audit_path() == tmp_path / "data/coheara/audit.sqlite3"
    monkeypatch.delenv("COHEARA_AUDIT_ENABLED")
    settings = Settings()
    assert settings.audit_enabled is None and settings.audit_key_file is None
    assert settings.audit_path == tmp_path / "data/coheara/audit.sqlite3"
    # Unset: on for the server, off for the CLI and the Python API.
    monkeypatch.setenv("COHEARA_AUDIT_PATH", str(tmp_path / "t.sqlite3"))
    settings = Settings()
    assert AuditLog.from_settings(settings, default=False) is None
    served = AuditLog.from_settings(settings, default=True)
    assert served is not None and served.path == tmp_path / "t.sqlite3"
    served.close()
    assert (tmp_path / "t.key").is_file()
    monkeypatch.setenv("COHEARA_AUDIT_ENABLED", "false")
    assert AuditLog.from_settings(Settings(), default=True) is None


def test_coheara_serve_audits_by_default_into_the_user_data_dir(
    cli_env: dict[str, str], tiny_model_dir: Path
) -> None:
    from coheara.server.background import serve_in_process

    home = Path(cli_env["HOME"])
    with serve_in_process(str(tiny_model_dir), env=cli_env, capture=True) as (url, process):
        answer = httpx.post(
            url + "/api/generate",
            json={
                "model": "medgemma",
                "prompt": "Hi.",
                "stream": False,
                "options": {"num_predict": 2},
            },
            timeout=120,
        )
        assert answer.status_code == 200
    _, err = process.communicate(timeout=30)
    db = home / ".local/share/coheara/audit.sqlite3"
    assert f"audit trail: {db}" in err
    store = AuditStore(db, readonly=True)
    try:
        [record] = list(store.iter_records())
    finally:
        store.close()
    assert (record.surface, record.outcome) == ("ollama", "ok")
    intact = run_cli("audit", "verify", env=cli_env)  # the default path, the default key
    assert intact.returncode == 0 and "intact: 1 record(s)" in intact.stdout


def test_the_python_api_audits_only_when_configured(tiny_engine: Engine, tmp_path: Path) -> None:
    from coheara.audit import attach

    settings = Settings(audit_path=tmp_path / "api.sqlite3")
    engine = Engine(tiny_engine.backend, settings)
    assert attach(engine) is None and not engine.observers
    engine = Engine(tiny_engine.backend, settings.model_copy(update={"audit_enabled": True}))
    log = attach(engine)
    assert log is not None
    with log:
        asyncio.run(engine.generate("Summarise: stable.", max_tokens=2))
    store = AuditStore(tmp_path / "api.sqlite3")
    [record] = list(store.iter_records())
    store.close()
    assert (record.surface, record.outcome, record.output_tokens) == ("python", "ok", 2)


def test_an_abandoned_call_is_cancelled_and_a_finished_one_ok(
    tiny_engine: Engine, tmp_path: Path
) -> None:
    """A stream closed before its result is a cancelled call; one closed just after its
    result (the server's non-streaming path does that) completed."""
    engine = Engine(tiny_engine.backend, Settings(max_output_tokens=4))

    async def calls() -> None:
        stream = engine.stream("Summarise: stable.")
        async for _ in stream:
            break
        await stream.aclose()
        stream = engine.stream("Summarise: stable.")
        async for chunk in stream:
            if chunk.result is not None:
                break
        await stream.aclose()

    with AuditLog.open(tmp_path / "audit.sqlite3") as log:
        log.attach(engine)
        asyncio.run(calls())
        log.detach(engine)
        asyncio.run(engine.generate("Not recorded."))
    store = AuditStore(tmp_path / "audit.sqlite3")
    records = list(store.iter_records())
    store.close()
    assert [(r.outcome, r.error_class) for r in records] == [
        ("cancelled", "GeneratorExit"),
        ("ok", None),
    ]
    assert records[0].output_digest is None and records[1].output_digest
