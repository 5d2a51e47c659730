"""`coheara doctor`'s checks: the hardware, each runtime, the model, memory, dtype, disk.

Every check is a `Finding` with what to do about it; the report says whether the
configured backend can serve. The checks only read: nothing is pulled, downloaded or
changed.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from coheara import model_facts
from coheara.backends.base import Backend, Capabilities
from coheara.deploy.hardware import Hardware, free_disk_bytes
from coheara.deploy.plan import GIB, PlanInput, Variant, for_runtime, largest_context, plan
from coheara.errors import CohearaError
from coheara.settings import Settings

OLLAMA_GEMMA3_VERSION = (0, 6, 0)
"""The first Ollama release that runs Gemma 3 (and so MedGemma)."""
QUANTIZATIONS: dict[str, Variant] = {"Q4_K_M": "q4_K_M", "Q8_0": "q8_0", "BF16": "bf16"}


@dataclass
class Finding:
    check: str
    ok: bool
    detail: str
    fix: str = ""
    warning: bool = False
    """Works, with a caveat worth acting on."""


@dataclass
class Report:
    backend: str
    hardware: Hardware
    findings: list[Finding] = field(default_factory=list)
    can_serve: bool = False

    def to_dict(self) -> dict[str, Any]:
        hardware = asdict(self.hardware)
        hardware["spec_row"] = self.hardware.spec_row
        return {
            "backend": self.backend,
            "can_serve": self.can_serve,
            "hardware": hardware,
            "findings": [asdict(f) for f in self.findings],
        }


def version_tuple(text: str | None) -> tuple[int, ...] | None:
    try:
        return tuple(int(part) for part in (text or "").split("-")[0].split(".")[:3])
    except ValueError:
        return None


def hardware_findings(hardware: Hardware) -> list[Finding]:
    gpus = (
        ", ".join(f"{g.name} {g.memory_bytes / GIB:.1f} GiB" for g in hardware.gpus)
        or "no NVIDIA GPU"
    )
    row = hardware.spec_row
    findings = [
        Finding(
            "hardware",
            not row.startswith("below"),
            f"{hardware.cpu}, {hardware.cores} cores, {hardware.ram_bytes / GIB:.1f} GiB RAM, "
            f"{gpus}{', Apple Silicon' if hardware.apple_silicon else ''}; spec row: {row}",
            "" if not row.startswith("below") else "16 GB of RAM or an 8 GB GPU at least",
        )
    ]
    if hardware.gpu_problem:
        findings.append(
            Finding("NVIDIA GPUs", False, hardware.gpu_problem, "check the driver (nvidia-smi)")
        )
    for gpu in hardware.gpus:
        if gpu.bfloat16 is False:
            findings.append(
                Finding(
                    f"dtype on {gpu.name}",
                    True,
                    "no native bfloat16 (compute capability under 8.0); float16 gives empty "
                    "or NaN output on Gemma 3",
                    "keep bfloat16 (emulated, slower) or float32 (twice the memory); never float16",
                    warning=True,
                )
            )
    return findings


def memory_finding(hardware: Hardware, request: PlanInput, what: str, smaller: str) -> Finding:
    """Whether weights, cache and working memory fit where the model would live."""
    where, usable = hardware.model_memory_bytes()
    need = plan(request).total
    detail = (
        f"{what}: {need / GIB:.1f} GiB needed for a {request.context}-token window "
        f"({request.variant}), {usable / GIB:.1f} GiB usable in {where}"
    )
    if need <= usable:
        return Finding("memory", True, detail)
    window = largest_context(request, usable)
    fix = (
        f"up to {window} tokens fit (COHEARA_NUM_CTX); or {smaller}"
        if window
        else f"{smaller}, or a larger GPU"
    )
    return Finding("memory", False, detail, fix)


async def runtime_findings(
    name: str, backend: Backend, settings: Settings, hardware: Hardware, *, ollama: bool
) -> list[Finding]:
    health = await backend.health()
    findings = [
        Finding(
            f"{name} server",
            health.ok,
            health.detail + (f" (version {health.version})" if health.version else ""),
            "" if health.ok else f"start {name} or point --url / the settings at it",
        )
    ]
    if not health.ok:
        await backend.aclose()
        return findings
    if ollama:
        version = version_tuple(health.version)
        if version is not None and version < OLLAMA_GEMMA3_VERSION:
            findings.append(
                Finding(
                    f"{name} version",
                    False,
                    f"Ollama {health.version} predates Gemma 3 support (0.6.0)",
                    "upgrade Ollama (https://ollama.com/download)",
                )
            )
    try:
        caps = await backend.capabilities()
    except CohearaError as exc:
        findings.append(
            Finding(f"{name} model {backend.model}", False, exc.message, exc.hint or "")
        )
        await backend.aclose()
        return findings
    findings.extend(_model_findings(name, backend, caps, settings, hardware, ollama=ollama))
    await backend.aclose()
    return findings


def _model_findings(
    name: str,
    backend: Backend,
    caps: Capabilities,
    settings: Settings,
    hardware: Hardware,
    *,
    ollama: bool,
) -> list[Finding]:
    details = caps.details
    quantization = str(details.get("quantization_level") or "")
    size = details.get("parameter_size")
    described = ", ".join(
        part
        for part in (
            f"quantization {quantization}" if quantization else "",
            f"{size} parameters" if size else "",
            f"vision {'yes' if caps.vision else 'no'}",
            f"trained context {caps.context_length}",
        )
        if part
    )
    findings = [
        Finding(
            f"{name} model {backend.model}",
            True,
            "present; " + described,
            "" if caps.vision else str(details.get("vision_hint", "")),
            warning=not caps.vision,
        )
    ]
    if ollama:
        if settings.num_ctx > caps.context_length:
            findings.append(
                Finding(
                    "num_ctx",
                    False,
                    f"{settings.num_ctx} is above the model's trained context "
                    f"{caps.context_length}",
                    f"set COHEARA_NUM_CTX to {caps.context_length} or less",
                )
            )
        if quantization.upper() in ("F16", "FP16"):
            findings.append(
                Finding(
                    "dtype",
                    True,
                    "float16 weights: Gemma 3 gives empty or NaN output in float16",
                    "use a bf16, q8_0 or q4_K_M build",
                    warning=True,
                )
            )
        variant = QUANTIZATIONS.get(quantization.upper())
        request = PlanInput(
            variant=variant or "q4_K_M",
            context=min(settings.num_ctx, model_facts.CONTEXT_LENGTH),
            vision=caps.vision,
        )
        what = f"Ollama window {settings.num_ctx}"
        findings.append(memory_finding(hardware, request, what, "a smaller build (q4_K_M)"))
    return findings


def transformers_findings(settings: Settings, hardware: Hardware) -> list[Finding]:
    missing = [m for m in ("torch", "transformers", "xgrammar") if not importlib.util.find_spec(m)]
    if missing:
        return [
            Finding(
                "transformers backend",
                False,
                f"not installed ({', '.join(missing)} missing)",
                "pip install 'coheara[transformers]' (pin torch for your platform)",
            )
        ]
    import torch

    cuda = torch.cuda.is_available()
    device = "CUDA " + torch.cuda.get_device_name(0) if cuda else "CPU only"
    findings = [Finding("transformers backend", True, f"torch {torch.__version__}, {device}")]
    path = settings.transformers_model
    weights_gb = model_facts.WEIGHTS_GB["bf16"]
    if not path:
        findings.append(
            Finding(
                "local weights",
                False,
                "none configured",
                "set COHEARA_TRANSFORMERS_MODEL to a MedGemma folder",
            )
        )
    elif Path(path).is_dir():
        findings.append(Finding("local weights", True, f"folder {path}"))
    else:
        free = free_disk_bytes(Path(path).expanduser())
        room = f"; {free / 10**9:.1f} GB free there" if free is not None else ""
        short = free is not None and free < weights_gb * 10**9
        findings.append(
            Finding(
                "local weights",
                False,
                f"{path} is not a folder{room}",
                "download the weights once on a connected machine and copy the folder"
                + (f" (needs {weights_gb} GB: free some space first)" if short else ""),
            )
        )
    if not path:
        return findings
    # Float32 on a CPU (the `auto` dtype there) doubles the weights.
    float32 = settings.transformers_dtype == "float32" or (
        settings.transformers_dtype == "auto" and not cuda
    )
    request = for_runtime(  # as measured: whole-prompt prefill, dense sliding-window mask
        "transformers",
        variant="custom",
        weights_gb=weights_gb * (2 if float32 else 1),
        context=min(settings.num_ctx, model_facts.CONTEXT_LENGTH),
        kv_type="f32" if float32 else "bf16",
    )
    what = f"Transformers {'float32' if float32 else 'bfloat16'}"
    smaller = "bfloat16 (COHEARA_TRANSFORMERS_DTYPE=bfloat16)" if float32 else "a GPU"
    findings.append(memory_finding(hardware, request, what, smaller))
    return findings


def can_serve(backend: str, findings: list[Finding]) -> bool:
    prefix = {"ollama": "Ollama", "openai": "OpenAI-compatible"}
    if backend == "auto":
        return any(f.ok and " model " in f.check for f in findings) or any(
            f.ok and f.check == "local weights" for f in findings
        )
    if backend == "transformers":
        names = ("transformers backend", "local weights")
        return all(f.ok for f in findings if f.check in names)
    return all(f.ok for f in findings if f.check.startswith(prefix[backend]))
