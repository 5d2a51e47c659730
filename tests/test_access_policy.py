"""Access policy details from the security review: a task-limited key cannot reach the
free-prompt dialects by default, revoking the last key never reopens a server, and backend
credentials never reach a health report, an error body or a result."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cli_support import in_process
from coheara import Engine, Settings, model_facts
from coheara.access.auth import Access
from coheara.access.keys import KeyStore
from coheara.server import create_app
from fakes import FakeOllama, OllamaModel
from servers import free_port, serve

PASSWORD = "S3cretPw-77"


def test_a_task_limited_key_gets_the_tasks_endpoint_only(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    limited, _ = store.create("pacs", ["SLM-01"])
    assert limited.tasks == ("SLM-01",) and limited.endpoints == ("tasks",)
    widened, _ = store.create("pacs-wide", ["SLM-01"], ["tasks", "native"])
    assert widened.endpoints == ("tasks", "native")  # said explicitly: kept
    everything, _ = store.create("ward")
    assert everything.tasks == ("*",) and everything.endpoints == ("*",)


def test_revoking_the_last_key_keeps_the_server_closed(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    access = Access(store)
    assert access.decide("POST", "/v1/generate", None, "native").error is None  # never keyed
    _, key = store.create("only")
    assert access.decide("POST", "/v1/generate", None, "native").error is not None
    store.revoke("only")
    refused = access.decide("POST", "/v1/generate", f"Bearer {key}", "native")
    assert refused.error is not None and refused.error.http_status == 401
    assert access.decide("POST", "/v1/generate", None, "native").error is not None
    assert access.decide("GET", "/healthz", None, None).error is None


def test_the_cli_warns_about_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COHEARA_KEYS_PATH", str(tmp_path / "keys.json"))
    cli = in_process(monkeypatch, capsys)

    def run(*args: str) -> tuple[int, str]:
        ran = cli(*args)
        return ran.returncode, ran.stderr

    code, err = run("keys", "create", "narrow", "--task", "SLM-04")
    assert code == 0 and "warning" not in err
    code, err = run("keys", "create", "broad", "--task", "SLM-04", "--endpoint", "native")
    assert code == 0 and "warning: the key may also call native" in err
    run("keys", "revoke", "narrow")
    code, err = run("keys", "revoke", "broad")
    assert code == 0 and "no active key is left" in err and "does not reopen" in err


@pytest.fixture(scope="module")
def fake_backend() -> Iterator[str]:
    fake = FakeOllama({model_facts.DEFAULT_OLLAMA_MODEL: OllamaModel()})
    with serve(fake.app) as url:
        yield url


@pytest.mark.parametrize("up", [True, False])
def test_backend_credentials_never_leave_the_server(
    fake_backend: str, up: bool, tmp_path: Path
) -> None:
    port = fake_backend.rsplit(":", 1)[1] if up else str(free_port())
    url = f"http://admin:{PASSWORD}@127.0.0.1:{port}"
    settings = Settings(backend="ollama", max_output_tokens=4, keys_path=tmp_path / "k.json")
    engine = Engine.from_config(settings=settings, url=url)
    with serve(create_app(engine, settings)) as server:
        answers = [
            httpx.get(server + "/healthz", timeout=30),
            httpx.get(server + "/readyz", timeout=30),
            httpx.post(server + "/v1/generate", json={"prompt": "hi"}, timeout=30),
            httpx.post(
                server + "/api/chat",
                json={"model": "medgemma", "messages": [{"role": "user", "content": "hi"}]},
                timeout=30,
            ),
        ]
    assert [a.status_code for a in answers][:3] == ([200, 200, 200] if up else [503, 503, 503])
    for answer in answers:
        assert PASSWORD not in answer.text and "admin" not in answer.text
    assert f"127.0.0.1:{port}" in answers[1].text  # the endpoint is still named, safely
