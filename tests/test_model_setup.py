"""`coheara model setup`: the Modelfile, the commands, the checks of the result."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli_support import run_coheara
from coheara.deploy.setup import modelfile, ollama_plan, weights_problems
from coheara.errors import InvalidRequestError, ModelNotFoundError
from fakes import FakeOllama, OllamaModel
from servers import serve


def test_the_modelfile_pins_window_stop_and_greedy_decoding(tmp_path: Path) -> None:
    text = modelfile("MedAIBase/MedGemma1.5:4b", "tag", 16384)
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines == [
        "FROM MedAIBase/MedGemma1.5:4b",
        "PARAMETER num_ctx 16384",
        'PARAMETER stop "<end_of_turn>"',
        "PARAMETER temperature 0",
    ]
    gguf = tmp_path / "medgemma.Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    assert f"FROM {gguf.resolve()}\n" in modelfile(str(gguf), "gguf", 8192)


def test_the_commands_for_each_source(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "Modelfile"
    tag = ollama_plan("mine", "MedAIBase/MedGemma1.5:4b", 8192, out, None)
    assert tag.kind == "tag" and tag.commands == [
        ["ollama", "pull", "MedAIBase/MedGemma1.5:4b"],
        ["ollama", "create", "mine", "-f", str(out)],
    ]
    folder = ollama_plan("mine", str(tiny_model_dir), 8192, out, "q4_K_M")
    assert folder.kind == "safetensors"
    assert folder.commands == [["ollama", "create", "mine", "-f", str(out), "--quantize", "q4_K_M"]]
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert ollama_plan("mine", str(gguf), 8192, out, None).commands[0][:2] == ["ollama", "create"]
    for source, quantize, message in [
        ("MedAIBase/MedGemma1.5:4b", "q4_K_M", "safetensors folder only"),
        (str(tiny_model_dir), "q2_K", "unknown quantization"),
        (str(tmp_path / "absent.gguf"), None, "does not exist"),
        (str(out.with_suffix(".txt")), None, "does not exist"),
    ]:
        with pytest.raises(InvalidRequestError, match=message):
            ollama_plan("mine", source, 8192, out, quantize)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InvalidRequestError, match="neither a GGUF file"):
        ollama_plan("mine", str(tmp_path / "notes.txt"), 8192, out, None)


@pytest.fixture
def weights(tiny_model_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "weights"
    shutil.copytree(tiny_model_dir, copy)
    return copy


def test_a_complete_folder_passes_and_each_gap_is_named(weights: Path) -> None:
    assert weights_problems(weights) == []
    (weights / "tokenizer.json").unlink()
    config = json.loads((weights / "config.json").read_text())
    config["dtype"] = "float16"
    (weights / "config.json").write_text(json.dumps(config))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors"}}
    (weights / "model.safetensors.index.json").write_text(json.dumps(index))
    problems = weights_problems(weights)
    assert any("tokenizer" in p for p in problems)
    assert any("float16" in p for p in problems)
    assert any("1 weight shard(s) missing" in p for p in problems)
    with pytest.raises(ModelNotFoundError, match="not a complete MedGemma folder"):
        ollama_plan("mine", str(weights), 8192, weights / "Modelfile", None)


# ----- the command, with a stand-in `ollama` on PATH ----------------------------------------


@pytest.fixture
def fake_ollama() -> Iterator[tuple[FakeOllama, str]]:
    server = FakeOllama()
    with serve(server.app) as url:
        yield server, url


def stand_in_ollama(folder: Path, exit_code: int = 0) -> Path:
    """An `ollama` command that records its arguments and exits with `exit_code`."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "ollama"
    log = folder / "calls.txt"
    script.write_text(
        f"#!{sys.executable}\nimport sys\n"
        f"open({str(log)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
        f"sys.exit({exit_code})\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return log


def coheara(
    tmp_path: Path, url: str, path: str, *args: str, **extra: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_")}
    env.update({"PATH": path, "COHEARA_OLLAMA_URL": url, **extra})
    return run_coheara("model", "setup", *args, env=env, cwd=tmp_path)


def test_it_runs_ollama_and_checks_for_vision(
    fake_ollama: tuple[FakeOllama, str], tmp_path: Path
) -> None:
    server, url = fake_ollama
    bin_dir = tmp_path / "bin"
    log = stand_in_ollama(bin_dir)
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    server.models["clinic-medgemma"] = OllamaModel(capabilities=["completion", "vision"])
    done = coheara(tmp_path, url, path, "--name", "clinic-medgemma", "--from", "some/tag:4b")
    assert done.returncode == 0, done.stderr
    assert log.read_text().splitlines() == [
        "pull some/tag:4b",
        f"create clinic-medgemma -f {Path('Modelfile')}",
    ]
    assert "FROM some/tag:4b" in (tmp_path / "Modelfile").read_text()
    assert "clinic-medgemma is ready (vision yes" in done.stderr

    server.models["clinic-medgemma"] = OllamaModel(capabilities=["completion"])
    blind = coheara(tmp_path, url, path, "--name", "clinic-medgemma", "--from", "some/tag:4b")
    assert blind.returncode == 4 and "without vision" in blind.stderr
    text = coheara(tmp_path, url, path, "--name", "clinic-medgemma", "--from", "x/y", "--text-only")
    assert text.returncode == 0, text.stderr

    failing = tmp_path / "failing"
    stand_in_ollama(failing, exit_code=1)
    broken = coheara(tmp_path, url, f"{failing}{os.pathsep}{os.environ['PATH']}", "--from", "x/y")
    assert broken.returncode == 9 and "failed with exit code 1" in broken.stderr


def test_without_ollama_it_prints_the_commands(
    fake_ollama: tuple[FakeOllama, str], tmp_path: Path
) -> None:
    _, url = fake_ollama
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    done = coheara(tmp_path, url, str(empty), "--from", "x/y", "--num-ctx-is-not-an-option")
    assert done.returncode == 2  # unknown options are usage errors
    done = coheara(tmp_path, url, str(empty), "--from", "x/y")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "ollama pull x/y",
        "ollama create coheara-medgemma -f Modelfile",
    ]
    assert "not on PATH" in done.stderr


def test_transformers_folder_and_hub_cache(
    tiny_model_dir: Path, tmp_path: Path, fake_ollama: tuple[FakeOllama, str]
) -> None:
    _, url = fake_ollama
    path = os.environ["PATH"]
    ok = coheara(tmp_path, url, path, "--runtime", "transformers", "--from", str(tiny_model_dir))
    assert ok.returncode == 0 and "complete MedGemma checkpoint" in ok.stderr
    hub = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    missing = coheara(
        tmp_path, url, path, "--runtime", "transformers", "--from", "google/x-4b-it", **hub
    )
    assert missing.returncode == 6 and "--download" in missing.stderr
