"""The OpenAI-compatible backend against a vLLM-like fake over loopback."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from coheara import Engine, Settings, model_facts
from coheara.backends.base import ChatRequest, Message
from coheara.backends.openai_compat import OpenAIBackend
from coheara.errors import (
    BackendError,
    BackendOverloadedError,
    BackendTimeoutError,
    BackendUnavailableError,
    ContextOverflowError,
    InvalidRequestError,
    ModelNotFoundError,
)
from coheara.imaging import load_image
from fakes import DroppingServer, FakeOpenAI, OpenAIModel, sse_pieces
from fakes.fake_openai import vllm_error
from samples import collect, noise_png, request
from servers import free_port, serve

MODEL = model_facts.DEFAULT_HF_MODEL
REPLY = "No acute cardiopulmonary process."

BackendFactory = Callable[..., Awaitable[OpenAIBackend]]


@pytest.fixture(scope="module")
def fake_server() -> Iterator[tuple[FakeOpenAI, str]]:
    fake = FakeOpenAI(
        {
            MODEL: OpenAIModel(max_model_len=8192),
            "small-window": OpenAIModel(max_model_len=2048),
            "unreported-window": OpenAIModel(max_model_len=4096, report_max_model_len=False),
        }
    )
    with serve(fake.app) as url:
        yield fake, url + "/v1"


@pytest.fixture
def fake(fake_server: tuple[FakeOpenAI, str]) -> FakeOpenAI:
    fake_server[0].reset()
    return fake_server[0]


@pytest.fixture
def url(fake_server: tuple[FakeOpenAI, str]) -> str:
    return fake_server[1]


@pytest.fixture
async def make_backend(url: str) -> AsyncIterator[BackendFactory]:
    made: list[OpenAIBackend] = []

    async def make(**overrides: Any) -> OpenAIBackend:
        arguments: dict[str, Any] = {
            "base_url": url,
            "model": MODEL,
            "api_key": "not-needed",
            "context_length": model_facts.CONTEXT_LENGTH,
            "timeout_s": 10.0,
            "connect_timeout_s": 2.0,
        }
        arguments.update(overrides)
        backend = OpenAIBackend(**arguments)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.aclose()


def settings(url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "backend": "openai",
        "openai_url": url,
        "openai_model": MODEL,
        "extract_retries": 0,
    }
    values.update(overrides)
    return Settings(**values)


# ----- the wire format -------------------------------------------------------------------


async def test_request_body_uses_max_tokens_and_asks_for_usage(
    fake: FakeOpenAI, make_backend: BackendFactory
) -> None:
    await collect(await make_backend(), request(max_tokens=77))
    (body,) = fake.chat_bodies
    assert body["model"] == MODEL
    assert body["max_tokens"] == 77
    assert "max_completion_tokens" not in body
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0.0
    for absent in ("top_p", "seed", "stop", "top_k", "response_format"):
        assert absent not in body
    assert body["messages"] == [{"role": "user", "content": "Summarize: chest film, no findings."}]


async def test_sampling_options_are_sent_when_set(
    fake: FakeOpenAI, make_backend: BackendFactory
) -> None:
    chat = request(max_tokens=50, temperature=0.5, top_p=0.8, top_k=20, seed=3, stop=("END",))
    await collect(await make_backend(), chat)
    (body,) = fake.chat_bodies
    assert (body["temperature"], body["top_p"], body["seed"], body["stop"], body["top_k"]) == (
        0.5,
        0.8,
        3,
        ["END"],
        20,
    )


async def test_images_are_data_uri_parts_before_the_text(
    fake: FakeOpenAI, make_backend: BackendFactory
) -> None:
    first, second = load_image(noise_png(size=(48, 48))), load_image(noise_png(size=(20, 20)))
    chat = ChatRequest(
        (
            Message("user", "earlier"),
            Message("assistant", "noted"),
            Message("user", "compare current with prior", (first, second)),
        )
    )
    await collect(await make_backend(), chat)
    messages = fake.chat_bodies[0]["messages"]
    assert messages[:2] == [
        {"role": "user", "content": "earlier"},
        {"role": "assistant", "content": "noted"},
    ]
    parts = messages[2]["content"]
    assert [p["type"] for p in parts] == ["image_url", "image_url", "text"]
    assert parts[0]["image_url"]["url"] == "data:image/png;base64," + first.base64_png()
    assert parts[1]["image_url"]["url"] == "data:image/png;base64," + second.base64_png()
    assert parts[2]["text"] == "compare current with prior"


async def test_structured_output_only_through_response_format(
    fake: FakeOpenAI, make_backend: BackendFactory
) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 9}}}
    await collect(await make_backend(), ChatRequest((Message("user", "x"),), json_schema=schema))
    (body,) = fake.chat_bodies
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": schema, "strict": True},
    }
    assert not [key for key in body if key.startswith("guided_")]


# ----- streaming ---------------------------------------------------------------------------


async def test_stream_yields_deltas_then_usage(
    fake: FakeOpenAI, make_backend: BackendFactory
) -> None:
    events = await collect(await make_backend(), request("y" * 400))
    assert "".join(e.text for e in events) == REPLY
    assert [e.done for e in events].count(True) == 1
    final = events[-1]
    assert (final.done, final.finish_reason, final.prompt_tokens) == (True, "stop", 100)
    assert final.output_tokens == 9


async def test_counts_are_none_when_the_server_sends_no_usage(
    fake: FakeOpenAI, make_backend: BackendFactory
) -> None:
    fake.send_usage = False
    final = (await collect(await make_backend(), request()))[-1]
    assert final.done
    assert (final.prompt_tokens, final.output_tokens) == (None, None)


async def test_length_finish_reason(fake: FakeOpenAI, make_backend: BackendFactory) -> None:
    fake.reply = "word " * 100
    events = await collect(await make_backend(), request(max_tokens=5))
    assert events[-1].finish_reason == "length"
    assert len("".join(e.text for e in events)) == 20


async def test_closing_the_stream_early_closes_the_http_stream(
    fake: FakeOpenAI, make_backend: BackendFactory
) -> None:
    fake.reply = "token " * 400
    fake.chunk_words = 1
    fake.chunk_delay_s = 0.02
    stream = (await make_backend()).stream(request(max_tokens=1000))
    first = await stream.__anext__()
    assert first.text == "token "
    await stream.aclose()
    (record,) = fake.streams
    # Blocking this loop on purpose: only a close done inside aclose() itself counts.
    assert record.ended.wait(5)
    assert not record.completed
    assert record.sent < record.total_chunks // 2


# ----- capabilities and health ---------------------------------------------------------------


async def test_capabilities_take_the_window_from_max_model_len(
    fake: FakeOpenAI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(model="small-window")
    first = await backend.capabilities()
    assert first is await backend.capabilities()
    assert len([r for r in fake.requests if r.path == "/v1/models"]) == 1
    assert (first.backend, first.model, first.context_length) == ("openai", "small-window", 2048)
    assert first.vision is True
    assert first.exact_token_count is False
    assert first.constrained_decoding is True
    assert backend.context_window is None


async def test_capabilities_fall_back_to_the_configured_window(
    make_backend: BackendFactory,
) -> None:
    backend = await make_backend(model="unreported-window", context_length=16384, vision=False)
    capabilities = await backend.capabilities()
    assert capabilities.context_length == 16384
    assert capabilities.vision is False


async def test_capabilities_of_an_unserved_model_list_what_is_served(
    make_backend: BackendFactory,
) -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        await (await make_backend(model="someone/else")).capabilities()
    message = str(caught.value)
    assert "someone/else" in message
    assert f"it serves: {MODEL}, small-window, unreported-window" in message
    assert caught.value.details["served"] == [MODEL, "small-window", "unreported-window"]


async def test_health_uses_vllm_health_and_version(make_backend: BackendFactory) -> None:
    health = await (await make_backend()).health()
    assert (health.ok, health.backend, health.version) == (True, "openai", "0.11.0")


async def test_health_falls_back_to_models(fake: FakeOpenAI, make_backend: BackendFactory) -> None:
    fake.has_health = False
    health = await (await make_backend()).health()
    assert health.ok is True
    assert "3 model(s)" in health.detail
    assert [r.path for r in fake.requests] == ["/health", "/v1/models"]


async def test_health_never_raises_when_the_server_is_down(make_backend: BackendFactory) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    health = await (await make_backend(base_url=dead)).health()
    assert health.ok is False
    assert dead in health.detail


# ----- errors ----------------------------------------------------------------------------------


async def test_connection_refused_is_unavailable(make_backend: BackendFactory) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(BackendUnavailableError) as caught:
        await collect(await make_backend(base_url=dead), request())
    assert type(caught.value) is BackendUnavailableError
    assert dead in str(caught.value)


async def test_timeout_is_a_backend_timeout(fake: FakeOpenAI, make_backend: BackendFactory) -> None:
    fake.first_token_delay_s = 1.0
    with pytest.raises(BackendTimeoutError) as caught:
        await collect(await make_backend(timeout_s=0.2), request())
    assert "0.2s" in str(caught.value)


async def test_unknown_model_lists_what_the_server_has(make_backend: BackendFactory) -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        await collect(await make_backend(model="nope"), request())
    assert "does not exist" in str(caught.value)
    assert caught.value.hint is not None
    assert f"the server serves: {MODEL}, small-window" in caught.value.hint


async def test_vllm_context_length_400_is_a_context_overflow(
    fake: FakeOpenAI, make_backend: BackendFactory
) -> None:
    with pytest.raises(ContextOverflowError) as caught:
        await collect(await make_backend(model="small-window"), request("z" * 8000, max_tokens=500))
    assert type(caught.value) is ContextOverflowError
    assert caught.value.details == {
        "status": 400,
        "window": 2048,
        "requested_tokens": 2500,
    }
    assert "maximum context length is 2048 tokens" in str(caught.value)
    assert "--max-model-len" in str(caught.value)


async def test_other_bad_request_is_invalid_request(
    fake: FakeOpenAI, make_backend: BackendFactory
) -> None:
    fake.fail_with = (400, vllm_error("temperature must be non-negative", "BadRequestError", 400))
    with pytest.raises(InvalidRequestError) as caught:
        await collect(await make_backend(), request())
    assert type(caught.value) is InvalidRequestError
    assert "temperature must be non-negative" in str(caught.value)


async def test_validation_error_echoing_the_prompt_is_redacted(
    fake: FakeOpenAI, make_backend: BackendFactory
) -> None:
    secret = "Patient John Doe, DOB 1961-04-02, presents with dyspnoea"
    fake.fail_with = (
        422,
        {
            "detail": [
                {
                    "type": "extra_forbidden",
                    "loc": ["body", "foo"],
                    "msg": "Extra inputs are not permitted",
                    "input": {"messages": [{"role": "user", "content": secret}]},
                }
            ]
        },
    )
    with pytest.raises(InvalidRequestError) as caught:
        await collect(await make_backend(), request(secret))
    message = str(caught.value)
    assert "HTTP 422" in message
    assert "body.foo: Extra inputs are not permitted" in message
    assert "John Doe" not in message


@pytest.mark.parametrize("status", [429, 503])
async def test_busy_server_is_overloaded(
    fake: FakeOpenAI, make_backend: BackendFactory, status: int
) -> None:
    fake.fail_with = (status, vllm_error("Too many requests", "RateLimitError", status))
    with pytest.raises(BackendOverloadedError) as caught:
        await collect(await make_backend(), request())
    assert caught.value.details["status"] == status


async def test_other_status_is_a_backend_error(
    fake: FakeOpenAI, make_backend: BackendFactory
) -> None:
    fake.fail_with = (500, vllm_error("EngineCore died", "InternalServerError", 500))
    with pytest.raises(BackendError) as caught:
        await collect(await make_backend(), request())
    assert type(caught.value) is BackendError
    assert "HTTP 500" in str(caught.value)
    assert "EngineCore died" in str(caught.value)


async def test_error_event_mid_stream_is_a_backend_error(
    fake: FakeOpenAI, make_backend: BackendFactory
) -> None:
    fake.error_after_chunks = (1, "engine loop stopped")
    seen: list[str] = []
    with pytest.raises(BackendError) as caught:
        async for event in (await make_backend()).stream(request()):
            seen.append(event.text)
    assert "mid-stream" in str(caught.value)
    assert "engine loop stopped" in str(caught.value)
    assert seen == ["No acute "]


@pytest.mark.parametrize("ending", ["abort", "close"])
async def test_stream_dropped_mid_way(make_backend: BackendFactory, ending: str) -> None:
    server = DroppingServer(
        sse_pieces(["Heart ", "size "]),
        content_type="text/event-stream",
        ending=ending,  # type: ignore[arg-type]
    )
    seen: list[str] = []
    with server.serve() as dropping_url:
        backend = await make_backend(base_url=dropping_url + "/v1")
        with pytest.raises(BackendError) as caught:
            async for event in backend.stream(request()):
                seen.append(event.text)
    assert type(caught.value) is BackendError
    assert "connection lost mid-stream" in str(caught.value)
    assert seen == ["Heart ", "size "]
    assert server.paths == ["/v1/chat/completions"]


async def test_stream_that_stops_without_a_finish_reason(make_backend: BackendFactory) -> None:
    pieces = [*sse_pieces(["Heart "]), b"data: [DONE]\n\n"]
    server = DroppingServer(pieces, content_type="text/event-stream", ending="finish")
    with server.serve() as dropping_url:
        backend = await make_backend(base_url=dropping_url + "/v1")
        with pytest.raises(BackendError) as caught:
            await collect(backend, request())
    assert "before the model finished" in str(caught.value)


# ----- through the engine ---------------------------------------------------------------------


async def test_engine_generates_text(
    fake: FakeOpenAI, make_backend: BackendFactory, url: str
) -> None:
    engine = Engine(await make_backend(), settings(url))
    result = await engine.generate("Summarize.", system="You are a radiologist.")
    assert result.text == REPLY
    assert (result.backend, result.model, result.finish_reason) == ("openai", MODEL, "stop")
    assert result.output_tokens == 9
    # The server's Gemma template folds the system message in front of the first turn.
    assert fake.chat_bodies[0]["messages"] == [
        {"role": "system", "content": "You are a radiologist."},
        {"role": "user", "content": "Summarize."},
    ]


async def test_engine_image_arrives_as_data_uri(
    fake: FakeOpenAI, make_backend: BackendFactory, url: str
) -> None:
    engine = Engine(await make_backend(), settings(url))
    await engine.generate("Describe.", images=[noise_png(size=(48, 48))])
    parts = fake.chat_bodies[0]["messages"][0]["content"]
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,iVBOR")
    assert parts[-1] == {"type": "text", "text": "Describe."}


async def test_engine_extract_sends_json_schema_response_format(
    fake: FakeOpenAI, make_backend: BackendFactory, url: str
) -> None:
    fake.reply = json.dumps({"impression": "clear lungs", "icd10": ["Z00.00"]})
    schema = {
        "type": "object",
        "properties": {
            "impression": {"type": "string"},
            "icd10": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["impression"],
    }
    engine = Engine(await make_backend(), settings(url))
    result = await engine.extract("Extract.", schema=schema)
    assert result.value == {"impression": "clear lungs", "icd10": ["Z00.00"]}
    (body,) = fake.chat_bodies
    response_format = body["response_format"]
    assert response_format["type"] == "json_schema"
    assert response_format["json_schema"]["strict"] is True
    sent = response_format["json_schema"]["schema"]
    assert sent["properties"]["impression"]["maxLength"] > 0
    assert sent["properties"]["icd10"]["maxItems"] > 0
    assert not [key for key in body if key.startswith("guided_")]


async def test_engine_budget_uses_the_servers_max_model_len(
    fake: FakeOpenAI, make_backend: BackendFactory, url: str
) -> None:
    engine = Engine(await make_backend(model="small-window"), settings(url))
    with pytest.raises(ContextOverflowError) as caught:
        await engine.generate("dose 5 mg twice daily; " * 400, max_tokens=256)
    assert "window 2048" in str(caught.value)
    assert fake.chat_bodies == []


async def test_engine_surfaces_vllm_context_400_as_context_overflow(
    fake: FakeOpenAI, make_backend: BackendFactory, url: str
) -> None:
    # The server does not report its 4096-token window, the configuration claims
    # more: the engine lets the request through and vLLM refuses it with its 400.
    backend = await make_backend(model="unreported-window", context_length=131072)
    engine = Engine(backend, settings(url))
    with pytest.raises(ContextOverflowError) as caught:
        await engine.generate("dose 5 mg twice daily; " * 800, max_tokens=256)
    assert caught.value.details["window"] == 4096
    assert len(fake.chat_bodies) == 1


def test_ordered_parts_go_over_the_wire_in_order() -> None:
    backend = OpenAIBackend(
        base_url="http://127.0.0.1:9/v1",
        model="m",
        api_key="x",
        context_length=8192,
        timeout_s=5,
        connect_timeout_s=1,
    )
    image = load_image(noise_png(size=(48, 48)))
    turn = Message.from_parts("user", ("Review.", image, "SLICE 1", "Q?"))
    content = backend.arguments(ChatRequest((turn,)))["messages"][0]["content"]
    assert [part["type"] for part in content] == ["text", "image_url", "text", "text"]
    assert [part.get("text") for part in content] == ["Review.", None, "SLICE 1", "Q?"]
    assert content[1]["image_url"]["url"] == image.data_uri()
