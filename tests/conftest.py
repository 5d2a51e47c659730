"""Shared fixtures: the tiny random-weight MedGemma-architecture model, built once a session."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from coheara import Engine

# No test may reach beyond loopback: keep the Hugging Face libraries offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# A developer's own configuration must not change what the tests see, and no test may
# write into the developer's audit trail (the user data directory, XDG_DATA_HOME): the
# audit is off unless a test turns it on with a path of its own.
for _name in [
    n for n in os.environ if n.startswith("COHEARA_") or n in ("OLLAMA_HOST", "XDG_DATA_HOME")
]:
    del os.environ[_name]
os.environ["COHEARA_AUDIT_ENABLED"] = "false"
_TEST_HOME = Path(tempfile.mkdtemp(prefix="coheara-tests-"))
_EMPTY_CONFIG = _TEST_HOME / "empty.toml"
_EMPTY_CONFIG.write_text("")
os.environ["COHEARA_CONFIG"] = str(_EMPTY_CONFIG)
# Keys, audit and retained content default to the user data directory: a scratch one here.
os.environ["XDG_DATA_HOME"] = str(_TEST_HOME / "data")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> None:
    """The tiny model's matrices gain nothing from torch's thread pool and lose a lot on a
    busy two-core machine (each small operation waits for the pool)."""
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from coheara.dev.tiny_model import build_tiny_model

    path = tmp_path_factory.mktemp("tiny-medgemma")
    build_tiny_model(path)
    return path


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir: Path) -> Iterator[Engine]:
    """An engine on the tiny model, one per test module."""
    from coheara import Engine, Settings
    from coheara.backends.transformers_backend import TransformersBackend

    engine = Engine(TransformersBackend(str(tiny_model_dir)), Settings(max_output_tokens=16))
    yield engine
    asyncio.run(engine.aclose())


@pytest.fixture(scope="module")
def tiny_server(tiny_engine: Engine) -> Iterator[str]:
    """`coheara serve`'s app in front of `tiny_engine`, on a loopback port."""
    from coheara.server import create_app
    from servers import serve

    with serve(create_app(tiny_engine)) as url:
        yield url
