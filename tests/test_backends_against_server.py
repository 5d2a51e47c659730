"""The Ollama and OpenAI backends against `coheara serve`, which runs the tiny model in process.

The server's engine (Transformers, on the CPU) is also called directly: what comes
through either wire must equal it. Random weights, so the tests compare the two
paths (text, token counts, finish reasons), never particular words. Neither engine
runs the degeneration guard here: random weights loop, and a guard that cut the
reply differently on each side would hide what these tests check.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import jsonschema
import pytest

from coheara import Engine, Settings, model_facts
from coheara.backends.base import Backend
from coheara.backends.ollama import OllamaBackend
from coheara.backends.openai_compat import OpenAIBackend
from coheara.backends.transformers_backend import TransformersBackend
from coheara.errors import ContextOverflowError, ModelNotFoundError
from coheara.server import create_app
from samples import SYSTEM, TRIAGE_SCHEMA, noise_png
from servers import serve

SETTINGS = Settings(max_output_tokens=16, guard_enabled=False)
PROMPT = "Summarise: chest pain radiating to the left arm."
CLIENT_NUM_CTX = 8192
KINDS = ["ollama", "openai"]

BackendFactory = Callable[..., Backend]


@pytest.fixture(scope="module")
def server_engine(tiny_model_dir: Path) -> Iterator[Engine]:
    engine = Engine(TransformersBackend(str(tiny_model_dir), device="cpu"), SETTINGS)
    yield engine
    asyncio.run(engine.aclose())


@pytest.fixture(scope="module")
def url(server_engine: Engine) -> Iterator[str]:
    with serve(create_app(server_engine, SETTINGS)) as base:
        yield base


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture
def make_backend(kind: str, url: str) -> BackendFactory:
    """A client backend of this kind, pointed at the server."""

    def make(model: str = "medgemma", num_ctx: int = CLIENT_NUM_CTX) -> Backend:
        if kind == "ollama":
            return OllamaBackend(
                url=url,
                model=model,
                num_ctx=num_ctx,
                timeout_s=60,
                connect_timeout_s=5,
                keep_alive=None,
            )
        return OpenAIBackend(
            base_url=url + "/v1",
            model=model,
            api_key="x",
            context_length=num_ctx,
            timeout_s=60,
            connect_timeout_s=5,
        )

    return make


@pytest.fixture
async def remote(make_backend: BackendFactory) -> AsyncIterator[Engine]:
    async with Engine(make_backend(), SETTINGS) as engine:
        yield engine


# ----- the three modes --------------------------------------------------------------------


async def test_greedy_text_equals_the_direct_engine(remote: Engine, server_engine: Engine) -> None:
    through = await remote.generate(PROMPT, system=SYSTEM, max_tokens=12)
    direct = await server_engine.generate(PROMPT, system=SYSTEM, max_tokens=12)
    assert through.text == direct.text
    assert through.finish_reason == direct.finish_reason
    assert through.prompt_tokens == direct.prompt_tokens  # the server's exact count
    assert through.prompt_tokens_exact is True  # reported by the server, not estimated
    assert through.output_tokens == direct.output_tokens
    assert through.backend == remote.backend.name and through.model == "medgemma"


async def test_streamed_chunks_join_to_the_same_text(remote: Engine, server_engine: Engine) -> None:
    chunks = [chunk async for chunk in remote.stream(PROMPT, max_tokens=12)]
    result = chunks[-1].result
    assert result is not None
    texts = [chunk.text for chunk in chunks[:-1]]
    assert sum(1 for text in texts if text) >= 2  # it really streamed
    direct = await server_engine.generate(PROMPT, max_tokens=12)
    assert "".join(texts) == result.text == direct.text


async def test_an_image_adds_its_prompt_tokens_through_the_wire(
    remote: Engine, server_engine: Engine
) -> None:
    image = noise_png(3, (64, 48))
    text_only = await remote.generate(PROMPT, max_tokens=4)
    with_image = await remote.generate(PROMPT, images=[image], max_tokens=4)
    assert with_image.prompt_tokens - text_only.prompt_tokens == model_facts.IMAGE_PROMPT_TOKENS
    direct = await server_engine.generate(PROMPT, images=[image], max_tokens=4)
    assert with_image.prompt_tokens == direct.prompt_tokens
    assert with_image.text == direct.text


async def test_extract_returns_a_schema_valid_object(remote: Engine) -> None:
    result = await remote.extract(PROMPT, schema=TRIAGE_SCHEMA, max_tokens=60)
    jsonschema.validate(result.value, TRIAGE_SCHEMA)
    assert set(result.value) == {"urgent", "side"}
    assert result.finish_reason == "stop"


# ----- failures -----------------------------------------------------------------------------


async def test_an_unknown_model_is_model_not_found(
    make_backend: BackendFactory, tiny_model_dir: Path
) -> None:
    async with Engine(make_backend(model="llama3:8b"), SETTINGS) as engine:
        with pytest.raises(ModelNotFoundError) as caught:
            await engine.generate(PROMPT, max_tokens=2)
    assert "llama3:8b" in str(caught.value)
    assert str(tiny_model_dir) not in str(caught.value)  # the listing names no server path


async def test_a_prompt_over_the_clients_window_is_refused(
    make_backend: BackendFactory, kind: str
) -> None:
    # The Ollama client's window is its num_ctx; the OpenAI client's is the server's
    # max_model_len, read from /v1/models.
    expected_window = CLIENT_NUM_CTX if kind == "ollama" else model_facts.CONTEXT_LENGTH
    long_text = "chest pain radiating to the left arm. " * (expected_window // 4)
    async with Engine(make_backend(), SETTINGS) as engine:
        with pytest.raises(ContextOverflowError) as caught:
            await engine.generate(long_text, max_tokens=8)
    assert caught.value.details["window"] == expected_window


async def test_a_prompt_the_server_counts_over_its_window_is_refused(
    make_backend: BackendFactory,
) -> None:
    # Three tokens a character for the tiny tokenizer, under the client's estimate of a
    # third of a token: the client sends it, the server's exact count refuses it.
    dense = "".join(chr(0x4E00 + i % 2000) for i in range(50_000))
    async with Engine(make_backend(num_ctx=model_facts.CONTEXT_LENGTH), SETTINGS) as engine:
        with pytest.raises(ContextOverflowError) as caught:
            await engine.generate(dense, max_tokens=8)
    message = str(caught.value)
    assert "refused the prompt" in message  # the server said so, over the wire
    assert f"window {model_facts.CONTEXT_LENGTH}" in message
    assert dense[:24] not in message


async def test_closing_a_stream_early_stops_the_servers_generation(remote: Engine) -> None:
    # Unstopped, these tokens keep the server's one generation worker busy for half a
    # minute (the guard is off, and this prompt does not reach an end-of-turn in them).
    stream = remote.stream(PROMPT, max_tokens=7000)
    async for chunk in stream:
        if chunk.text:
            break
    await stream.aclose()
    started = time.monotonic()
    following = await remote.generate(PROMPT, max_tokens=4)
    elapsed = time.monotonic() - started
    assert following.output_tokens == 4 and following.finish_reason == "length"
    assert elapsed < 5, f"the next request waited {elapsed:.1f}s for the abandoned one"
