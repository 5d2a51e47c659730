"""What this machine has: CPU, memory, NVIDIA GPUs (through NVML) or Apple Silicon's unified
memory, and which row of the founding spec's hardware table that makes it."""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from coheara.deploy.plan import GIB, GPU_RESERVED_GIB

SPEC_GPU_LARGE_GB = 16
SPEC_GPU_SMALL_GB = 8
SPEC_CPU_RAM_GB = 16


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int
    bfloat16: bool | None = None
    """Native bfloat16 (compute capability 8.0 or later); None when unknown."""


@dataclass(frozen=True)
class Hardware:
    cpu: str
    cores: int
    ram_bytes: int
    gpus: list[Gpu] = field(default_factory=list)
    apple_silicon: bool = False
    gpu_problem: str | None = None
    """Why NVIDIA GPUs could not be listed (no driver is not a problem: none is there)."""

    @property
    def spec_row(self) -> str:
        """The founding spec's hardware row this machine falls in."""
        largest = max((g.memory_bytes for g in self.gpus), default=0)
        if largest >= SPEC_GPU_LARGE_GB * 10**9 * 0.9:  # cards sold as 16 GB hold ~15.9
            return "GPU 16 GB+"
        if largest >= SPEC_GPU_SMALL_GB * 10**9 * 0.9:
            return "GPU 8 GB"
        if self.apple_silicon:
            return "Apple Silicon"
        if self.ram_bytes >= SPEC_CPU_RAM_GB * GIB * 0.9:
            return "CPU only, 16 GB RAM"
        return "below the spec's smallest row (CPU only, 16 GB RAM)"

    def model_memory_bytes(self) -> tuple[str, int]:
        """Where the model would live and how much of it it may use: the largest GPU (less
        the runtime's reserve), Apple's GPU share of unified memory, or RAM less 4 GiB."""
        if self.gpus:
            gpu = max(self.gpus, key=lambda g: g.memory_bytes)
            return gpu.name, gpu.memory_bytes - int(GPU_RESERVED_GIB * GIB)
        if self.apple_silicon:
            share = 0.75 if self.ram_bytes >= 64 * GIB else 2 / 3
            return "unified memory (GPU share)", int(self.ram_bytes * share)
        return "RAM", max(0, self.ram_bytes - 4 * GIB)


def _ram_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def nvidia_gpus() -> tuple[list[Gpu], str | None]:
    """The NVIDIA GPUs NVML reports; ([], None) on a machine without the driver."""
    try:
        import pynvml
    except ImportError:
        return [], "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        return [], None
    except pynvml.NVMLError as exc:
        return [], f"NVML failed: {exc}"
    try:
        found = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total
            try:
                major, _ = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
                bfloat16: bool | None = major >= 8
            except pynvml.NVMLError:
                bfloat16 = None
            found.append(Gpu(name if isinstance(name, str) else name.decode(), memory, bfloat16))
        return found, None
    except pynvml.NVMLError as exc:
        return [], f"NVML failed: {exc}"
    finally:
        pynvml.nvmlShutdown()


def detect() -> Hardware:
    gpus, problem = nvidia_gpus()
    apple = platform.system() == "Darwin" and platform.machine() == "arm64"
    return Hardware(
        cpu=_cpu_name(),
        cores=os.cpu_count() or 1,
        ram_bytes=_ram_bytes(),
        gpus=gpus,
        apple_silicon=apple,
        gpu_problem=problem,
    )


def free_disk_bytes(path: Path) -> int | None:
    """Free space on the file system holding `path` (its nearest existing parent)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None
