"""MFU's denominator: the device's datasheet peak, or this process's measured CPU matmul.

MFU is model FLOPs per second over the device's datasheet peak (PaLM, Chowdhery et al. 2022,
appendix B): a measured matmul is not the denominator where a datasheet figure exists, since it
already loses part of what MFU is meant to show. Dense (no sparsity) figures, per torch device:
an MI250X shows each of its two dies (GCDs) as one device, so it is half the package's figure.
float32 is the vector-unit peak (PyTorch does not use TF32 for float32 matmuls unless asked).
The measured matmul is the fallback for devices not in the table (CPU ranks).
"""

from __future__ import annotations

import time
from typing import Optional

# (substring of torch.cuda.get_device_name, bf16 TFLOPS, fp32 TFLOPS); the first match wins,
# so the more specific names come first
DATASHEET_TFLOPS = (
    ("H100 PCIe", 756.0, 51.2),
    ("H100 NVL", 835.0, 60.0),
    ("GH200", 989.4, 66.9),
    ("H200", 989.4, 66.9),
    ("H100", 989.4, 66.9),
    ("B200", 2250.0, 80.0),
    ("A100", 312.0, 19.5),
    ("MI300X", 1307.4, 163.4),
    ("MI300A", 980.6, 122.6),
    ("MI250X", 191.5, 23.95),
    ("MI250", 181.0, 22.6),
)


def datasheet_peak_tflops(device_name: str, dtype: str) -> Optional[float]:
    """The datasheet's dense peak for `dtype` (bfloat16 or float32) on a device of that name;
    None when the name is not in the table (the trainer then measures a matmul, and says so)."""
    for needle, bf16, fp32 in DATASHEET_TFLOPS:
        if needle.lower() in device_name.lower():
            return bf16 if dtype == "bfloat16" else fp32
    return None


def measure_matmul_tflops(size: int = 1024, repeats: int = 5) -> float:
    """Best-of-`repeats` float32 `size x size` matmul rate on the CPU, in TFLOP/s.

    A matmul of two n x n matrices costs 2 n^3 FLOPs (n^2 dot products of length n, one
    multiply and one add each). The best run is the peak: slower ones measured noise.
    A recipe on a GPU should measure there (it owns torch) and pass the result as
    Telemetry(peak_tflops=...), or the user sets telemetry.peak_tflops.
    """
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    a @ b  # warm-up: thread pool start, page faults
    best_s = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best_s = min(best_s, time.perf_counter() - start)
    return 2 * size**3 / best_s / 1e12
