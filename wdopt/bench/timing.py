"""How a step is timed (host clock on the CPU, CUDA events on a GPU) and the bandwidth ceiling
measured beside it."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

if TYPE_CHECKING:
    from .report import Row

# The axpy ceiling's two fp32 tensors: 1 GiB each, several times any cache on our machines
# (the CPU VM reports a 480 MiB L3; an H100 has 50 MB of L2).
AXPY_ELEMENTS = 256 * 1024 * 1024
AXPY_BYTES_PER_ELEMENT = 12  # read a, read b, write a (fp32)

# ----------------------------------------------------------------------------- timing

def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(step: Callable, device: str, warmup: int, iters: int) -> tuple[float, list[float]]:
    """(first warm-up call, timed calls) in seconds. The first call allocates state (and compiles,
    under torch.compile), so it is reported apart and never timed. On CUDA each step is bracketed by
    events, so host launch overhead counts only where it delays the device."""
    _sync(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    _sync(device)
    times = []
    if device == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return first, times


# ----------------------------------------------------------------------------- ceiling

def axpy_ceiling_gbps(device: str, elements: int = AXPY_ELEMENTS, iters: int = 10) -> float:
    """Bandwidth of a large in-place fp32 axpy ``a += 0.1·b`` (12 B/element), the median of ``iters``
    runs: the memory speed a well-written elementwise kernel can reach on this device, right now."""
    a = torch.ones(elements, device=device)
    b = torch.full((elements,), 0.5, device=device)
    _, times = time_steps(lambda: a.add_(b, alpha=0.1), device, warmup=2, iters=iters)
    del a, b
    return AXPY_BYTES_PER_ELEMENT * elements / float(np.median(times)) / 1e9


def run_ceiling(samples: list[float]) -> float:
    """The run's ceiling: the best of its axpy measurements (taken before and after each shape set).
    Other processes can only lower a measurement, so the best one is the closest to what the device
    can do; a competitor above 100% ran in a quieter moment than every axpy measurement."""
    return max(samples)


def add_ceiling(rows: list["Row"], ceiling_gbps: float) -> None:
    for r in rows:
        r.ceiling_gbps, r.frac_ceiling = ceiling_gbps, r.gbps / ceiling_gbps
