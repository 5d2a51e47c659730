"""`coheara bench` end to end on the tiny model, with small sizes; and its arithmetic."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from cli_support import run_coheara
from coheara.deploy.latency import (
    CHARS_PER_TOKEN,
    SCENARIOS,
    Row,
    percentiles,
    synthetic_image,
    synthetic_text,
)


def test_percentiles_and_sizes() -> None:
    assert percentiles([]) == {"p50": None, "p95": None}
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    # numpy's linear interpolation: p95 sits 80% of the way from 4 to 10.
    assert percentiles(values) == {"p50": 3.0, "p95": pytest.approx(8.8)}
    text = synthetic_text(500)
    assert 500 * CHARS_PER_TOKEN <= len(text) < 500 * CHARS_PER_TOKEN + 40
    image = synthetic_image()
    assert image.shape == (896, 896, 3) and image.dtype.name == "uint8" and image.std() > 10


def test_a_row_is_judged_against_the_spec_and_the_target() -> None:
    note = next(s for s in SCENARIOS if s.id == "clinical_note")
    row = Row(note, prompt_tokens=[2000] * 3, total_s=[2.5, 2.9, 3.4], ttft_s=[0.2] * 3)
    summary = row.summary()
    assert summary["total_s"]["p50"] == 2.9 and summary["within_expected"]  # 1-3 s
    assert summary["within_point_of_care"]
    slow = Row(note, prompt_tokens=[2000], total_s=[3.2]).summary()
    assert not slow["within_expected"] and not slow["within_point_of_care"]
    assert slow["ttft_s"] == {"p50": None, "p95": None}


def test_the_command_on_the_tiny_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    out, chart = tmp_path / "bench.json", tmp_path / "bench.png"
    arguments = ["bench", "--backend", "transformers", "--model", str(tiny_model_dir)]
    arguments += ["--runs", "2", "--warmup", "1", "--max-tokens", "4", "--scale", "0.01"]
    arguments += ["--json", str(out), "--chart", str(chart)]
    done = run_coheara(*arguments, env={**os.environ, "COLUMNS": "220"}, timeout=600)
    assert done.returncode == 0, done.stderr
    document = json.loads(out.read_text())
    rows = {row["scenario"]["id"]: row for row in document["rows"]}
    assert set(rows) == {"short_qa", "clinical_note", "image_text", "long_ehr"}
    for row in rows.values():
        assert row["runs"] == 2
        assert 0 < row["ttft_s"]["p50"] <= row["total_s"]["p50"] <= row["total_s"]["p95"]
        assert row["within_point_of_care"] == (row["total_s"]["p50"] <= 3.0)
    # Sizes follow the spec's rows (scaled): the long context is the longest prompt, and
    # the image row carries its 256 image tokens.
    assert rows["long_ehr"]["prompt_tokens"] > rows["clinical_note"]["prompt_tokens"]
    assert rows["image_text"]["prompt_tokens"] >= 256
    with Image.open(chart) as picture:
        assert picture.format == "PNG" and picture.size == (960, 540)
    assert "clinical note (1K-5K tokens)" in done.stdout and "3 s target" in done.stdout


async def test_a_scenario_over_the_window_is_skipped_not_failed() -> None:
    from coheara import Engine, Settings, model_facts
    from coheara.deploy.latency import FULL_CONTEXT, run
    from fakes import FakeOllama, OllamaModel
    from servers import serve

    fake = FakeOllama({model_facts.DEFAULT_OLLAMA_MODEL: OllamaModel()})
    with serve(fake.app) as url:
        settings = Settings(backend="ollama", num_ctx=4096)
        async with Engine.from_config(settings=settings, url=url) as engine:
            short, full = SCENARIOS[0], FULL_CONTEXT
            rows = await run(engine, [short, full], runs=2, warmup=0, max_tokens=8, scale=1.0)
    assert rows[0]["runs"] == 2 and "skipped" not in rows[0]
    assert rows[1]["runs"] == 0 and "the window is 4096" in rows[1]["skipped"]
    assert len(fake.chat_bodies) == 2  # the full-context row never reached the backend
