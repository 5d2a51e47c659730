"""Structured logs: `coheara serve` as deployed (its own process, JSON lines on stderr), in
front of a fake Ollama. The access lines carry the route template and the echoed request
id; a canary sent in bodies, paths, query strings and model names never appears in what
the server printed. The formatters are also checked alone on an exception whose message
quotes client text.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cli_support import stop
from coheara import Settings, model_facts
from coheara.logs import configure_logging
from fakes import FakeOllama, OllamaModel
from servers import free_port, serve

CANARY = "CANARY-log-51e2"


@pytest.fixture(scope="module")
def fake_ollama() -> Iterator[str]:
    fake = FakeOllama({model_facts.DEFAULT_OLLAMA_MODEL: OllamaModel()})
    with serve(fake.app) as url:
        yield url


def run_server(fake_url: str, tmp_path: Path, log_format: str) -> tuple[str, subprocess.Popen[str]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COHEARA_", "OLLAMA_"))}
    env.update(
        {
            "HOME": str(tmp_path),
            "XDG_DATA_HOME": str(tmp_path / "data"),
            "COHEARA_CONFIG": str(tmp_path / "none.toml"),
            "COHEARA_LOG_FORMAT": log_format,
            "COHEARA_AUDIT_PATH": str(tmp_path / "audit.sqlite3"),
            "NO_COLOR": "1",
        }
    )
    (tmp_path / "none.toml").write_text("")
    output = (tmp_path / "server.log").open("w")
    command = ["serve", "--backend", "ollama", "--url", fake_url, "--port", str(port)]
    process = subprocess.Popen(
        [sys.executable, "-m", "coheara.cli.main", *command],
        env=env,
        stdout=output,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return url, process
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(
                "coheara serve did not start: " + (tmp_path / "server.log").read_text()
            )
        time.sleep(0.1)


def test_json_access_lines_have_route_templates_request_ids_and_no_client_text(
    fake_ollama: str, tmp_path: Path
) -> None:
    url, process = run_server(fake_ollama, tmp_path, "json")
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            ok = client.post(
                f"/v1/generate?note={CANARY}",
                json={"prompt": f"{CANARY} chest pain"},
                headers={"X-Request-ID": "log-test-1"},
            )
            assert ok.status_code == 200 and ok.headers["X-Request-ID"] == "log-test-1"
            task = client.post(f"/v1/tasks/{CANARY}", json={"input": {"note": CANARY}})
            assert task.status_code == 404
            assert client.get(f"/{CANARY}/x?q={CANARY}").status_code == 404
            invalid = client.post("/v1/generate", json={"prompt": CANARY, "max_tokens": CANARY})
            assert invalid.status_code == 422
            chat = {"model": CANARY, "messages": [{"role": "user", "content": CANARY}]}
            assert client.post("/api/chat", json=chat).status_code == 404
    finally:
        stop(process)
    output = (tmp_path / "server.log").read_text()
    assert CANARY.lower() not in output.lower()
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "coheara.access"]
    seen = [(a["method"], a["route"], a["status"]) for a in access]
    assert seen == [
        ("GET", "/healthz", 200),  # the start-up probes (one or more) come first
    ] * (len(seen) - 5) + [
        ("POST", "/v1/generate", 200),
        ("POST", "/v1/tasks/{task_id}", 404),
        ("GET", "-", 404),
        ("POST", "/v1/generate", 422),
        ("POST", "/api/chat", 404),
    ]
    first = access[len(seen) - 5]
    assert first["request_id"] == "log-test-1"
    assert first["client"] == "127.0.0.1" and first["duration_ms"] > 0
    assert first["level"] == "info" and first["time"].endswith("+00:00")
    for line in access[len(seen) - 4 :]:  # the others got ids of their own
        assert len(line["request_id"]) == 32
    assert "HTTP/1.1" not in output  # uvicorn's own access log (raw paths) is off


def test_text_lines_are_readable_and_carry_the_request_id(fake_ollama: str, tmp_path: Path) -> None:
    url, process = run_server(fake_ollama, tmp_path, "text")
    try:
        answer = httpx.post(
            f"{url}/v1/generate",
            json={"prompt": CANARY},
            headers={"X-Request-ID": "text-1"},
            timeout=30,
        )
        assert answer.status_code == 200
    finally:
        stop(process)
    output = (tmp_path / "server.log").read_text()
    assert CANARY not in output
    (line,) = [line for line in output.splitlines() if "coheara.access" in line and "POST" in line]
    assert "[text-1] POST /v1/generate 200" in line and " INFO " in line


def failing_record(logger: logging.Logger) -> None:
    try:
        raise ValueError(f"could not parse {CANARY}")
    except ValueError:
        logger.exception("parsing failed")


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_a_logged_exception_shows_its_class_and_stack_never_its_message(log_format: str) -> None:
    stream = io.StringIO()
    handler = configure_logging(Settings(log_format=log_format, log_level="info"), stream=stream)
    root = logging.getLogger()
    level = root.level
    try:
        failing_record(logging.getLogger("coheara.test"))
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    output = stream.getvalue()
    assert CANARY not in output
    assert "builtins.ValueError (message withheld)" in output
    assert "failing_record" in output  # the stack frames are kept
    if log_format == "json":
        (line,) = [json.loads(text) for text in output.splitlines() if text.startswith("{")]
        entry: dict[str, Any] = line
        assert entry["message"] == "parsing failed" and entry["level"] == "error"
        assert entry["logger"] == "coheara.test" and entry["request_id"] is None
