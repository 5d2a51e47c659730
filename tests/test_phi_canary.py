"""No PHI in the clear anywhere the service writes or prints (issue 5's canary test).

`coheara serve` runs as deployed, in its own process: audit trail on and keeping each
call's content (encrypted), API keys on, logs at their most verbose (debug, JSON), and its
temporary directory, home and data directory inside the test's folder. Requests whose
text, system prompts, images (a PNG text chunk, a DICOM patient name), model names,
request ids, credentials, headers, paths and query strings carry a unique marker go
through every surface, many of them failing on purpose. Then every byte the service wrote
(every file under its folders), printed (stdout, stderr) and served (/metrics) is
searched: zero hits, and the API key itself appears nowhere either. Once per backend
dialect (Ollama and OpenAI-compatible), since each client library logs differently.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from coheara import model_facts
from coheara.access.keys import KeyStore
from fakes.fake_ollama import FakeOllama, OllamaModel
from fakes.fake_openai import FakeOpenAI, OpenAIModel
from servers import free_port, serve

CANARY = "CANARY-91c4e"
TEXT = f"{CANARY} Jane Roe, MRN {CANARY}-0042, chest pain since Tuesday."
NEEDLES = [
    CANARY.encode(),
    CANARY.lower().encode(),
    CANARY.encode("utf-16-le"),
    base64.b64encode(CANARY.encode())[:12],
    b"Jane Roe",
    b"chest pain",
]


def marked_png() -> str:
    pixels = np.random.default_rng(7).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", f"{CANARY} patient Jane Roe")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode()


def marked_dicom() -> str:
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    dataset = dcmread(get_testdata_file("CT_small.dcm"))
    dataset.PatientName = f"{CANARY}^Jane"
    dataset.PatientID = CANARY
    dataset.StudyDescription = CANARY
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return base64.b64encode(buffer.getvalue()).decode()


def requests_with_the_marker(model: str) -> list[tuple[str, str, dict[str, Any] | None]]:
    png, dicom = marked_png(), marked_dicom()
    bad_image = base64.b64encode(b"not an image " + CANARY.encode()).decode()
    chat = {"role": "user", "content": TEXT}
    return [
        ("POST", "/v1/generate", {"prompt": TEXT, "system": CANARY, "images": [png]}),
        ("POST", "/v1/generate", {"prompt": TEXT, "stream": True, "max_tokens": 3}),
        ("POST", "/v1/generate", {"prompt": CANARY, "images": [bad_image]}),
        ("POST", "/v1/generate", {"prompt": [CANARY], "bogus": CANARY}),
        ("POST", "/v1/generate", {"prompt": f"<start_of_turn>{CANARY}"}),
        (
            "POST",
            "/v1/extract",
            {"prompt": TEXT, "schema": {"type": "object", "properties": {CANARY: {}}}},
        ),
        (
            "POST",
            "/v1/chat/completions",
            {
                "model": model,
                "messages": [
                    {"role": "system", "content": CANARY},
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": TEXT},
                            {
                                "type": "image_url",
                                "image_url": {"url": "data:image/png;base64," + png},
                            },
                        ],
                    },
                ],
                "max_tokens": 3,
            },
        ),
        ("POST", "/v1/chat/completions", {"model": CANARY, "messages": [chat]}),
        ("POST", "/v1/chat/completions", {"model": model, "messages": [chat], "stream": True}),
        (
            "POST",
            "/api/chat",
            {"model": model, "messages": [{**chat, "images": [png, dicom]}], "stream": False},
        ),
        ("POST", "/api/chat", {"model": model, "messages": [{**chat, "images": [bad_image]}]}),
        ("POST", "/api/generate", {"model": CANARY, "prompt": TEXT}),
        ("POST", "/api/generate", {"model": model, "prompt": TEXT, "stream": False}),
        ("POST", "/api/show", {"model": CANARY}),
        ("POST", "/v1/tasks/SLM-05", {"request_id": f"{CANARY} Jane Roe", "input": {"text": TEXT}}),
        ("POST", "/v1/tasks/SLM-04", {"input": {"alert": {"text": CANARY}}}),
        ("POST", f"/v1/tasks/{CANARY}", {"input": {"text": TEXT}}),
        ("GET", f"/v1/tasks/{CANARY}", None),
        ("GET", f"/v1/models/{CANARY}", None),
        ("GET", f"/{CANARY}?q={CANARY}", None),
        ("POST", f"/v1/generate?patient={CANARY}", {"prompt": TEXT, "max_tokens": 2}),
    ]


@pytest.fixture(params=["ollama", "openai"])
def backend(request: pytest.FixtureRequest) -> Iterator[tuple[str, str, str]]:
    """(backend name, its URL, the model id to ask for)."""
    if request.param == "ollama":
        model = model_facts.DEFAULT_OLLAMA_MODEL
        fake: Any = FakeOllama({model: OllamaModel(capabilities=["completion", "vision"])})
        suffix = ""
    else:
        model = model_facts.DEFAULT_HF_MODEL
        fake = FakeOpenAI({model: OpenAIModel()})
        suffix = "/v1"
    with serve(fake.app) as url:
        yield request.param, url + suffix, model


def test_nothing_the_service_writes_or_prints_carries_the_marker(
    backend: tuple[str, str, str], tmp_path: Path
) -> None:
    name, backend_url, model = backend
    home = tmp_path / "home"
    for folder in ("home", "tmp", "data", "config"):
        (tmp_path / folder).mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COHEARA_", "OLLAMA_"))}
    env.update(
        {
            "HOME": str(home),
            "TMPDIR": str(tmp_path / "tmp"),
            "XDG_DATA_HOME": str(tmp_path / "data"),
            "XDG_CONFIG_HOME": str(tmp_path / "config"),
            "COHEARA_CONFIG": str(tmp_path / "config" / "none.toml"),
            "COHEARA_AUDIT_ENABLED": "true",
            "COHEARA_LOG_FORMAT": "json",
            "COHEARA_LOG_LEVEL": "debug",
            "COHEARA_MAX_OUTPUT_TOKENS": "8",
            "PYTHONUNBUFFERED": "1",
        }
    )
    _, api_key = KeyStore(tmp_path / "data" / "keys.json").create("canary-client")
    env.update(
        {
            "COHEARA_KEYS_PATH": str(tmp_path / "data" / "keys.json"),
            "COHEARA_AUDIT_RETAIN_CONTENT": "true",  # kept, encrypted: still no clear text
            "COHEARA_AUDIT_CONTENT_KEY": base64.b64encode(os.urandom(32)).decode(),
        }
    )
    port = free_port()
    command = ["serve", "--port", str(port), "--backend", name, "--url", backend_url]
    process = subprocess.Popen(
        [sys.executable, "-m", "coheara.cli.main", *command, "--model", model],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    served: list[bytes] = []
    statuses: list[int] = []
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert process.poll() is None, "coheara serve exited"
                assert time.monotonic() < deadline, "coheara serve did not start"
                time.sleep(0.2)
            headers = {
                "X-Request-ID": f"{CANARY} Jane Roe",
                "User-Agent": f"{CANARY}-agent",
                "Authorization": f"Bearer {api_key}",
            }
            for method, path, body in requests_with_the_marker(model):
                response = client.request(method, path, json=body, headers=headers)
                statuses.append(response.status_code)
            for credentials in (f"Bearer {CANARY}", f"Basic {CANARY}", f"Bearer coh_{CANARY}_x"):
                refused = client.post(
                    "/v1/generate",
                    json={"prompt": TEXT},
                    headers={**headers, "Authorization": credentials},
                )
                statuses.append(refused.status_code)
            metrics = client.get("/metrics", headers=headers)
            served.append(metrics.content)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            stdout, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
    assert 200 in statuses and {400, 401, 404} <= set(statuses), statuses
    assert b"coheara_requests" in served[0]  # the exposition itself was searched
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any(path.name == "audit.sqlite3" for path in written)
    haystacks = {"stdout": stdout, "stderr": stderr, "/metrics": b"".join(served)}
    haystacks.update({str(path.relative_to(tmp_path)): path.read_bytes() for path in written})
    secret = api_key.split("_", 2)[2].encode()  # the API key (coh_<id>_<secret>) is a secret too
    hits = [
        (where, needle)
        for where, content in haystacks.items()
        for needle in [*NEEDLES, secret]
        if needle in content
    ]
    leaks = [(where, _around(haystacks[where], needle)) for where, needle in hits]
    assert hits == [], leaks
    assert stderr.strip(), "the service printed nothing: the search proved nothing"


def _around(content: bytes, needle: bytes) -> str:
    """The first leak in context, for the failure message."""
    at = content.find(needle)
    return content[max(0, at - 160) : at + 80].decode("utf-8", "replace")
