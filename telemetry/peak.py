"""Peak matmul throughput of this process's CPU, the fallback MFU denominator."""

from __future__ import annotations

import time


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
