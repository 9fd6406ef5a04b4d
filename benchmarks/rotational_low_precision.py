"""RotationalAdamW step time on the C++ CPU backend, eight (1024, 1024) weights: bf16 storage options
and 8-bit states against fp32 storage, measured in the same run (median of 15 steps after 3 warm-up steps).

Usage: python benchmarks/rotational_low_precision.py
"""

from __future__ import annotations

import statistics
import time

import torch

import wdopt

SHAPES = [(1024, 1024)] * 8
ARMS = [
    ("bf16 nearest", torch.bfloat16, {}),
    ("bf16 stochastic", torch.bfloat16, dict(stochastic_rounding=True)),
    ("bf16 master32", torch.bfloat16, dict(master_weight_bits=32)),
    ("bf16 master24+stochastic", torch.bfloat16, dict(master_weight_bits=24, stochastic_rounding=True)),
    ("fp32 + 8-bit states", torch.float32, dict(state_bits=8)),
    ("bf16 master24+stochastic + 8-bit states", torch.bfloat16,
     dict(master_weight_bits=24, stochastic_rounding=True, state_bits=8)),
]


def median_step(dtype, **options) -> float:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in SHAPES]
    opt = wdopt.RotationalAdamW(params, lr=1e-3, weight_decay=0.1, backend="cpu", **options)
    for p in params:
        p.grad = torch.randn(p.shape).to(dtype)
    for _ in range(3):
        opt.step()
    times = []
    for _ in range(15):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    base = median_step(torch.float32)
    print(f"fp32 {base * 1e3:.2f} ms")
    for name, dtype, options in ARMS:
        t = median_step(dtype, **options)
        print(f"{name} {t * 1e3:.2f} ms  {t / base:.2f}x fp32")


if __name__ == "__main__":
    main()
