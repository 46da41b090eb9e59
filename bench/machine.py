"""Describe the machine a benchmark ran on and measure its practical FLOP/s anchor.

Every ratio in BENCHMARKS.md is relative to a number measured in the same run, because this kind
of machine is shared and noisy (±30 % run to run).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class MachineInfo:
    """What the numbers were measured on."""

    cpu_model: str
    cores: int
    python: str
    torch: str
    numpy: str
    torch_threads: int
    gpu: str
    matmul_gflops: float

    def line(self) -> str:
        """One human-readable line for reports."""
        return (
            f"{self.cpu_model}, {self.cores} cores, GPU: {self.gpu}; torch {self.torch} "
            f"({self.torch_threads} threads), numpy {self.numpy}, Python {self.python}; "
            f"torch.matmul 4096² = {self.matmul_gflops:.1f} GFLOP/s (median)"
        )

    def as_dict(self) -> dict:
        return asdict(self)


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def gpu_name() -> str:
    """The CUDA device name, or "none"."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - a broken CUDA install just means no GPU here
        return "none"
    return "none"


def matmul_gflops(n: int = 4096, repeats: int = 5, device: str = "cpu") -> float:
    """Median FLOP/s of an n×n float32 matmul (2·n³ FLOP each), the practical CPU limit."""
    import torch

    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.matmul(a, b)  # warm-up (thread pool, allocator)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.matmul(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def describe(measure: bool = True) -> MachineInfo:
    """Collect the machine description; ``measure`` runs the matmul anchor (~5 s on 2 cores)."""
    import numpy
    import torch

    return MachineInfo(
        cpu_model=cpu_model(),
        cores=os.cpu_count() or 1,
        python=platform.python_version(),
        torch=torch.__version__,
        numpy=numpy.__version__,
        torch_threads=torch.get_num_threads(),
        gpu=gpu_name(),
        matmul_gflops=matmul_gflops() if measure else float("nan"),
    )


if __name__ == "__main__":
    print(describe().line())
