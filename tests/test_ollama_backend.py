"""The Ollama backend against a fake Ollama over loopback: wire format, errors, engine rules."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from PIL import Image
from pydantic import BaseModel, Field

from coheara import Engine, Settings, model_facts
from coheara.backends.base import ChatRequest, Message
from coheara.backends.ollama import OllamaBackend
from coheara.backends.remote_errors import redact_server_detail
from coheara.errors import (
    BackendError,
    BackendOverloadedError,
    BackendTimeoutError,
    BackendUnavailableError,
    ContextOverflowError,
    InvalidRequestError,
    ModelNotFoundError,
    SilentTruncationError,
    UnsupportedCapabilityError,
)
from fakes import DroppingServer, FakeOllama, OllamaModel, ndjson_pieces
from samples import collect, noise_png, request
from servers import free_port, serve

TEXT_MODEL = model_facts.DEFAULT_OLLAMA_MODEL
VISION_MODEL = model_facts.VISION_OLLAMA_ALTERNATIVE
REPLY = "No acute cardiopulmonary process. Heart size is normal."

BackendFactory = Callable[..., Awaitable[OllamaBackend]]


@pytest.fixture(scope="module")
def fake_server() -> Iterator[tuple[FakeOllama, str]]:
    fake = FakeOllama(
        {
            TEXT_MODEL: OllamaModel(capabilities=["completion"], context_length=131072),
            VISION_MODEL: OllamaModel(capabilities=["completion", "vision"]),
            "short-window:1b": OllamaModel(context_length=32768),
            "no-window-info:1b": OllamaModel(context_length=0),
        }
    )
    with serve(fake.app) as url:
        yield fake, url


@pytest.fixture
def fake(fake_server: tuple[FakeOllama, str]) -> FakeOllama:
    fake_server[0].reset()
    return fake_server[0]


@pytest.fixture
def url(fake_server: tuple[FakeOllama, str]) -> str:
    return fake_server[1]


@pytest.fixture
async def make_backend(url: str) -> AsyncIterator[BackendFactory]:
    made: list[OllamaBackend] = []

    async def make(**overrides: Any) -> OllamaBackend:
        arguments: dict[str, Any] = {
            "url": url,
            "model": TEXT_MODEL,
            "num_ctx": 8192,
            "timeout_s": 10.0,
            "connect_timeout_s": 2.0,
            "keep_alive": None,
        }
        arguments.update(overrides)
        backend = OllamaBackend(**arguments)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.aclose()


def settings(url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "backend": "ollama",
        "ollama_url": url,
        "ollama_model": TEXT_MODEL,
        "extract_retries": 0,
    }
    values.update(overrides)
    return Settings(**values)


# ----- the wire format -------------------------------------------------------------------


async def test_every_call_sends_the_one_num_ctx_and_refuses_truncation(
    fake: FakeOllama, make_backend: BackendFactory
) -> None:
    backend = await make_backend(num_ctx=12288)
    await collect(backend, request(max_tokens=100))
    await collect(backend, request("A much longer second request " * 50, max_tokens=900))
    assert len(fake.chat_bodies) == 2
    for body in fake.chat_bodies:
        assert body["options"]["num_ctx"] == 12288
        assert body["truncate"] is False
        assert body["shift"] is False
        assert body["model"] == TEXT_MODEL
        assert body["stream"] is True
        assert "think" not in body
        assert "format" not in body
        assert "keep_alive" not in body
    assert [b["options"]["num_predict"] for b in fake.chat_bodies] == [100, 900]
    assert backend.context_window == 12288


async def test_options_are_sent_only_when_set(
    fake: FakeOllama, make_backend: BackendFactory
) -> None:
    backend = await make_backend(keep_alive="30m")
    await collect(backend, request(max_tokens=64))
    await collect(
        backend,
        request(max_tokens=64, temperature=0.7, top_p=0.9, top_k=40, seed=7, stop=("###",)),
    )
    plain, tuned = (body["options"] for body in fake.chat_bodies)
    assert plain == {"num_ctx": 8192, "num_predict": 64, "temperature": 0.0}
    assert tuned == {
        "num_ctx": 8192,
        "num_predict": 64,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "seed": 7,
        "stop": ["###"],
    }
    assert all(body["keep_alive"] == "30m" for body in fake.chat_bodies)


async def test_roles_and_images_go_over_the_wire_as_ollama_wants(
    fake: FakeOllama, make_backend: BackendFactory
) -> None:
    from coheara.imaging import load_image

    image = load_image(noise_png(size=(64, 64)))
    chat = ChatRequest(
        (
            Message("user", "first question"),
            Message("assistant", "first answer"),
            Message("user", "look at this", (image,)),
        )
    )
    await collect(await make_backend(model=VISION_MODEL), chat)
    (body,) = fake.chat_bodies
    assert [(m["role"], m["content"]) for m in body["messages"]] == [
        ("user", "first question"),
        ("assistant", "first answer"),
        ("user", "look at this"),
    ]
    assert "images" not in body["messages"][0]
    (sent,) = body["messages"][2]["images"]
    assert not sent.startswith("data:")
    assert base64.b64decode(sent, validate=True) == image.png_bytes()


async def test_json_schema_goes_in_format(fake: FakeOllama, make_backend: BackendFactory) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 5}}}
    chat = ChatRequest((Message("user", "extract"),), json_schema=schema)
    await collect(await make_backend(), chat)
    assert fake.chat_bodies[0]["format"] == schema


# ----- streaming ---------------------------------------------------------------------------


async def test_stream_yields_deltas_then_a_final_event_that_can_carry_text(
    fake: FakeOllama, make_backend: BackendFactory
) -> None:
    events = await collect(await make_backend(), request("x" * 400))
    assert "".join(e.text for e in events) == REPLY
    assert len(events) > 2
    assert all(not e.done for e in events[:-1])
    final = events[-1]
    assert final.done
    assert final.text == "is normal."
    assert final.finish_reason == "stop"
    assert final.prompt_tokens == 100
    assert final.output_tokens == len(REPLY) // 4 + 1


async def test_done_reason_length_maps_to_length(
    fake: FakeOllama, make_backend: BackendFactory
) -> None:
    fake.reply = "word " * 200
    events = await collect(await make_backend(), request(max_tokens=10))
    assert events[-1].finish_reason == "length"
    assert len("".join(e.text for e in events)) == 40


async def test_closing_the_stream_early_closes_the_http_stream(
    fake: FakeOllama, make_backend: BackendFactory
) -> None:
    fake.reply = "token " * 400
    fake.chunk_words = 1
    fake.chunk_delay_s = 0.02
    stream = (await make_backend()).stream(request())
    first = await stream.__anext__()
    assert first.text == "token "
    await stream.aclose()
    (record,) = fake.streams
    # Wait while blocking this event loop on purpose: only a close done inside aclose()
    # itself counts, not one left to the garbage collector's finalizer on a later tick.
    assert record.ended.wait(5)
    assert not record.completed
    assert record.sent < record.total_chunks // 2


# ----- capabilities and health ---------------------------------------------------------------


async def test_capabilities_read_show_once_per_model(
    fake: FakeOllama, make_backend: BackendFactory
) -> None:
    backend = await make_backend(model="short-window:1b")
    first = await backend.capabilities()
    second = await backend.capabilities()
    assert first is second
    assert len(fake.bodies("/api/show")) == 1
    assert fake.bodies("/api/show")[0] == {"model": "short-window:1b"}
    assert first.backend == "ollama"
    assert first.context_length == 32768
    assert first.vision is False
    assert first.constrained_decoding is True
    assert first.exact_token_count is False


async def test_text_only_model_names_a_vision_alternative(make_backend: BackendFactory) -> None:
    capabilities = await (await make_backend()).capabilities()
    assert capabilities.vision is False
    assert f"ollama pull {VISION_MODEL}" in capabilities.details["vision_hint"]
    vision = await (await make_backend(model=VISION_MODEL)).capabilities()
    assert vision.vision is True
    assert vision.context_length == 131072


async def test_missing_context_length_falls_back_to_the_model_card(
    make_backend: BackendFactory,
) -> None:
    capabilities = await (await make_backend(model="no-window-info:1b")).capabilities()
    assert capabilities.context_length == model_facts.CONTEXT_LENGTH


async def test_capabilities_of_an_unknown_model_say_what_to_pull(
    make_backend: BackendFactory,
) -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        await (await make_backend(model="nobody/nothing:1b")).capabilities()
    assert caught.value.hint == "run `ollama pull nobody/nothing:1b`"


async def test_health_reports_the_version(make_backend: BackendFactory, url: str) -> None:
    health = await (await make_backend()).health()
    assert (health.ok, health.backend, health.version) == (True, "ollama", "0.12.6")
    assert url in health.detail


async def test_health_never_raises_when_ollama_is_down(make_backend: BackendFactory) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    health = await (await make_backend(url=dead)).health()
    assert health.ok is False
    assert dead in health.detail
    assert "ollama serve" in health.detail


# ----- errors ----------------------------------------------------------------------------------


async def test_connection_refused_says_how_to_start_ollama(make_backend: BackendFactory) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(BackendUnavailableError) as caught:
        await collect(await make_backend(url=dead), request())
    assert type(caught.value) is BackendUnavailableError
    assert dead in str(caught.value)
    assert "start Ollama (ollama serve)" in str(caught.value)


async def test_unknown_model_gives_the_pull_command(
    fake: FakeOllama, make_backend: BackendFactory
) -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        await collect(await make_backend(model="missing/model:4b"), request())
    assert caught.value.hint == "run `ollama pull missing/model:4b`"
    assert caught.value.details["status"] == 404
    assert len(fake.chat_bodies) == 1


async def test_bad_request_is_an_invalid_request(
    fake: FakeOllama, make_backend: BackendFactory
) -> None:
    fake.fail_with = (400, "invalid format: schema has an unsupported keyword")
    with pytest.raises(InvalidRequestError) as caught:
        await collect(await make_backend(), request())
    assert type(caught.value) is InvalidRequestError
    assert "HTTP 400" in str(caught.value)
    assert "unsupported keyword" in str(caught.value)


async def test_prompt_too_long_refusal_is_a_context_overflow(
    fake: FakeOllama, make_backend: BackendFactory
) -> None:
    fake.honours_truncate = True
    with pytest.raises(ContextOverflowError) as caught:
        await collect(await make_backend(num_ctx=1024), request("w" * 8000))
    assert type(caught.value) is ContextOverflowError
    assert "num_ctx 1024" in str(caught.value)
    assert "COHEARA_NUM_CTX" in str(caught.value)
    assert caught.value.details["window"] == 1024


@pytest.mark.parametrize("status", [413, 500])
async def test_context_refusal_is_recognised_by_its_wording_on_any_status(
    fake: FakeOllama, make_backend: BackendFactory, status: int
) -> None:
    fake.fail_with = (status, "the input length exceeds the context length")
    with pytest.raises(ContextOverflowError):
        await collect(await make_backend(), request())


async def test_context_refusal_as_an_error_line_is_a_context_overflow(
    fake: FakeOllama, make_backend: BackendFactory
) -> None:
    fake.error_after_chunks = (0, "the input length exceeds the context length")
    with pytest.raises(ContextOverflowError):
        await collect(await make_backend(), request())


async def test_bare_404_also_suggests_checking_the_url(
    fake: FakeOllama, make_backend: BackendFactory, url: str
) -> None:
    fake.fail_with = (404, "404 page not found")
    with pytest.raises(ModelNotFoundError) as caught:
        await collect(await make_backend(), request())
    assert caught.value.hint == (
        f"run `ollama pull {TEXT_MODEL}`, and check that {url} is an Ollama server"
    )


async def test_full_queue_is_overloaded(fake: FakeOllama, make_backend: BackendFactory) -> None:
    fake.fail_with = (503, "server busy")
    with pytest.raises(BackendOverloadedError) as caught:
        await collect(await make_backend(), request())
    assert "busy" in str(caught.value)
    assert caught.value.details["status"] == 503
    assert caught.value.http_status == 503


async def test_other_server_failure_is_a_backend_error(
    fake: FakeOllama, make_backend: BackendFactory
) -> None:
    fake.fail_with = (500, "llama runner process has terminated: exit status 2")
    with pytest.raises(BackendError) as caught:
        await collect(await make_backend(), request())
    assert type(caught.value) is BackendError
    assert "HTTP 500" in str(caught.value)
    assert "runner process has terminated" in str(caught.value)


async def test_error_line_mid_stream_is_a_backend_error(
    fake: FakeOllama, make_backend: BackendFactory
) -> None:
    fake.error_after_chunks = (2, "an error was encountered while running the model")
    seen: list[str] = []
    with pytest.raises(BackendError) as caught:
        async for event in (await make_backend()).stream(request()):
            seen.append(event.text)
    assert type(caught.value) is BackendError
    assert "mid-stream" in str(caught.value)
    assert "while running the model" in str(caught.value)
    assert seen == ["No acute ", "cardiopulmonary process. "]


@pytest.mark.parametrize("ending", ["abort", "close"])
async def test_connection_dropped_mid_stream(make_backend: BackendFactory, ending: str) -> None:
    server = DroppingServer(ndjson_pieces(["Heart ", "size "]), ending=ending)  # type: ignore[arg-type]
    seen: list[str] = []
    with server.serve() as dropping_url:
        backend = await make_backend(url=dropping_url)
        with pytest.raises(BackendError) as caught:
            async for event in backend.stream(request()):
                seen.append(event.text)
    assert type(caught.value) is BackendError
    assert "connection lost mid-stream" in str(caught.value)
    assert seen == ["Heart ", "size "]
    assert server.bodies[0]["options"]["num_ctx"] == 8192


async def test_connection_dropped_before_any_answer(make_backend: BackendFactory) -> None:
    with DroppingServer(None).serve() as dropping_url:
        backend = await make_backend(url=dropping_url)
        with pytest.raises(BackendError) as caught:
            await collect(backend, request())
    assert "before it answered" in str(caught.value)


async def test_stream_that_ends_without_its_final_chunk(make_backend: BackendFactory) -> None:
    with DroppingServer(ndjson_pieces(["Heart "]), ending="finish").serve() as dropping_url:
        backend = await make_backend(url=dropping_url)
        with pytest.raises(BackendError) as caught:
            await collect(backend, request())
    assert "without its final chunk" in str(caught.value)


async def test_a_line_that_is_not_json_is_a_backend_error(make_backend: BackendFactory) -> None:
    pieces = [*ndjson_pieces(["Heart "]), b"<html>proxy error</html>\n"]
    with DroppingServer(pieces, ending="finish").serve() as dropping_url:
        backend = await make_backend(url=dropping_url)
        with pytest.raises(BackendError) as caught:
            await collect(backend, request())
    assert "not a chat chunk" in str(caught.value)


async def test_slow_first_token_times_out(fake: FakeOllama, make_backend: BackendFactory) -> None:
    fake.first_token_delay_s = 1.0
    with pytest.raises(BackendTimeoutError) as caught:
        await collect(await make_backend(timeout_s=0.2), request())
    assert "for the first token" in str(caught.value)
    assert "COHEARA_TIMEOUT_S" in str(caught.value)


async def test_error_messages_never_quote_the_prompt(
    fake: FakeOllama, make_backend: BackendFactory
) -> None:
    secret = "Patient Jane Roe, MRN 99812345, reports chest pain since Tuesday"
    fake.fail_with = (400, f'invalid request: cannot parse "{secret}"')
    with pytest.raises(InvalidRequestError) as caught:
        await collect(await make_backend(), request(secret))
    assert "Jane Roe" not in str(caught.value)
    assert "99812345" not in str(caught.value)
    assert "withheld" in str(caught.value)


def test_redaction_keeps_details_that_do_not_quote_the_prompt() -> None:
    chat = request("Patient Jane Roe, MRN 99812345, reports chest pain since Tuesday")
    assert redact_server_detail("model requires more system memory", chat) == (
        "model requires more system memory"
    )
    assert len(redact_server_detail("x" * 5000)) == 303


# ----- through the engine ---------------------------------------------------------------------


async def test_engine_generates_text(
    fake: FakeOllama, make_backend: BackendFactory, url: str
) -> None:
    engine = Engine(await make_backend(), settings(url))
    result = await engine.generate("Summarize the film.", system="You are a radiologist.")
    assert result.text == REPLY
    assert result.backend == "ollama"
    assert result.model == TEXT_MODEL
    assert result.finish_reason == "stop"
    assert result.prompt_tokens == fake._prompt_tokens(fake.chat_bodies[0])
    assert result.prompt_tokens_exact is True
    (body,) = fake.chat_bodies
    assert [m["role"] for m in body["messages"]] == ["user"]
    assert body["messages"][0]["content"] == "You are a radiologist.\n\nSummarize the film."


async def test_image_to_a_text_only_model_fails_before_any_chat_request(
    fake: FakeOllama, make_backend: BackendFactory, url: str
) -> None:
    engine = Engine(await make_backend(model=TEXT_MODEL), settings(url))
    with pytest.raises(UnsupportedCapabilityError) as caught:
        await engine.generate("Describe the image.", images=[noise_png(size=(64, 64))])
    assert f"ollama pull {VISION_MODEL}" in str(caught.value)
    assert TEXT_MODEL in str(caught.value)
    assert len(fake.bodies("/api/show")) == 1
    assert len(fake.chat_bodies) == 0


async def test_image_to_a_vision_model_arrives_as_base64_png(
    fake: FakeOllama, make_backend: BackendFactory, url: str
) -> None:
    engine = Engine(await make_backend(model=VISION_MODEL), settings(url))
    result = await engine.generate("Describe the image.", images=[noise_png(size=(100, 100))])
    assert result.text == REPLY
    (body,) = fake.chat_bodies
    (sent,) = body["messages"][0]["images"]
    decoded = Image.open(io.BytesIO(base64.b64decode(sent, validate=True)))
    assert decoded.format == "PNG"
    assert decoded.size == (model_facts.IMAGE_SIZE, model_facts.IMAGE_SIZE)


async def test_request_too_large_for_num_ctx_is_refused_before_sending(
    fake: FakeOllama, make_backend: BackendFactory, url: str
) -> None:
    engine = Engine(await make_backend(num_ctx=2048), settings(url))
    with pytest.raises(ContextOverflowError) as caught:
        await engine.generate("lab value 12.5 mmol/L; " * 400, max_tokens=512)
    message = str(caught.value)
    assert "window 2048" in message
    assert "512 reserved for output" in message
    assert f"prompt about {caught.value.details['prompt_tokens']} tokens" in message
    assert caught.value.details["prompt_tokens"] > 2048
    assert "COHEARA_NUM_CTX" in message
    assert len(fake.chat_bodies) == 0


async def test_image_cost_is_counted_in_the_budget(
    fake: FakeOllama, make_backend: BackendFactory, url: str
) -> None:
    engine = Engine(await make_backend(model=VISION_MODEL, num_ctx=1024), settings(url))
    with pytest.raises(ContextOverflowError) as caught:
        await engine.generate("compare", images=[noise_png(size=(64, 64))] * 3, max_tokens=300)
    assert "3 image(s) x 260 tokens" in str(caught.value)
    assert len(fake.chat_bodies) == 0


async def test_server_ignoring_num_ctx_is_caught_as_silent_truncation(
    fake: FakeOllama, make_backend: BackendFactory, url: str
) -> None:
    fake.server_num_ctx = 2048  # a server that keeps its own small window
    engine = Engine(await make_backend(num_ctx=16384), settings(url))
    with pytest.raises(SilentTruncationError) as caught:
        await engine.generate("Prior history. " * 2000, max_tokens=256)
    assert caught.value.details["reported_prompt_tokens"] == 2048
    assert caught.value.details["expected_at_least"] == 5000
    assert len(fake.chat_bodies) == 1
    assert fake.chat_bodies[0]["options"]["num_ctx"] == 16384


async def test_prompt_filling_the_whole_window_is_caught_as_silent_truncation(
    fake: FakeOllama, make_backend: BackendFactory, url: str
) -> None:
    fake.chars_per_token = 1.0  # dense digits: about one token a character
    engine = Engine(await make_backend(num_ctx=4096), settings(url))
    with pytest.raises(SilentTruncationError) as caught:
        await engine.generate("1234567890" * 900, max_tokens=256)
    assert caught.value.details["reported_prompt_tokens"] == 4096
    assert "the whole window" in str(caught.value)


async def test_newer_ollama_refusal_reaches_the_caller_as_context_overflow(
    fake: FakeOllama, make_backend: BackendFactory, url: str
) -> None:
    fake.chars_per_token = 1.0
    fake.honours_truncate = True
    engine = Engine(await make_backend(num_ctx=4096), settings(url))
    with pytest.raises(ContextOverflowError) as caught:
        await engine.generate("1234567890" * 900, max_tokens=256)
    assert type(caught.value) is ContextOverflowError
    assert "num_ctx 4096" in str(caught.value)


class Finding(BaseModel):
    finding: str
    codes: list[str] = Field(default_factory=list)


async def test_extract_sends_the_bounded_schema_as_format(
    fake: FakeOllama, make_backend: BackendFactory, url: str
) -> None:
    fake.reply = json.dumps({"finding": "normal chest film", "codes": ["R91.8"]})
    schema = {
        "type": "object",
        "properties": {
            "finding": {"type": "string"},
            "codes": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["finding", "codes"],
    }
    engine = Engine(await make_backend(), settings(url))
    result = await engine.extract("Extract the finding.", schema=schema)
    assert result.value == {"finding": "normal chest film", "codes": ["R91.8"]}
    sent = fake.chat_bodies[0]["format"]
    assert sent["properties"]["finding"]["maxLength"] > 0
    assert sent["properties"]["codes"]["maxItems"] > 0
    assert sent["properties"]["codes"]["items"]["maxLength"] > 0
    assert sent["required"] == ["finding", "codes"]


async def test_extract_with_a_pydantic_model_returns_an_instance(
    fake: FakeOllama, make_backend: BackendFactory, url: str
) -> None:
    fake.reply = json.dumps({"finding": "small effusion", "codes": []})
    engine = Engine(await make_backend(), settings(url))
    result = await engine.extract("Extract the finding.", schema=Finding)
    assert result.value == Finding(finding="small effusion", codes=[])
    assert "maxLength" in json.dumps(fake.chat_bodies[0]["format"])


async def test_engine_stream_closed_early_stops_the_server_stream(
    fake: FakeOllama, make_backend: BackendFactory, url: str
) -> None:
    fake.reply = "token " * 400
    fake.chunk_words = 1
    fake.chunk_delay_s = 0.02
    engine = Engine(await make_backend(), settings(url, guard_enabled=False))
    chunks = engine.stream("Write a long note.")
    first = await chunks.__anext__()
    assert first.text
    await chunks.aclose()
    (record,) = fake.streams
    assert await asyncio.to_thread(record.ended.wait, 5)
    assert not record.completed
