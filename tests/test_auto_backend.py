"""`--backend auto`: an Ollama that has the model, else local weights, else how to get either."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from coheara import Engine, Settings, model_facts
from coheara.backends.selection import AutoBackend, create_backend
from coheara.errors import BackendUnavailableError, ConfigurationError
from fakes import FakeOllama, OllamaModel
from servers import free_port, serve


@pytest.fixture(scope="module")
def ollama_url() -> Iterator[str]:
    fake = FakeOllama({model_facts.DEFAULT_OLLAMA_MODEL: OllamaModel()})
    with serve(fake.app) as url:
        yield url


async def test_auto_prefers_an_ollama_that_has_the_model(ollama_url: str) -> None:
    backend = create_backend(Settings(backend="auto", ollama_url=ollama_url))
    assert isinstance(backend, AutoBackend)
    async with Engine(backend, Settings()) as engine:
        result = await engine.generate("Status?")
    assert result.backend == "ollama" and result.model == model_facts.DEFAULT_OLLAMA_MODEL


async def test_auto_falls_back_to_local_weights(ollama_url: str, tiny_model_dir: Path) -> None:
    settings = Settings(
        backend="auto",
        ollama_url=ollama_url,
        ollama_model="absent:1b",
        transformers_model=str(tiny_model_dir),
    )
    async with Engine(create_backend(settings), settings) as engine:
        result = await engine.generate("Status?", max_tokens=3)
    assert result.backend == "transformers"


async def test_auto_with_nothing_says_how_to_get_either() -> None:
    settings = Settings(backend="auto", ollama_url=f"http://127.0.0.1:{free_port()}")
    backend = create_backend(settings)
    with pytest.raises(BackendUnavailableError) as caught:
        await backend.capabilities()
    message = str(caught.value)
    assert f"ollama pull {model_facts.DEFAULT_OLLAMA_MODEL}" in message
    assert "COHEARA_TRANSFORMERS_MODEL" in message
    health = await backend.health()
    assert not health.ok


def test_transformers_without_a_model_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="no Transformers model configured"):
        create_backend(Settings(backend="transformers"))
