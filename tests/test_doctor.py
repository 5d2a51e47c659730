"""`coheara doctor` against loopback Ollama servers that differ in version, model and
capabilities, on hardware described to it (the real machine's is only reported)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import pytest

from cli_support import run_coheara
from coheara import Settings, model_facts
from coheara.backends.ollama import OllamaBackend
from coheara.deploy.doctor import (
    Finding,
    can_serve,
    hardware_findings,
    memory_finding,
    runtime_findings,
    version_tuple,
)
from coheara.deploy.hardware import Gpu, Hardware
from coheara.deploy.plan import GIB, PlanInput
from fakes import FakeOllama, OllamaModel
from servers import serve

MODEL = model_facts.DEFAULT_OLLAMA_MODEL
COMMAND = ["doctor", "--backend", "ollama"]
BIG_GPU = Hardware("test CPU", 8, 64 * GIB, [Gpu("NVIDIA L4", 23_034_069_504, True)])


@pytest.mark.parametrize(
    ("hardware", "row"),
    [
        (BIG_GPU, "GPU 16 GB+"),
        (Hardware("c", 4, 32 * GIB, [Gpu("T4", 15_843_721_216, False)]), "GPU 16 GB+"),
        (Hardware("c", 4, 32 * GIB, [Gpu("RTX 4060", 8_585_740_288, True)]), "GPU 8 GB"),
        (Hardware("M2", 8, 16 * GIB, apple_silicon=True), "Apple Silicon"),
        (Hardware("c", 8, 16 * GIB), "CPU only, 16 GB RAM"),
        (Hardware("c", 2, 8 * GIB), "below the spec's smallest row (CPU only, 16 GB RAM)"),
    ],
)
def test_the_spec_row(hardware: Hardware, row: str) -> None:
    assert hardware.spec_row == row
    finding = hardware_findings(hardware)[0]
    assert finding.ok == (not row.startswith("below")) and row in finding.detail


def test_where_the_model_lives_and_the_float16_warning() -> None:
    assert BIG_GPU.model_memory_bytes() == ("NVIDIA L4", 23_034_069_504 - GIB // 2)
    apple = Hardware("M2", 8, 24 * GIB, apple_silicon=True)
    assert apple.model_memory_bytes()[1] == 16 * GIB  # two thirds below 64 GB
    assert Hardware("c", 2, 20 * GIB).model_memory_bytes() == ("RAM", 16 * GIB)
    t4 = Hardware("c", 4, 32 * GIB, [Gpu("T4", 15_843_721_216, False)])
    warned = [f for f in hardware_findings(t4) if f.warning]
    assert len(warned) == 1 and "never float16" in warned[0].fix


def test_memory_names_the_window_that_fits() -> None:
    small = Hardware("c", 4, 32 * GIB, [Gpu("small", 6 * 10**9, True)])
    eight = Hardware("c", 4, 32 * GIB, [Gpu("eight", 8 * 10**9, True)])
    request = PlanInput(variant="q8_0", context=131072, sliding_window_cache=False)
    finding = memory_finding(eight, request, "x", "q4")
    assert not finding.ok and "tokens fit" in finding.fix
    fits = memory_finding(BIG_GPU, PlanInput(variant="q8_0", context=8192), "x", "q4")
    assert fits.ok and "8192-token window" in fits.detail
    hopeless = memory_finding(small, PlanInput(variant="custom", weights_gb=9.0), "x", "q4")
    assert not hopeless.ok and hopeless.fix == "q4, or a larger GPU"


def test_version_parsing() -> None:
    assert version_tuple("0.12.6") == (0, 12, 6) and version_tuple("0.5.13-rc1") == (0, 5, 13)
    assert version_tuple("dev") is None and version_tuple(None) is None


@pytest.fixture
def fake() -> Iterator[tuple[FakeOllama, str]]:
    server = FakeOllama({MODEL: OllamaModel(capabilities=["completion", "vision"])})
    with serve(server.app) as url:
        yield server, url


async def check(url: str, settings: Settings, hardware: Hardware = BIG_GPU) -> list[Finding]:
    backend = OllamaBackend(
        url=url,
        model=MODEL,
        num_ctx=settings.num_ctx,
        timeout_s=10,
        connect_timeout_s=3,
        keep_alive=None,
    )
    return await runtime_findings("Ollama", backend, settings, hardware, ollama=True)


def by_check(findings: list[Finding]) -> dict[str, Finding]:
    return {f.check: f for f in findings}


async def test_a_good_server_can_serve(fake: tuple[FakeOllama, str]) -> None:
    _, url = fake
    findings = by_check(await check(url, Settings(num_ctx=8192)))
    model = findings[f"Ollama model {MODEL}"]
    assert model.ok and not model.warning
    assert "quantization Q4_K_M" in model.detail and "3.9B parameters" in model.detail
    assert findings["memory"].ok and can_serve("ollama", list(findings.values()))


async def test_an_old_ollama_cannot(fake: tuple[FakeOllama, str]) -> None:
    server, url = fake
    server.version = "0.5.4"
    findings = await check(url, Settings())
    old = by_check(findings)["Ollama version"]
    assert not old.ok and "predates Gemma 3" in old.detail and "upgrade" in old.fix
    assert not can_serve("ollama", findings)


async def test_a_text_only_model_serves_text_with_a_warning(
    fake: tuple[FakeOllama, str],
) -> None:
    server, url = fake
    server.models[MODEL] = OllamaModel(capabilities=["completion"])
    findings = await check(url, Settings())
    model = by_check(findings)[f"Ollama model {MODEL}"]
    assert model.ok and model.warning and "vision no" in model.detail
    assert model_facts.VISION_OLLAMA_ALTERNATIVE in model.fix
    assert can_serve("ollama", findings)


async def test_a_missing_model_cannot(fake: tuple[FakeOllama, str]) -> None:
    server, url = fake
    server.models.clear()
    findings = await check(url, Settings())
    model = by_check(findings)[f"Ollama model {MODEL}"]
    assert not model.ok and f"ollama pull {MODEL}" in model.fix
    assert not can_serve("ollama", findings)


async def test_window_dtype_and_memory_problems(fake: tuple[FakeOllama, str]) -> None:
    server, url = fake
    server.models[MODEL] = OllamaModel(
        capabilities=["completion", "vision"], context_length=32768, quantization="F16"
    )
    tiny_gpu = Hardware("c", 4, 32 * GIB, [Gpu("small", 6 * 10**9, True)])
    findings = by_check(await check(url, Settings(num_ctx=65536), tiny_gpu))
    assert not findings["num_ctx"].ok and "32768" in findings["num_ctx"].fix
    assert findings["dtype"].warning and "float16" in findings["dtype"].detail
    assert not findings["memory"].ok


def test_the_command_prints_json_and_exits_by_whether_it_can_serve(
    fake: tuple[FakeOllama, str],
) -> None:
    server, url = fake
    env = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_")}

    def doctor() -> subprocess.CompletedProcess[str]:
        return run_coheara(*COMMAND, "--url", url, "--json", env=env)

    good = doctor()
    assert good.returncode == 0, good.stderr
    report = json.loads(good.stdout)
    assert report["can_serve"] is True and report["backend"] == "ollama"
    assert report["hardware"]["spec_row"] and report["hardware"]["ram_bytes"] > 0
    assert any(f["check"] == f"Ollama model {MODEL}" and f["ok"] for f in report["findings"])
    server.models.clear()
    missing = doctor()
    assert missing.returncode == 7
    assert json.loads(missing.stdout)["can_serve"] is False
