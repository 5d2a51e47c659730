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
    # Prompts are sized in the backend's own tokens (the tiny tokenizer makes about 2
    # characters a token, Gemma's about 4): 20000 x 0.01, plus the chat template's few.
    assert 200 <= rows["long_ehr"]["prompt_tokens"] <= 240
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
    # One calibration call, then the short row's two; the full-context row never went out.
    assert len(fake.chat_bodies) == 3


def test_the_synthetic_full_size_path_end_to_end(
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--synthetic-full-size` at a small size (the tiny config stands in for the full one,
    which needs 9 GB): the in-memory model is benchmarked through the Transformers backend,
    and every run writes exactly max_tokens decodable tokens (no early stop)."""
    from transformers import AutoConfig

    from cli_support import in_process
    from coheara.dev import full_size

    small = AutoConfig.from_pretrained(tiny_model_dir)
    monkeypatch.setattr(full_size, "full_size_config", lambda token_ids=None: small)
    run = in_process(monkeypatch, capsys)
    out = tmp_path / "bench.json"
    arguments = ["bench", "--synthetic-full-size", "--runs", "2", "--warmup", "0"]
    ran = run(*arguments, "--max-tokens", "12", "--scale", "0.01", "--json", str(out))
    assert ran.returncode == 0, ran.stderr
    document = json.loads(out.read_text())
    assert document["backend"] == "transformers" and document["model"] == "synthetic-full-size"
    rows = {row["scenario"]["id"]: row for row in document["rows"]}
    assert set(rows) == {"short_qa", "clinical_note", "image_text", "long_ehr"}
    assert all(row["output_tokens"] == 12 for row in rows.values())
    assert rows["image_text"]["prompt_tokens"] >= 256  # the vision tower ran

    refused = run("bench", "--synthetic-full-size", "--backend", "ollama")
    assert refused.returncode == 2
    assert "drop --backend" in refused.stderr and "Traceback" not in refused.stderr


def test_the_synthetic_model_decodes_and_never_stops_early(tiny_model_dir: Path) -> None:
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig

    from coheara.dev.full_size import full_size_config, synthetic_model
    from coheara.dev.tiny_model import SPECIAL_TOKENS, build_processor

    model, processor = synthetic_model(
        "cpu", torch.float32, AutoConfig.from_pretrained(tiny_model_dir)
    )
    tokenizer = processor.tokenizer
    embedding = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight.data_ptr() == embedding.data_ptr()  # tied
    assert not embedding[len(tokenizer) :].any() and embedding[: len(tokenizer)].abs().sum() > 0
    prompt = tokenizer("ward round notes", return_tensors="pt")
    with torch.inference_mode():
        ids = model.generate(**prompt, max_new_tokens=24, do_sample=False)[
            0, prompt["input_ids"].shape[1] :
        ]
    special = {tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert len(ids) == 24 and all(int(i) < len(tokenizer) and int(i) not in special for i in ids)
    # The full-size config takes the tokenizer's ids, so the processor's image tokens match.
    _, token_ids = build_processor()
    config = full_size_config(token_ids)
    assert config.image_token_index == token_ids["<image_soft_token>"]
    assert config.text_config.vocab_size == 262_208  # the LM head keeps its real cost
