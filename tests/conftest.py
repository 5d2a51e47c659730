"""Shared fixtures: the tiny random-weight MedGemma-architecture model, built once a session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No test may reach beyond loopback: keep the Hugging Face libraries offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from coheara.dev.tiny_model import build_tiny_model

    path = tmp_path_factory.mktemp("tiny-medgemma")
    build_tiny_model(path)
    return path
