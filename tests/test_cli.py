"""The `coheara` command as a user runs it: a real process, its output and its exit code."""

from __future__ import annotations

import io
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import numpy as np
import pytest
from PIL import Image

from cli_support import run_coheara
from coheara import model_facts
from coheara.server.background import serve_in_process
from fakes import FakeOllama, OllamaModel
from servers import free_port, serve

SCHEMA = {
    "type": "object",
    "properties": {"finding": {"type": "string", "maxLength": 30}, "urgent": {"type": "boolean"}},
    "required": ["finding", "urgent"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def environment(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """No site configuration, no inherited COHEARA_* or OLLAMA_HOST, one torch thread."""
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COHEARA_", "OLLAMA_"))}
    env.update({"HOME": str(home), "OMP_NUM_THREADS": "1", "NO_COLOR": "1", "COLUMNS": "200"})
    return env


def coheara(
    *args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return run_coheara(*args, env=env, cwd=cwd, timeout=timeout)


def one_clean_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture(scope="module")
def fake_ollama() -> Iterator[tuple[FakeOllama, str]]:
    fake = FakeOllama(
        {
            model_facts.DEFAULT_OLLAMA_MODEL: OllamaModel(capabilities=["completion"]),
            model_facts.VISION_OLLAMA_ALTERNATIVE: OllamaModel(
                capabilities=["completion", "vision"]
            ),
        }
    )
    with serve(fake.app) as url:
        yield fake, url


def png(path: Path) -> Path:
    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 48, 3), 90, dtype=np.uint8)).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    return path


# ----- errors: one line, a documented code ------------------------------------------------


def test_unknown_backend_is_a_usage_error(environment: dict[str, str]) -> None:
    result = coheara("ask", "hi", "--backend", "llamafile", env=environment)
    assert result.returncode == 2
    assert "unknown backend 'llamafile'" in one_clean_line(result)


def test_unreachable_ollama_exits_7_with_the_fix(environment: dict[str, str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = coheara("ask", "hi", "--backend", "ollama", "--url", url, env=environment)
    assert result.returncode == 7
    line = one_clean_line(result)
    assert url in line and "ollama serve" in line


def test_missing_model_exits_6_with_the_pull_command(
    environment: dict[str, str], fake_ollama: tuple[FakeOllama, str]
) -> None:
    _, url = fake_ollama
    result = coheara(
        "ask", "hi", "--backend", "ollama", "--url", url, "--model", "nope:1b", env=environment
    )
    assert result.returncode == 6
    assert "ollama pull nope:1b" in one_clean_line(result)


def test_image_to_the_text_only_spec_model_exits_4_naming_a_vision_build(
    environment: dict[str, str], fake_ollama: tuple[FakeOllama, str], tmp_path: Path
) -> None:
    fake, url = fake_ollama
    fake.reset()
    image = png(tmp_path / "film.png")
    result = coheara(
        "ask",
        "Read this.",
        "--image",
        str(image),
        "--backend",
        "ollama",
        "--url",
        url,
        env=environment,
    )
    assert result.returncode == 4
    assert model_facts.VISION_OLLAMA_ALTERNATIVE in one_clean_line(result)
    assert fake.chat_bodies == []


def test_prompt_over_the_window_exits_5_with_the_numbers(
    environment: dict[str, str], fake_ollama: tuple[FakeOllama, str]
) -> None:
    fake, url = fake_ollama
    fake.reset()
    env = {**environment, "COHEARA_NUM_CTX": "1024"}
    result = coheara("ask", "word " * 2000, "--backend", "ollama", "--url", url, env=env)
    assert result.returncode == 5
    line = one_clean_line(result)
    assert "window 1024" in line and "COHEARA_NUM_CTX" in line
    assert "word word" not in line
    assert fake.chat_bodies == []


def test_error_text_is_printed_as_is_not_as_markup(environment: dict[str, str]) -> None:
    result = coheara("ask", "hi", "--backend", "[/][bold]x", env=environment)
    assert result.returncode == 2
    assert "'[/][bold]x'" in one_clean_line(result)


@pytest.mark.parametrize("command", [["serve"], ["doctor"], ["ask", "hi"]])
def test_bad_setting_is_exit_3_for_every_command(
    environment: dict[str, str], command: list[str]
) -> None:
    result = coheara(*command, env={**environment, "COHEARA_NUM_CTX": "100"})
    assert result.returncode == 3
    assert "COHEARA_NUM_CTX" in one_clean_line(result)


def test_bad_setting_exits_3(environment: dict[str, str]) -> None:
    result = coheara("ask", "hi", env={**environment, "COHEARA_NUM_CTX": "lots"})
    assert result.returncode == 3
    assert "COHEARA_NUM_CTX" in one_clean_line(result)


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("missing.json", None, "schema file not found"),
        ("broken.json", "{not json", "is not JSON"),
        ("list.json", "[1, 2]", "must hold a JSON object"),
    ],
)
def test_bad_schema_file_exits_4(
    environment: dict[str, str], tmp_path: Path, name: str, content: str | None, expected: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    result = coheara(
        "ask",
        "x",
        "--schema",
        str(path),
        "--backend",
        "ollama",
        "--url",
        f"http://127.0.0.1:{free_port()}",
        env=environment,
    )
    assert result.returncode == 4
    assert expected in one_clean_line(result)


def test_unreadable_image_exits_4_without_its_name(
    environment: dict[str, str], tmp_path: Path, tiny_model_dir: Path
) -> None:
    bad = tmp_path / "Doe_John_MRN123.png"
    bad.write_bytes(b"this is not an image")
    result = coheara(
        "ask",
        "x",
        "--image",
        str(bad),
        "--backend",
        "transformers",
        "--model",
        str(tiny_model_dir),
        env=environment,
    )
    assert result.returncode == 4
    line = one_clean_line(result)
    assert "not in a supported format" in line and "MRN123" not in line


# ----- the three modes on the tiny model --------------------------------------------------


def test_ask_streams_text_then_the_evidence(
    environment: dict[str, str], tiny_model_dir: Path
) -> None:
    result = coheara(
        "ask",
        "Summarize the chart.",
        "--max-tokens",
        "12",
        "--backend",
        "transformers",
        "--model",
        str(tiny_model_dir),
        env=environment,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    evidence = result.stderr.strip().splitlines()[-1]
    assert evidence.startswith(f"transformers:{tiny_model_dir} | ")
    assert "output 12 tok" in evidence or "| stop |" in evidence


def test_ask_json_carries_the_evidence_and_counts_the_image(
    environment: dict[str, str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    common = [
        "--max-tokens",
        "4",
        "--json",
        "--backend",
        "transformers",
        "--model",
        str(tiny_model_dir),
    ]
    plain = coheara("ask", "Describe.", *common, env=environment)
    seen = coheara(
        "ask", "Describe.", "--image", str(png(tmp_path / "a.png")), *common, env=environment
    )
    assert plain.returncode == seen.returncode == 0, plain.stderr + seen.stderr
    first, second = json.loads(plain.stdout), json.loads(seen.stdout)
    assert first["backend"] == "transformers" and first["prompt_tokens_exact"] is True
    assert second["prompt_tokens"] - first["prompt_tokens"] == model_facts.IMAGE_PROMPT_TOKENS
    assert first["output_tokens"] <= 4


def test_ask_with_a_schema_prints_a_valid_object(
    environment: dict[str, str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    schema = tmp_path / "finding.json"
    schema.write_text(json.dumps(SCHEMA))
    result = coheara(
        "ask",
        "Pleural effusion, not urgent.",
        "--schema",
        str(schema),
        "--max-tokens",
        "80",
        "--backend",
        "transformers",
        "--model",
        str(tiny_model_dir),
        env=environment,
    )
    assert result.returncode == 0, result.stderr
    jsonschema.validate(json.loads(result.stdout), SCHEMA)


def test_dev_tiny_model_writes_a_loadable_checkpoint(
    environment: dict[str, str], tmp_path: Path
) -> None:
    result = coheara("dev", "tiny-model", str(tmp_path / "tiny"), env=environment)
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "tiny" / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForConditionalGeneration"]
    assert config["mm_tokens_per_image"] == model_facts.IMAGE_SOFT_TOKENS


def test_selftest_passes_on_a_fresh_install(environment: dict[str, str]) -> None:
    result = coheara("selftest", env=environment, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all 12 checks passed" in result.stderr
    assert result.stdout.count("pass") == 12


# ----- doctor and serve -------------------------------------------------------------------


def test_doctor_reports_a_vision_model_and_can_serve(
    environment: dict[str, str], fake_ollama: tuple[FakeOllama, str]
) -> None:
    _, url = fake_ollama
    result = coheara(
        "doctor",
        "--backend",
        "ollama",
        "--url",
        url,
        "--model",
        model_facts.VISION_OLLAMA_ALTERNATIVE,
        env=environment,
    )
    assert result.returncode == 0, result.stdout
    assert "vision yes" in result.stdout and "version 0.12.6" in result.stdout
    assert "can serve" in result.stdout


def test_doctor_without_a_backend_says_what_to_do(environment: dict[str, str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = coheara("doctor", "--backend", "ollama", "--url", url, env=environment)
    assert result.returncode == 7
    assert "cannot serve" in result.stdout and "start Ollama" in result.stdout


def test_serve_answers_the_ollama_and_openai_dialects(
    environment: dict[str, str], tiny_model_dir: Path
) -> None:
    with serve_in_process(str(tiny_model_dir), env=environment, capture=True) as (url, process):
        assert httpx.get(url + "/api/version").json()["version"]
        models = httpx.get(url + "/v1/models").json()["data"]
        assert any(m["id"] == "medgemma" for m in models)
        port = url.rsplit(":", 1)[1]
    _, err = process.communicate(timeout=30)
    assert "Traceback" not in err
    assert f"127.0.0.1:{port}" in err


def test_install_hints_keep_their_brackets(capsys: pytest.CaptureFixture[str]) -> None:
    from coheara.cli.common import report
    from coheara.errors import ConfigurationError

    report(ConfigurationError("needs extras", hint="pip install 'coheara[transformers]'"))
    assert "pip install 'coheara[transformers]'" in capsys.readouterr().err
