"""The server's native dialect over loopback, on the tiny model; failure injection for all dialects.

The tiny model's weights are random, so the tests assert relations (the server
equals the engine called directly, streaming equals non-streaming, values validate
against their schema, token counts add up), never particular words.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from coheara import Engine, Settings, model_facts
from coheara.backends.base import Backend, Capabilities, ChatRequest, Health, StreamEvent
from coheara.backends.ollama import OllamaBackend
from coheara.backends.transformers_backend import TransformersBackend
from coheara.errors import BackendError
from coheara.server import create_app
from fakes import FakeOllama, OllamaModel
from samples import SYSTEM, TRIAGE_SCHEMA, noise_png
from servers import serve

FAKE_MODEL = model_facts.DEFAULT_OLLAMA_MODEL

PROMPT = "Summarise: chest pain radiating to the left arm."


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path) -> Iterator[TransformersBackend]:
    real = TransformersBackend(str(tiny_model_dir))
    yield real
    asyncio.run(real.aclose())


@pytest.fixture(scope="module")
def engine(backend: TransformersBackend) -> Engine:
    return Engine(backend, Settings(max_output_tokens=16))


@pytest.fixture(scope="module")
def client(engine: Engine) -> Iterator[httpx.Client]:
    with serve(create_app(engine)) as url, httpx.Client(base_url=url, timeout=60) as http:
        yield http


def direct(coroutine: Any) -> Any:
    """The engine called in process, for comparison with what the server answered."""
    return asyncio.run(coroutine)


def lines(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]


# ----- modes and evidence ---------------------------------------------------------------


def test_generate_equals_the_engine_and_carries_its_evidence(
    client: httpx.Client, engine: Engine, tiny_model_dir: Path
) -> None:
    response = client.post(
        "/v1/generate", json={"prompt": PROMPT, "system": SYSTEM, "max_tokens": 12}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    expected = direct(engine.generate(PROMPT, system=SYSTEM, max_tokens=12))
    assert body["text"] == expected.text
    assert body["prompt_tokens"] == expected.prompt_tokens
    assert body["output_tokens"] == expected.output_tokens
    assert body["finish_reason"] == expected.finish_reason
    assert body["prompt_tokens_exact"] is True
    assert body["backend"] == "transformers"
    assert body["model"] == tiny_model_dir.name  # the folder's name, never its path
    assert 1 <= body["output_tokens"] <= 12
    if body["finish_reason"] == "length":
        assert body["output_tokens"] == 12
        assert any("max_tokens" in w for w in body["warnings"])
    assert 0 < body["time_to_first_token_s"] <= body["total_s"]
    assert body["tokens_per_s"] > 0
    assert body["attempts"] == 1


def test_the_system_text_counts_in_the_prompt(client: httpx.Client) -> None:
    bare = client.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 1}).json()
    with_system = client.post(
        "/v1/generate", json={"prompt": PROMPT, "system": SYSTEM, "max_tokens": 1}
    ).json()
    assert with_system["prompt_tokens"] > bare["prompt_tokens"]


def test_streaming_concatenates_to_the_non_streamed_result(client: httpx.Client) -> None:
    request = {"prompt": PROMPT, "max_tokens": 12}
    whole = client.post("/v1/generate", json=request).json()
    streamed = lines(client.post("/v1/generate", json={**request, "stream": True}))
    deltas, last = streamed[:-1], streamed[-1]
    assert deltas and all(line["type"] == "delta" and line["attempt"] == 1 for line in deltas)
    assert last["type"] == "result"
    assert "".join(line["text"] for line in deltas) == last["result"]["text"] == whole["text"]
    assert last["result"]["prompt_tokens"] == whole["prompt_tokens"]
    assert last["result"]["output_tokens"] == whole["output_tokens"]


def test_messages_form_equals_prompt_form(client: httpx.Client) -> None:
    image = b64(noise_png(1))
    as_prompt = client.post(
        "/v1/generate",
        json={"system": SYSTEM, "prompt": PROMPT, "images": [image], "max_tokens": 8},
    ).json()
    as_messages = client.post(
        "/v1/generate",
        json={
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": PROMPT, "images": [image]},
            ],
            "max_tokens": 8,
        },
    ).json()
    assert as_messages["text"] == as_prompt["text"]
    assert as_messages["prompt_tokens"] == as_prompt["prompt_tokens"]


def test_an_image_costs_its_prompt_tokens_and_matches_the_engine(
    client: httpx.Client, engine: Engine
) -> None:
    image = noise_png(2)
    text_only = client.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 4}).json()
    plain = client.post(
        "/v1/generate", json={"prompt": PROMPT, "images": [b64(image)], "max_tokens": 4}
    ).json()
    data_uri = client.post(
        "/v1/generate",
        json={
            "prompt": PROMPT,
            "images": ["data:image/png;base64," + b64(image)],
            "max_tokens": 4,
        },
    ).json()
    expected = direct(engine.generate(PROMPT, images=[image], max_tokens=4))
    assert plain["prompt_tokens"] == data_uri["prompt_tokens"] == expected.prompt_tokens
    assert plain["text"] == data_uri["text"] == expected.text
    extra = plain["prompt_tokens"] - text_only["prompt_tokens"]
    assert model_facts.IMAGE_SOFT_TOKENS <= extra <= model_facts.IMAGE_PROMPT_TOKENS + 8


def test_extract_returns_a_schema_valid_value_equal_to_the_engine(
    client: httpx.Client, engine: Engine
) -> None:
    response = client.post(
        "/v1/extract", json={"prompt": PROMPT, "schema": TRIAGE_SCHEMA, "max_tokens": 40}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    jsonschema.validate(body["value"], TRIAGE_SCHEMA)
    assert json.loads(body["text"]) == body["value"]
    assert body["finish_reason"] == "stop"
    expected = direct(engine.extract(PROMPT, schema=TRIAGE_SCHEMA, max_tokens=40))
    assert body["value"] == expected.value
    assert body["prompt_tokens"] == expected.prompt_tokens


def test_extract_streams_and_ends_with_the_validated_value(client: httpx.Client) -> None:
    request = {"prompt": PROMPT, "schema": TRIAGE_SCHEMA, "max_tokens": 40}
    whole = client.post("/v1/extract", json=request).json()
    streamed = lines(client.post("/v1/extract", json={**request, "stream": True}))
    last = streamed[-1]
    assert last["type"] == "result"
    jsonschema.validate(last["result"]["value"], TRIAGE_SCHEMA)
    assert last["result"]["value"] == whole["value"]
    first_attempt = "".join(
        line["text"] for line in streamed[:-1] if line["type"] == "delta" and line["attempt"] == 1
    )
    if last["result"]["attempts"] == 1:
        assert first_attempt == last["result"]["text"]


def test_sampling_with_a_seed_is_reproducible(client: httpx.Client) -> None:
    request = {"prompt": PROMPT, "max_tokens": 10, "temperature": 1.0, "seed": 7}
    first = client.post("/v1/generate", json=request).json()
    second = client.post("/v1/generate", json=request).json()
    assert first["text"] == second["text"]


# ----- errors ---------------------------------------------------------------------------


def test_a_request_too_large_for_the_window_is_refused_with_the_numbers(
    client: httpx.Client,
) -> None:
    long_text = "chest pain radiating to the left arm. " * 20_000
    response = client.post("/v1/generate", json={"prompt": long_text, "max_tokens": 100})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    details = error["details"]
    assert details["window"] == model_facts.CONTEXT_LENGTH
    assert details["output_reserve"] == 100
    assert details["prompt_tokens"] + details["output_reserve"] > details["window"]
    assert str(details["prompt_tokens"]) in error["message"]
    assert str(details["window"]) in error["message"]
    assert "chest pain" not in response.text  # errors never echo patient text


@pytest.mark.parametrize(
    "image",
    [
        "not base64 at all!",
        b64(b"plain text, not an image"),
        b64(noise_png(3))[:-40],
        "data:image/png,rawdata",
        "/etc/hostname",  # a path: the server never opens files a client names
        "https://127.0.0.1:9/x.png",  # a URL: the server never fetches
    ],
)
def test_a_bad_image_is_400_invalid_image(client: httpx.Client, image: str) -> None:
    response = client.post("/v1/generate", json={"prompt": PROMPT, "images": [image]})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_image"


@pytest.mark.parametrize(
    "body",
    [
        {"promt": PROMPT},
        {"prompt": PROMPT, "max_tokens": "many"},
        {"prompt": PROMPT, "max_tokens": 0},
        {"prompt": PROMPT, "temperature": -1},
        {"messages": [{"role": "doctor", "content": "x"}]},
    ],
)
def test_an_invalid_body_is_422_in_our_shape(client: httpx.Client, body: dict[str, Any]) -> None:
    response = client.post("/v1/generate", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert error["details"]["errors"][0]["loc"]
    assert "input" not in error["details"]["errors"][0]  # the offending value is not echoed


def test_malformed_json_is_422(client: httpx.Client) -> None:
    response = client.post(
        "/v1/generate", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "validation_error"


def test_an_empty_request_and_a_bad_schema_are_400(client: httpx.Client) -> None:
    empty = client.post("/v1/generate", json={})
    assert empty.status_code == 400
    assert empty.json()["error"]["code"] == "invalid_request"
    bad = client.post("/v1/extract", json={"prompt": PROMPT, "schema": {"type": "string"}})
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "invalid_request"


def test_an_unknown_model_is_404_and_aliases_are_accepted(
    client: httpx.Client, tiny_model_dir: Path
) -> None:
    response = client.post("/v1/generate", json={"model": "gpt-4o", "prompt": PROMPT})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    for name in ("medgemma", "MedGemma:latest", str(tiny_model_dir)):
        ok = client.post("/v1/generate", json={"model": name, "prompt": PROMPT, "max_tokens": 1})
        assert ok.status_code == 200, (name, ok.text)


def test_a_mid_stream_error_arrives_as_the_last_line(client: httpx.Client) -> None:
    # Two tokens cannot hold a valid object: the deltas go out, then every attempt
    # (repairs, then field by field) is cut at max_tokens and validation fails.
    response = client.post(
        "/v1/extract",
        json={"prompt": PROMPT, "schema": TRIAGE_SCHEMA, "max_tokens": 2, "stream": True},
    )
    assert response.status_code == 200
    streamed = lines(response)
    assert streamed[0]["type"] == "delta"
    assert all(line["type"] == "delta" for line in streamed[:-1])
    assert streamed[-1]["type"] == "error"
    assert streamed[-1]["error"]["code"] == "output_invalid"
    same = client.post(
        "/v1/extract", json={"prompt": PROMPT, "schema": TRIAGE_SCHEMA, "max_tokens": 2}
    )
    # 422, not 5xx: greedy decoding would fail the same way again, and clients retry 5xx.
    assert same.status_code == 422
    assert same.json()["error"]["code"] == "output_invalid"


def test_the_weights_folder_path_is_never_published(
    client: httpx.Client, tiny_model_dir: Path
) -> None:
    path, name = str(tiny_model_dir), tiny_model_dir.name
    tags = client.get("/api/tags")
    models = client.get("/v1/models")
    show = client.post("/api/show", json={"model": name})
    running = client.get("/api/ps")
    unknown = client.post("/v1/generate", json={"model": "gpt-4o", "prompt": PROMPT})
    chat = client.post(
        "/v1/chat/completions",
        json={"model": path, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 1},
    )
    ollama = client.post(
        "/api/generate",
        json={"model": path, "prompt": PROMPT, "stream": False, "options": {"num_predict": 1}},
    )
    for response in (tags, models, show, running, unknown):
        assert path not in response.text, response.request.url
    assert models.json()["data"][0]["id"] == models.json()["data"][0]["root"] == name
    assert tags.json()["models"][0]["name"] == f"{name}:latest"
    assert show.status_code == 200 and f"FROM {name}" in show.json()["modelfile"]
    # The full path is still accepted (and echoed as the requested model, as Ollama and
    # OpenAI echo the request's id); the evidence names the model by its folder name.
    assert chat.status_code == 200 and ollama.status_code == 200
    assert chat.json()["coheara"]["model"] == name and ollama.json()["coheara"]["model"] == name
    assert client.post("/api/show", json={"model": path}).json() == show.json()


def test_unknown_route_is_404_in_our_shape(client: httpx.Client) -> None:
    response = client.get("/v1/nothing-here")
    assert response.status_code == 404
    assert "error" in response.json()


def test_healthz(client: httpx.Client) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["backend_ok"] is True
    assert body["backend"] == "transformers"


def test_the_openapi_document_is_complete_and_resolves(client: httpx.Client) -> None:
    document = client.get("/openapi.json").json()
    paths = document["paths"]
    for path, method in [
        ("/v1/generate", "post"),
        ("/v1/extract", "post"),
        ("/v1/chat/completions", "post"),
        ("/v1/models", "get"),
        ("/api/chat", "post"),
        ("/api/generate", "post"),
        ("/api/tags", "get"),
        ("/api/show", "post"),
        ("/api/ps", "get"),
        ("/api/version", "get"),
        ("/healthz", "get"),
    ]:
        operation = paths[path][method]
        assert "200" in operation["responses"], path
    for path in ("/v1/generate", "/v1/extract"):
        responses = paths[path]["post"]["responses"]
        assert {"400", "404", "422", "502", "503"} <= set(responses)
    components = document["components"]["schemas"]
    refs = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.add(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)
    missing = {r for r in refs if r.split("/")[-1] not in components}
    assert not missing
    assert "NativeStreamLine" in components and "ChatCompletionChunk" in components


# ----- failure injection: the real model, with a fault or a delay around it -------------


class Injected(Backend):
    """The real tiny-model backend, with a fault or a delay injected around its stream."""

    name = "transformers"

    def __init__(
        self,
        inner: TransformersBackend,
        *,
        fail_after: int | None = None,
        error: Exception | None = None,
        delay_s: float = 0.0,
    ) -> None:
        self.inner = inner
        self.model = inner.model
        self.fail_after = fail_after
        self.error = error
        self.delay_s = delay_s
        self.events = 0
        self.stopped_early = threading.Event()

    def count_prompt_tokens(self, request: ChatRequest) -> int | None:
        return self.inner.count_prompt_tokens(request)

    async def capabilities(self) -> Capabilities:
        return await self.inner.capabilities()

    async def health(self) -> Health:
        return await self.inner.health()

    async def stream(self, request: ChatRequest) -> AsyncGenerator[StreamEvent, None]:
        inner = self.inner.stream(request)
        finished = False
        try:
            async for event in inner:
                if self.fail_after is not None and self.events >= self.fail_after:
                    assert self.error is not None
                    raise self.error
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                self.events += 1
                finished = event.done
                yield event
        finally:
            await inner.aclose()
            if not finished:
                self.stopped_early.set()


@pytest.fixture
def injected(
    backend: TransformersBackend, request: pytest.FixtureRequest
) -> Iterator[tuple[Injected, str]]:
    fake = Injected(backend, **request.param)
    engine = Engine(fake, Settings(max_output_tokens=16, guard_enabled=False))
    with serve(create_app(engine)) as url:
        yield fake, url


SECRET = "Jane Doe, born 1962-03-04, MRN 445566"


@pytest.mark.parametrize(
    "injected", [{"fail_after": 0, "error": RuntimeError(SECRET)}], indirect=True
)
@pytest.mark.parametrize(
    ("path", "body", "shape"),
    [
        ("/v1/generate", {"prompt": PROMPT}, "native"),
        ("/v1/generate", {"prompt": PROMPT, "stream": True}, "native"),
        (
            "/api/chat",
            {"model": "medgemma", "messages": [{"role": "user", "content": "x"}]},
            "ollama",
        ),
        (
            "/v1/chat/completions",
            {"model": "medgemma", "messages": [{"role": "user", "content": "x"}]},
            "openai",
        ),
    ],
)
def test_an_unexpected_error_is_a_500_in_the_dialect_shape_without_a_traceback(
    injected: tuple[Injected, str], path: str, body: dict[str, Any], shape: str
) -> None:
    _, url = injected
    response = httpx.post(url + path, json=body, timeout=30)
    assert response.status_code == 500
    assert "Jane" not in response.text and "Traceback" not in response.text
    error = response.json()["error"]
    if shape == "ollama":
        assert isinstance(error, str) and error
    elif shape == "openai":
        assert error["type"] == "server_error" and error["code"] == "internal_error"
    else:
        assert error["code"] == "internal_error"


@pytest.mark.parametrize(
    "injected",
    [
        {"fail_after": 2, "error": BackendError("the runtime failed mid-stream")},
        {"fail_after": 2, "error": RuntimeError(SECRET)},
    ],
    indirect=True,
)
def test_a_mid_stream_failure_is_the_last_line_in_every_dialect(
    injected: tuple[Injected, str],
) -> None:
    fake, url = injected
    expected_code = "backend_error" if isinstance(fake.error, BackendError) else "internal_error"
    message = {"role": "user", "content": PROMPT}

    native = httpx.post(url + "/v1/generate", json={"prompt": PROMPT, "stream": True}, timeout=30)
    assert native.status_code == 200
    streamed = lines(native)
    assert [line["type"] for line in streamed] == ["delta", "delta", "error"]
    assert streamed[-1]["error"]["code"] == expected_code

    fake.events = 0
    ollama = httpx.post(
        url + "/api/chat", json={"model": "medgemma", "messages": [message]}, timeout=30
    )
    assert ollama.status_code == 200
    streamed = lines(ollama)
    assert [line.get("done") for line in streamed[:-1]] == [False, False]
    assert set(streamed[-1]) == {"error"}

    fake.events = 0
    openai = httpx.post(
        url + "/v1/chat/completions",
        json={"model": "medgemma", "messages": [message], "stream": True},
        timeout=30,
    )
    assert openai.status_code == 200
    events = [e.removeprefix("data: ") for e in openai.text.split("\n\n") if e.strip()]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == expected_code and error["type"] == "server_error"
    for text in (native.text, ollama.text, openai.text):
        assert "Jane" not in text and "Traceback" not in text


@pytest.mark.parametrize("injected", [{"delay_s": 0.2}], indirect=True)
def test_a_client_that_disconnects_mid_stream_cancels_the_generation(
    injected: tuple[Injected, str],
) -> None:
    fake, url = injected
    body = {"prompt": PROMPT, "max_tokens": 200, "stream": True}
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", url + "/v1/generate", json=body) as r,
    ):
        first = next(r.iter_lines())
        assert json.loads(first)["type"] == "delta"
    # The connection is closed: the engine's generator and the backend's stream must stop.
    assert fake.stopped_early.wait(timeout=10)
    assert fake.events < 20


@pytest.mark.parametrize("injected", [{"delay_s": 0.2}], indirect=True)
def test_a_client_that_gives_up_on_a_plain_request_cancels_the_generation(
    injected: tuple[Injected, str],
) -> None:
    fake, url = injected
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/generate", json={"prompt": PROMPT, "max_tokens": 200}, timeout=1.0)
    assert fake.stopped_early.wait(timeout=10)
    assert fake.events < 20
    assert time.monotonic() - started < 10


def test_a_disconnect_is_noticed_where_sending_never_fails(backend: TransformersBackend) -> None:
    """ASGI 2.4 servers report a gone client only through `receive`: the server must listen."""
    fake = Injected(backend, delay_s=0.2)
    app = create_app(Engine(fake, Settings(max_output_tokens=16, guard_enabled=False)))
    payload = json.dumps({"prompt": PROMPT, "max_tokens": 200, "stream": True}).encode()

    async def scenario() -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []
        first_body = asyncio.Event()
        pending = [{"type": "http.request", "body": payload, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if pending:
                return pending.pop()
            await first_body.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and message.get("body"):
                first_body.set()

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/generate",
            "raw_path": b"/v1/generate",
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 11435),
        }
        await asyncio.wait_for(app(scope, receive, send), timeout=20)
        return sent

    sent = asyncio.run(scenario())
    assert sent[0]["status"] == 200
    assert fake.stopped_early.is_set()
    assert fake.events < 20


def test_a_body_over_the_limit_is_413_in_each_dialect_shape(engine: Engine) -> None:
    big = {"model": "medgemma", "prompt": "x" * 5000}
    with serve(create_app(engine, max_body_bytes=1000)) as url:
        native = httpx.post(url + "/v1/generate", json=big)
        assert native.status_code == 413
        assert native.json()["error"]["code"] == "request_too_large"
        ollama = httpx.post(url + "/api/generate", json=big)
        assert ollama.status_code == 413 and isinstance(ollama.json()["error"], str)
        openai = httpx.post(url + "/v1/chat/completions", json=big)
        assert openai.status_code == 413 and openai.json()["error"]["code"] == "request_too_large"
        chunked = httpx.post(
            url + "/v1/generate",
            content=iter([json.dumps(big).encode()[:800], json.dumps(big).encode()[800:]]),
            headers={"content-type": "application/json"},
        )
        assert chunked.status_code == 413
        small = httpx.post(url + "/v1/generate", json={"prompt": PROMPT, "max_tokens": 1})
        assert small.status_code == 200


# ----- the scripted Ollama behind the server: exact text, known timing ---------------------

REASONING_PIECES = 40
THOUGHT = (
    "<unused94>thought\n"
    + " ".join(f"consider-{i}" for i in range(REASONING_PIECES))
    + "<unused95>"
)
ANSWER = "Right lower lobe consolidation, no effusion."


@pytest.fixture(scope="module")
def fake_ollama() -> Iterator[tuple[FakeOllama, str]]:
    fake = FakeOllama({FAKE_MODEL: OllamaModel(capabilities=["completion", "vision"])})
    with serve(fake.app) as url:
        yield fake, url


@pytest.fixture
def over_fake(fake_ollama: tuple[FakeOllama, str]) -> Iterator[tuple[FakeOllama, str]]:
    """`coheara serve` whose engine runs the Ollama backend against the scripted fake."""
    fake, fake_url = fake_ollama
    fake.reset()
    backend = OllamaBackend(
        url=fake_url,
        model=FAKE_MODEL,
        num_ctx=16384,
        timeout_s=30,
        connect_timeout_s=5,
        keep_alive=None,
    )
    engine = Engine(backend, Settings(backend="ollama", ollama_url=fake_url))
    # The app closes the engine at shutdown, on the loop its HTTP client was used on.
    with serve(create_app(engine, close_engine=True)) as url:
        yield fake, url


def _visible_texts(dialect: str, payload: str) -> tuple[list[str], str]:
    """Each visible delta a dialect streamed (role-only or closing pieces left out), and the
    final text it reports."""
    if dialect == "native":
        streamed = [json.loads(line) for line in payload.splitlines() if line.strip()]
        deltas = [line["text"] for line in streamed if line["type"] == "delta"]
        assert streamed[-1]["type"] == "result"
        return deltas, streamed[-1]["result"]["text"]
    if dialect == "openai":
        events = [e.removeprefix("data: ") for e in payload.split("\n\n") if e.strip()]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        deltas = [c["choices"][0]["delta"].get("content") for c in chunks[1:] if c["choices"]]
        closing = [d for d in deltas if d is None]
        assert len(closing) == 1 and deltas[-1] is None  # only the finish chunk has no content
        texts = [d for d in deltas if d is not None]
        return texts, "".join(texts)
    streamed = [json.loads(line) for line in payload.splitlines() if line.strip()]
    assert streamed[-1]["done"] is True and streamed[-1]["message"]["content"] == ""
    deltas = [line["message"]["content"] for line in streamed[:-1]]
    assert all(line["done"] is False for line in streamed[:-1])
    return deltas, "".join(deltas)


STREAM_REQUESTS = {
    "native": ("/v1/generate", {"prompt": PROMPT, "stream": True}),
    "openai": (
        "/v1/chat/completions",
        {"model": "medgemma", "messages": [{"role": "user", "content": PROMPT}], "stream": True},
    ),
    "ollama": (
        "/api/chat",
        {"model": "medgemma", "messages": [{"role": "user", "content": PROMPT}]},
    ),
}


@pytest.mark.parametrize("dialect", ["native", "openai", "ollama"])
def test_headers_go_out_before_a_long_hidden_reasoning_block_ends(
    over_fake: tuple[FakeOllama, str], dialect: str
) -> None:
    fake, url = over_fake
    fake.reply = THOUGHT + "\n\n" + ANSWER
    fake.chunk_words = 1  # one reasoning word a chunk: the answer starts in chunk 41
    fake.chunk_delay_s = 0.05
    path, body = STREAM_REQUESTS[dialect]
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", url + path, json=body) as response,
    ):
        # The status line is here: how far into the runtime's reply was the server?
        sent_at_headers = fake.streams[-1].sent
        assert response.status_code == 200
        payload = response.read().decode()
    # The server answered while the model was still reasoning, not once the answer began.
    assert sent_at_headers < REASONING_PIECES
    assert fake.streams[-1].completed
    deltas, final = _visible_texts(dialect, payload)
    assert deltas and all(deltas)  # no empty delta for the engine's "answered" chunk
    assert "".join(deltas) == final == ANSWER
    assert "consider-" not in payload and "unused9" not in payload


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/generate", {"prompt": PROMPT, "max_tokens": 10_000}),
        (
            "/v1/chat/completions",
            {
                "model": "medgemma",
                "messages": [{"role": "user", "content": PROMPT}],
                "max_completion_tokens": 10_000,
            },
        ),
        (
            "/api/generate",
            {"model": "medgemma", "prompt": PROMPT, "options": {"num_predict": 10_000}},
        ),
    ],
)
def test_the_engine_caps_the_output_for_every_dialect(
    over_fake: tuple[FakeOllama, str], path: str, body: dict[str, Any]
) -> None:
    fake, url = over_fake
    response = httpx.post(url + path, json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert fake.chat_bodies[-1]["options"]["num_predict"] == model_facts.MAX_OUTPUT_TOKENS


def test_greedy_is_the_default_and_a_stop_string_becomes_a_list(
    over_fake: tuple[FakeOllama, str],
) -> None:
    fake, url = over_fake
    message = {"role": "user", "content": PROMPT}
    httpx.post(
        url + "/v1/chat/completions",
        json={"model": "medgemma", "messages": [message], "stop": "END"},
        timeout=30,
    )
    options = fake.chat_bodies[-1]["options"]
    assert options["temperature"] == 0.0
    assert options["stop"] == ["END"]
