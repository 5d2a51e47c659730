"""The egress guard: a backend URL off loopback is refused at start-up unless allowed."""

from __future__ import annotations

import os

import pytest

from cli_support import run_coheara
from coheara import Engine, Settings
from coheara.access.egress import check_backend_url
from coheara.errors import ConfigurationError


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://127.0.0.1:11434", []),
        ("http://127.9.9.9:1", []),
        ("http://localhost:8000/v1", []),
        ("http://[::1]:8000/v1", []),
        ("http://[::ffff:127.0.0.1]:9", []),
        ("127.0.0.1:11434", []),
        ("http://10.1.2.3:11434", ["10.0.0.0/8"]),
        ("https://GPU01.hospital.local/v1", ["gpu01.hospital.local"]),
        ("http://[fd00::5]:8000", ["fd00::/8"]),
    ],
)
def test_loopback_and_allowed_hosts_pass(url: str, allowed: list[str]) -> None:
    check_backend_url(url, allowed)


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://10.1.2.3:11434", []),
        ("https://api.openai.com/v1", ["openai.com"]),  # a suffix is not the host
        ("http://localhost.example.com", []),
        ("http://127.0.0.1.nip.io", []),  # a name is never resolved
        ("http://2130706433", []),
        ("http://11.0.0.1", ["10.0.0.0/8"]),
        ("http://user:pw@10.1.2.3", ["not-an-address/99"]),
    ],
)
def test_other_hosts_are_refused_with_the_fix(url: str, allowed: list[str]) -> None:
    with pytest.raises(ConfigurationError, match="allowed_backend_hosts") as caught:
        check_backend_url(url, allowed)
    assert "pw" not in str(caught.value)  # credentials in a URL are never echoed
    assert "COHEARA_ALLOWED_BACKEND_HOSTS=" in str(caught.value)


@pytest.mark.parametrize("backend", ["ollama", "openai", "auto"])
def test_engine_from_config_refuses_a_remote_backend(backend: str) -> None:
    settings = Settings(
        backend=backend, ollama_url="http://10.9.8.7:11434", openai_url="http://10.9.8.7:8000/v1"
    )
    with pytest.raises(ConfigurationError, match=r"10\.9\.8\.7"):
        Engine.from_config(settings=settings)
    allowed = settings.model_copy(update={"allowed_backend_hosts": ["10.9.8.7"]})
    assert Engine.from_config(settings=allowed).backend is not None


def test_the_cli_says_it_in_one_line() -> None:
    environment = {**os.environ, "COHEARA_OLLAMA_URL": "http://192.0.2.10:11434"}
    result = run_coheara("ask", "hello", "--backend", "ollama", env=environment, timeout=60)
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert "192.0.2.10" in result.stderr and "Traceback" not in result.stderr
    assert len(lines) <= 2  # the error, and its fix
