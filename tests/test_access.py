"""Access control: the key store, the 401/403 decisions on every surface, the audit of
refusals, the bind refusal and TLS.

The server tests run the tiny model behind `create_app(..., access=...)` over loopback
and check the wire with the official `openai` and `ollama` clients. The `coheara serve`
tests start the real command against a fake Ollama, each wait bounded.
"""

from __future__ import annotations

import base64
import datetime as dt
import hmac
import ipaddress
import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from cli_support import Ran, in_process, run_coheara, stop
from coheara import Engine, Settings, model_facts
from coheara.access import keys as keys_module
from coheara.access.auth import Access
from coheara.access.bind import bind_warning, check_bind, check_tls, is_loopback_bind
from coheara.access.keys import KeyStore, parse_key
from coheara.audit import AuditLog, AuditRecord
from coheara.errors import ConfigurationError, InvalidRequestError, TaskNotFoundError
from coheara.server import create_app
from coheara.tasks import all_tasks
from fakes import FakeOllama, OllamaModel
from servers import free_port, serve
from task_support import example, tiny

PROMPT = "Summarise: fever and productive cough for three days."
REFUSED = "a valid API key is required (send the header Authorization: Bearer <key>)"


# ----- the store ----------------------------------------------------------------------


def test_create_list_revoke(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "sub" / "keys.json")
    pacs, pacs_key = store.create("radiology-pacs", ["slm-04", "IMG-CXR"], ["tasks", "native"])
    ward, ward_key = store.create("ward-app")
    assert pacs.tasks == ("SLM-04", "IMG-CXR") and pacs.endpoints == ("tasks", "native")
    assert ward.tasks == ("*",) and ward.endpoints == ("*",)
    assert parse_key(pacs_key) is not None and pacs_key.startswith(f"coh_{pacs.id}_")
    assert [r.name for r in store.records()] == ["radiology-pacs", "ward-app"]
    assert store.active_count() == 2

    ring = store.load()
    assert ring.verify(pacs_key) == pacs and ring.verify(ward_key) == ward
    assert ring.verify(ward_key[:-1] + ("A" if ward_key[-1] != "A" else "B")) is None
    for spare in range(1, 4):  # the last character's 2 unused bits: another spelling, refused
        last = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        index = last.index(ward_key[-1]) ^ spare
        assert ring.verify(ward_key[:-1] + last[index]) is None

    revoked = store.revoke("radiology-pacs")
    assert revoked.revoked is not None and not revoked.active
    assert store.revoke("radiology-pacs") == revoked  # again: nothing changes
    assert store.active_count() == 1
    assert store.load().verify(pacs_key) is None and store.load().verify(ward_key) == ward
    listed = {row["name"]: row for row in (r.public() for r in store.records())}
    assert listed["radiology-pacs"]["status"] == "revoked"
    assert listed["ward-app"]["status"] == "active"
    assert not {"salt", "hash"} & set(listed["ward-app"])
    with pytest.raises(InvalidRequestError, match="no key named 'nobody'"):
        store.revoke("nobody")


def test_the_file_is_0600_and_holds_neither_key_nor_secret(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    made = [store.create(f"client-{n}")[1] for n in range(3)]
    store.revoke("client-1")
    assert (store.path.stat().st_mode & 0o777) == 0o600
    data = store.path.read_bytes()
    for key in made:
        key_id, secret = parse_key(key) or ("", b"")
        encoded = key.rsplit("_", 1)[1] if key.count("_") == 2 else key[len(key_id) + 5 :]
        for needle in (key, encoded, secret.hex(), base64.b64encode(secret).decode()):
            assert needle.encode() not in data
        assert secret not in data
        assert key_id.encode() in data  # the lookup id is stored, and only it
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_store_others_can_read_is_refused(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    store.create("ward-app")
    store.path.chmod(0o640)
    with pytest.raises(ConfigurationError, match="readable by other users") as caught:
        store.load()
    assert f"chmod 600 {store.path}" in str(caught.value)
    with pytest.raises(ConfigurationError):
        store.create("another")


def test_names_are_unique_and_plain(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    store.create("ward-app")
    store.revoke("ward-app")
    for taken in ("ward-app", "WARD-APP"):  # a revoked name stays taken: the audit names it
        with pytest.raises(InvalidRequestError, match="already exists"):
            store.create(taken)
    for bad in ("", "two words", "-dash-first", "a/b", "x" * 65):
        with pytest.raises(InvalidRequestError, match="invalid key name"):
            store.create(bad)
    with pytest.raises(TaskNotFoundError):
        store.create("c1", tasks=["SLM-99"])
    with pytest.raises(InvalidRequestError, match="unknown endpoint 'admin'"):
        store.create("c2", endpoints=["admin"])
    assert [r.name for r in store.records()] == ["ward-app"]


def test_every_failure_costs_one_compare_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unknown id, wrong secret, malformed, missing or revoked: the same single comparison
    as a valid key, so the time does not tell which part was wrong."""
    store = KeyStore(tmp_path / "keys.json")
    _, good = store.create("good")
    _, gone = store.create("gone")
    store.revoke("gone")
    ring = store.load()
    key_id = good.split("_")[1]
    secret = good[len(f"coh_{key_id}_") :]
    other_secret = ("B" if secret[0] == "A" else "A") + secret[1:]
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(keys_module.hmac, "compare_digest", counting)
    cases = {
        "valid": good,
        "unknown id": f"coh_{'0' * 12}_{secret}",
        "wrong secret": f"coh_{key_id}_{other_secret}",
        "malformed": "coh_nothing",
        "missing": None,
        "revoked": gone,
    }
    for case, key in cases.items():
        calls.clear()
        found = ring.verify(key)
        assert (found is not None) == (case == "valid"), case
        assert len(calls) == 1, case
        assert all(len(a) == len(b) == 32 for a, b in calls), case


# ----- over loopback: the tiny model behind keys ---------------------------------------


@dataclass
class Keyed:
    url: str
    store: KeyStore
    audit: AuditLog
    keys: dict[str, str]

    def records(self, request_id: str) -> list[AuditRecord]:
        assert self.audit.flush(timeout=30)
        store = self.audit.reader()
        try:
            return [r for r in store.iter_records() if r.request_id == request_id]
        finally:
            store.close()


@pytest.fixture(scope="module")
def keyed(tiny_engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyed]:
    folder = tmp_path_factory.mktemp("access")
    store = KeyStore(folder / "keys.json")
    keys = {
        "all": store.create("ward-app")[1],
        "ollama-only": store.create("ollama-only", endpoints=["ollama"])[1],
        "slm-04": store.create("alert-bot", tasks=["SLM-04"], endpoints=["tasks"])[1],
        "revoked": store.create("old-pacs")[1],
    }
    store.revoke("old-pacs")
    engine = tiny(tiny_engine)
    with (
        AuditLog.open(folder / "a.sqlite3") as audit,
        serve(create_app(engine, audit=audit, access=Access(store))) as url,
    ):
        yield Keyed(url, store, audit, keys)


def bearer(key: str | None) -> dict[str, str]:
    return {} if key is None else {"Authorization": f"Bearer {key}"}


CALLS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "native": ("POST", "/v1/generate", {"prompt": PROMPT, "max_tokens": 4}),
    "tasks": ("POST", "/v1/tasks/SLM-04", {"input": {}}),
    "openai": (
        "POST",
        "/v1/chat/completions",
        {"model": "medgemma", "messages": [{"role": "user", "content": PROMPT}]},
    ),
    "ollama": (
        "POST",
        "/api/chat",
        {"model": "medgemma", "messages": [{"role": "user", "content": PROMPT}]},
    ),
    "openai listing": ("GET", "/v1/models", {}),
    "ollama listing": ("GET", "/api/tags", {}),
    "tasks listing": ("GET", "/v1/tasks", {}),
}


def message_of(surface: str, body: dict[str, Any]) -> str:
    """The error message in the surface's own shape (the shape itself checked)."""
    if surface.startswith("ollama"):
        assert set(body) == {"error"} and isinstance(body["error"], str)
        return str(body["error"])
    error = body["error"]
    if surface.startswith(("openai", "tasks listing")):
        assert error["type"] == "invalid_request_error"
        assert error["code"] in ("invalid_api_key", "permission_denied")
    else:
        assert error["code"] in ("invalid_api_key", "permission_denied")
    return str(error["message"])


def wrong_secret(key: str) -> str:
    key_id = key.split("_")[1]
    secret = key[len(f"coh_{key_id}_") :]
    return f"coh_{key_id}_{('B' if secret[0] == 'A' else 'A') + secret[1:]}"


@pytest.mark.parametrize("who", ["none", "not a key", "wrong secret", "revoked", "basic"])
@pytest.mark.parametrize("surface", list(CALLS))
def test_no_valid_key_is_a_401_in_the_surface_shape(keyed: Keyed, surface: str, who: str) -> None:
    method, path, body = CALLS[surface]
    headers = {
        "none": {},
        "not a key": bearer("sk-123"),
        "wrong secret": bearer(wrong_secret(keyed.keys["all"])),
        "revoked": bearer(keyed.keys["revoked"]),
        "basic": {"Authorization": "Basic " + base64.b64encode(b"a:b").decode()},
    }[who]
    answer = httpx.request(method, keyed.url + path, json=body or None, headers=headers, timeout=30)
    assert answer.status_code == 401, answer.text
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    assert answer.headers["X-Request-ID"]
    assert message_of(surface, answer.json()) == REFUSED  # one message for every case


def test_open_routes_stay_open(keyed: Keyed) -> None:
    assert httpx.get(keyed.url + "/healthz", timeout=30).status_code == 200
    assert httpx.get(keyed.url + "/").status_code == 200
    assert httpx.head(keyed.url + "/").status_code == 200
    assert httpx.get(keyed.url + "/docs").status_code == 200
    document = httpx.get(keyed.url + "/openapi.json").json()
    scheme = document["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert {"bearer": []} in document["paths"]["/v1/chat/completions"]["post"]["security"]
    assert "security" not in document["paths"]["/healthz"]["get"]
    for path, method, shape in (
        ("/api/chat", "post", "OllamaError"),
        ("/v1/chat/completions", "post", "OpenAIError"),
        ("/v1/generate", "post", "NativeError"),
    ):
        for status in ("401", "403"):
            documented = document["paths"][path][method]["responses"][status]
            assert documented["content"]["application/json"]["schema"]["$ref"].endswith(shape)
    assert httpx.post(keyed.url + "/").status_code == 401  # only Ollama's probe is open
    assert httpx.get(keyed.url + "/nowhere").status_code == 401  # unknown: closed too


def test_the_openai_client_is_refused_then_served(keyed: Keyed) -> None:
    messages: Any = [{"role": "user", "content": PROMPT}]
    for key in ("coh_not_a_key", wrong_secret(keyed.keys["all"]), keyed.keys["revoked"]):
        client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as caught:
            client.chat.completions.create(model="medgemma", messages=messages, max_tokens=4)
        assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    client = openai.OpenAI(
        base_url=keyed.url + "/v1", api_key=keyed.keys["ollama-only"], max_retries=0
    )
    with pytest.raises(openai.PermissionDeniedError, match="may not call the openai endpoints"):
        client.models.list()
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=keyed.keys["all"], max_retries=0)
    reply = client.chat.completions.create(model="medgemma", messages=messages, max_tokens=4)
    assert reply.choices[0].message.role == "assistant" and reply.usage is not None
    assert reply.usage.completion_tokens >= 1
    streamed = client.chat.completions.create(
        model="medgemma", messages=messages, max_tokens=4, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == (
        reply.choices[0].message.content
    )


def test_the_ollama_client_is_refused_then_served(keyed: Keyed) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    for key in (None, wrong_secret(keyed.keys["all"]), keyed.keys["revoked"]):
        client = ollama.Client(host=keyed.url, headers=bearer(key), timeout=60)
        with pytest.raises(ollama.ResponseError) as caught:
            client.chat(model="medgemma", messages=messages, options={"num_predict": 4})
        assert caught.value.status_code == 401
        assert caught.value.error == REFUSED
    client = ollama.Client(host=keyed.url, headers=bearer(keyed.keys["slm-04"]), timeout=60)
    with pytest.raises(ollama.ResponseError) as caught:
        client.list()
    assert caught.value.status_code == 403
    assert "'alert-bot' may not call the ollama endpoints" in caught.value.error
    for name in ("ollama-only", "all"):
        client = ollama.Client(host=keyed.url, headers=bearer(keyed.keys[name]), timeout=60)
        reply = client.chat(model="medgemma", messages=messages, options={"num_predict": 4})
        assert reply.done and reply.eval_count and reply.eval_count >= 1
        assert "medgemma:latest" in [m.model for m in client.list().models]


def test_a_key_without_the_endpoint_or_the_task_is_a_403(keyed: Keyed) -> None:
    def call(key: str, method: str, path: str, body: Any = None) -> httpx.Response:
        return httpx.request(
            method, keyed.url + path, json=body, headers=bearer(keyed.keys[key]), timeout=300
        )

    native = call("slm-04", "POST", "/v1/generate", {"prompt": PROMPT, "max_tokens": 4})
    assert native.status_code == 403
    assert native.json()["error"]["code"] == "permission_denied"
    assert "may not call the native endpoints" in native.json()["error"]["message"]
    for path in ("/v1/tasks/SLM-01", "/v1/tasks/slm-01", "/v1/tasks/triage", "/v1/tasks/x"):
        refused = call("slm-04", "POST", path, example("SLM-01"))
        assert refused.status_code == 403, path
        assert refused.json()["error"]["code"] == "permission_denied"
    assert call("slm-04", "GET", "/v1/tasks/SLM-01").status_code == 403
    assert call("slm-04", "GET", "/v1/tasks/alert").json()["id"] == "SLM-04"  # by its slug
    listed = call("slm-04", "GET", "/v1/tasks").json()["tasks"]
    assert [t["id"] for t in listed] == ["SLM-04"]
    assert len(call("all", "GET", "/v1/tasks").json()["tasks"]) == len(all_tasks())
    ran = call("slm-04", "POST", "/v1/tasks/SLM-04", {**example("SLM-04"), "max_tokens": 800})
    assert ran.status_code == 200, ran.text
    assert ran.json()["task_id"] == "SLM-04" and ran.json()["status"] == "draft"
    native = call("all", "POST", "/v1/generate", {"prompt": PROMPT, "max_tokens": 4})
    assert native.status_code == 200 and native.json()["output_tokens"] >= 1


def test_metrics_need_a_key_allowed_them(keyed: Keyed) -> None:
    assert httpx.get(keyed.url + "/metrics", timeout=30).status_code == 401
    denied = httpx.get(keyed.url + "/metrics", headers=bearer(keyed.keys["slm-04"]), timeout=30)
    assert denied.status_code == 403
    assert "may not call the metrics endpoints" in denied.json()["error"]["message"]
    allowed = httpx.get(keyed.url + "/metrics", headers=bearer(keyed.keys["all"]), timeout=30)
    assert allowed.status_code == 200 and "# TYPE" in allowed.text


def test_a_new_and_a_revoked_key_count_without_a_restart(keyed: Keyed) -> None:
    _, key = keyed.store.create("night-shift", endpoints=["openai"])
    models = httpx.get(keyed.url + "/v1/models", headers=bearer(key), timeout=30)
    assert models.status_code == 200 and models.json()["data"]
    keyed.store.revoke("night-shift")
    refused = httpx.get(keyed.url + "/v1/models", headers=bearer(key), timeout=30)
    assert refused.status_code == 401


def test_the_audit_names_the_key_and_records_refusals(keyed: Keyed) -> None:
    def post(request_id: str, key: str | None, path: str, body: Any) -> httpx.Response:
        headers = {**bearer(key), "X-Request-ID": request_id}
        return httpx.post(keyed.url + path, json=body, headers=headers, timeout=300)

    body = {"prompt": PROMPT, "max_tokens": 4}
    assert post("acc-ok", keyed.keys["all"], "/v1/generate", body).status_code == 200
    assert post("acc-none", None, "/v1/generate", body).status_code == 401
    assert post("acc-revoked", keyed.keys["revoked"], "/api/generate", body).status_code == 401
    assert post("acc-403", keyed.keys["slm-04"], "/v1/tasks/SLM-01", {}).status_code == 403
    assert post("acc-422", keyed.keys["all"], "/v1/generate", {"nope": 1}).status_code == 422

    [ok] = keyed.records("acc-ok")
    assert (ok.outcome, ok.client, ok.surface) == ("ok", "ward-app", "native")
    for request_id, surface in (("acc-none", "native"), ("acc-revoked", "ollama")):
        [refused] = keyed.records(request_id)
        assert (refused.outcome, refused.client) == ("invalid_api_key", None)
        assert refused.error_class == "AuthenticationError" and refused.surface == surface
    [denied] = keyed.records("acc-403")
    assert (denied.outcome, denied.client) == ("permission_denied", "alert-bot")
    assert denied.task_id == "SLM-01"
    [invalid] = keyed.records("acc-422")  # refused later, still by the key's name
    assert (invalid.outcome, invalid.client) == ("validation_error", "ward-app")


def test_without_any_key_loopback_stays_open_and_required_closes(
    tiny_engine: Engine, tmp_path: Path
) -> None:
    store = KeyStore(tmp_path / "keys.json")  # no key was ever made
    body = {"prompt": PROMPT, "max_tokens": 2}
    with serve(create_app(tiny_engine, access=Access(store))) as url:
        assert httpx.post(url + "/v1/generate", json=body, timeout=60).status_code == 200
        _, key = store.create("first")  # from now on a key is needed
        assert httpx.post(url + "/v1/generate", json=body, timeout=60).status_code == 401
        store.create("spare")
        store.revoke("first")
        store.revoke("spare")  # the last key revoked: closed, never open again by itself
        assert httpx.post(url + "/v1/generate", json=body, timeout=60).status_code == 401
        _, key = store.create("again")
        store.path.chmod(0o644)  # made readable by others: closed until fixed
        answer = httpx.post(url + "/v1/generate", json=body, headers=bearer(key), timeout=60)
        assert answer.status_code == 401
        store.path.chmod(0o600)
        answer = httpx.post(url + "/v1/generate", json=body, headers=bearer(key), timeout=60)
        assert answer.status_code == 200
    empty = KeyStore(tmp_path / "none.json")
    with serve(create_app(tiny_engine, access=Access(empty, required=True))) as url:
        assert httpx.get(url + "/v1/models", timeout=30).status_code == 401
        assert httpx.get(url + "/healthz", timeout=30).status_code == 200


def test_create_app_reads_the_configured_store(tiny_engine: Engine, tmp_path: Path) -> None:
    settings = Settings(keys_path=tmp_path / "keys.json", max_output_tokens=4)
    _, key = KeyStore(settings.keys_path).create("by-settings")
    with serve(create_app(tiny_engine, settings)) as url:
        assert httpx.get(url + "/api/tags", timeout=30).status_code == 401
        assert httpx.get(url + "/api/tags", headers=bearer(key), timeout=30).status_code == 200


# ----- the bind and TLS decisions -----------------------------------------------------


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "LOCALHOST."]
)
def test_loopback_binds_need_no_key(host: str) -> None:
    assert is_loopback_bind(host)
    check_bind(host, active_keys=0)
    assert bind_warning(host, None) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "10.0.0.5", "ward.local"])
def test_other_binds_need_an_active_key(host: str) -> None:
    with pytest.raises(ConfigurationError, match="coheara keys create NAME") as caught:
        check_bind(host, active_keys=0)
    assert f"refusing to listen on {host}" in str(caught.value)
    assert not is_loopback_bind(host)
    check_bind(host, active_keys=1)
    warning = bind_warning(host, None)
    assert warning is not None and "without TLS" in warning


def make_certificate(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key) PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key, leaf_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "coheara test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    (folder / "cert.pem").write_bytes(leaf.public_bytes(pem))
    (folder / "key.pem").write_bytes(
        leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (folder / "key.pem").chmod(0o600)
    return folder / "ca.pem", folder / "cert.pem", folder / "key.pem"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_certificate(tmp_path_factory.mktemp("tls"))


def test_tls_needs_both_readable_matching_files(
    certificate: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    _, cert, key = certificate
    assert check_tls(None, None) is None
    tls = check_tls(cert, key)
    assert tls is not None and (tls.certfile, tls.keyfile) == (cert, key)
    with pytest.raises(ConfigurationError, match="the certificate is set, the key is not"):
        check_tls(cert, None)
    with pytest.raises(ConfigurationError, match="the key is set, the certificate is not"):
        check_tls(None, key)
    with pytest.raises(ConfigurationError, match="cannot read the TLS key"):
        check_tls(cert, tmp_path / "missing.pem")
    with pytest.raises(ConfigurationError, match="cannot be used"):
        check_tls(cert, cert)  # a certificate is not a key
    assert bind_warning("0.0.0.0", tls) is None


# ----- `coheara serve`, for real ------------------------------------------------------


@pytest.fixture(scope="module")
def fake_backend() -> Iterator[str]:
    fake = FakeOllama({model_facts.DEFAULT_OLLAMA_MODEL: OllamaModel()})
    with serve(fake.app) as url:
        yield url


def serve_env(tmp_path: Path, keys_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COHEARA_", "OLLAMA_"))}
    env.update(
        {
            "HOME": str(tmp_path),
            "NO_COLOR": "1",
            "COLUMNS": "200",
            "COHEARA_CONFIG": str(tmp_path / "none.toml"),
            "COHEARA_KEYS_PATH": str(keys_path),
            "COHEARA_AUDIT_ENABLED": "false",
        }
    )
    (tmp_path / "none.toml").write_text("")
    return env


def coheara(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_coheara(*args, env=env)


@pytest.fixture
def running() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test started, stopped whatever happens."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            stop(process)


def start_serving(
    running: list[subprocess.Popen[str]], env: dict[str, str], *args: str
) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "coheara.cli.main", "serve", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    running.append(process)
    return process


def wait_healthy(url: str, process: subprocess.Popen[str], **client: Any) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate(timeout=10)[1]
        try:
            if httpx.get(url + "/healthz", timeout=2, **client).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("coheara serve did not answer /healthz in 90 s")


def trusting(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def stop_reading(process: subprocess.Popen[str]) -> str:
    """Stop the server and return what it printed on stderr."""
    process.terminate()
    _, err = process.communicate(timeout=30)
    return err


@pytest.fixture
def cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., Ran]:
    """`coheara ...` in this process, with COHEARA_KEYS_PATH in `tmp_path`."""
    monkeypatch.setenv("COHEARA_KEYS_PATH", str(tmp_path / "data" / "keys.json"))
    return in_process(monkeypatch, capsys)


def one_error_line(result: Ran | subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_the_keys_command(cli: Any, tmp_path: Path) -> None:
    made = cli("keys", "create", "ward-app", "--task", "slm-04", "--endpoint", "tasks")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert parse_key(key) is not None and made.stdout.count("coh_") == 1
    assert key not in made.stderr and "shown only now" in made.stderr
    assert KeyStore(tmp_path / "data" / "keys.json").load().verify(key) is not None
    for args, expected in (
        (["create", "ward-app"], "already exists"),
        (["create", "x", "--task", "SLM-99"], "unknown task 'SLM-99'"),
        (["create", "x", "--endpoint", "admin"], "unknown endpoint 'admin'"),
        (["revoke", "nobody"], "no key named 'nobody'"),
    ):
        result = cli("keys", *args)
        assert result.returncode == 4, args
        assert expected in one_error_line(result)
    listed = cli("keys", "list", "--json")
    [row] = json.loads(listed.stdout)
    assert (row["name"], row["status"], row["tasks"], row["endpoints"]) == (
        "ward-app",
        "active",
        ["SLM-04"],
        ["tasks"],
    )
    assert "salt" not in listed.stdout and "hash" not in listed.stdout
    assert cli("keys", "revoke", "ward-app").returncode == 0
    table = cli("keys", "list").stdout
    assert "ward-app" in table and "revoked" in table
    (tmp_path / "data" / "keys.json").chmod(0o644)
    refused = cli("keys", "list")
    assert refused.returncode == 3 and "readable by other users" in one_error_line(refused)


def test_serve_off_loopback_without_a_key_refuses_to_start(cli: Any, tmp_path: Path) -> None:
    env = serve_env(tmp_path, tmp_path / "keys.json")
    result = coheara("serve", "--host", "0.0.0.0", "--port", str(free_port()), env=env)
    assert result.returncode == 3
    line = one_error_line(result)
    assert "refusing to listen on 0.0.0.0" in line and "coheara keys create NAME" in line
    for host in ("::", "192.168.1.20"):
        refused = cli("serve", "--host", host, "--port", str(free_port()))
        assert refused.returncode == 3
        assert f"refusing to listen on {host}" in one_error_line(refused)
    half = cli("serve", "--tls-cert", str(tmp_path / "none.pem"))
    assert half.returncode == 3
    assert "TLS needs both" in one_error_line(half)
    unreadable = cli("serve", "--tls-cert", str(tmp_path / "a.pem"), "--tls-key", "b.pem")
    assert unreadable.returncode == 3
    assert "cannot read the TLS certificate" in one_error_line(unreadable)


def test_serve_off_loopback_with_a_key_starts_closed(
    tmp_path: Path, fake_backend: str, running: list[subprocess.Popen[str]]
) -> None:
    env = serve_env(tmp_path, tmp_path / "keys.json")
    _, key = KeyStore(tmp_path / "keys.json").create("ward-app")
    port = free_port()
    process = start_serving(
        running,
        env,
        "--host",
        "0.0.0.0",
        "--port",
        str(port),
        "-b",
        "ollama",
        "--url",
        fake_backend,
    )
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, process)
    assert httpx.get(url + "/api/tags", timeout=10).status_code == 401
    tags = httpx.get(url + "/api/tags", headers=bearer(key), timeout=10)
    assert tags.status_code == 200 and tags.json()["models"]
    KeyStore(tmp_path / "keys.json").revoke("ward-app")  # no active key left: still closed
    assert httpx.get(url + "/api/tags", headers=bearer(key), timeout=10).status_code == 401
    assert httpx.get(url + "/api/tags", timeout=10).status_code == 401
    err = stop_reading(process)
    assert f"on http://0.0.0.0:{port}" in err
    assert "warning: serving 0.0.0.0 without TLS" in err and "Traceback" not in err


def test_serve_over_tls(
    tmp_path: Path,
    fake_backend: str,
    certificate: tuple[Path, Path, Path],
    running: list[subprocess.Popen[str]],
) -> None:
    ca, cert, key_file = certificate
    env = serve_env(tmp_path, tmp_path / "keys.json")
    _, key = KeyStore(tmp_path / "keys.json").create("ward-app")
    port = free_port()
    process = start_serving(
        running,
        env,
        *("--port", str(port), "-b", "ollama", "--url", fake_backend),
        *("--tls-cert", str(cert), "--tls-key", str(key_file)),
    )
    url = f"https://127.0.0.1:{port}"
    wait_healthy(url, process, verify=trusting(ca))
    with pytest.raises(httpx.TransportError):  # plain HTTP gets no answer ...
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):  # ... nor
        httpx.get(url + "/healthz", timeout=5)  # a client that does not trust the certificate
    with httpx.Client(verify=trusting(ca), timeout=30) as http:
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, http_client=http)
        reply = client.chat.completions.create(
            model="medgemma", messages=[{"role": "user", "content": PROMPT}], max_tokens=64
        )
        assert reply.choices[0].message.content == (
            "No acute cardiopulmonary process. Heart size is normal."
        )
        assert http.get(url + "/v1/models").status_code == 401
    err = stop_reading(process)
    assert f"on https://127.0.0.1:{port}" in err and "without TLS" not in err
