"""Shared fixtures: the tiny random-weight MedGemma-architecture model, built once a session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from coheara.dev.tiny_model import build_tiny_model

    path = tmp_path_factory.mktemp("tiny-medgemma")
    build_tiny_model(path)
    return path
