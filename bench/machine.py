"""The machine's own measured FLOP rate, the denominator of every efficiency figure in bench/."""

from __future__ import annotations

import time

import torch


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    """fp32 matmul GFLOP/s on this machine with torch's current thread count (2 FLOP per multiply-add)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9
