"""Host time of one optimizer step on FSDP2 (DTensor) parameters beside plain ones.

    torchrun --nproc-per-node 2 benchmarks/dtensor_overhead.py
    torchrun --standalone --nproc-per-node 1 benchmarks/dtensor_overhead.py   # on a GPU (gpu_check.sh)

The model of examples/fsdp2_train.py (29 parameters); gradients are set once and kept, and only
``opt.step()`` is timed (300 steps, the best of 5 rounds, rank 0). On CPU the numbers include the
kernels' own time, small at this size; on a GPU (nccl, the CUDA backend) the device is synchronised
before and after the timed steps, so a step's time is its host time unless the kernels are slower. FSDP2 steps take wdopt's validation path (README,
"Distributed training"); plain ones its fast path after the first step, or the validation path
when it is turned off, as measured here too.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

import wdopt  # noqa: E402
from fsdp2_train import TinyLM  # noqa: E402


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(opt, steps=300) -> float:
    for _ in range(20):
        opt.step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    sync()
    return (time.perf_counter() - start) / steps * 1e6


def model(kind):
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    torch.manual_seed(0)
    m = TinyLM(61, 64, 4, 2, 32).to(DEVICE)
    if kind != "plain":
        kw = dict(offload_policy=CPUOffloadPolicy(pin_memory=torch.cuda.is_available())) if kind == "offload" else {}
        for block in m.blocks:
            fully_shard(block, **kw)
        fully_shard(m, **kw)
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    return m


def main():
    torch.set_num_threads(1)
    if DEVICE.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if DEVICE.type == "cuda" else "gloo")
    cases = [
        ("plain, FusedAdamW (fast path)", "plain", lambda ps: wdopt.FusedAdamW(ps)),
        ("plain, FusedAdamW (validation path)", "plain", lambda ps: wdopt.FusedAdamW(ps)),
        ("FSDP2, FusedAdamW (DTensor: validation path)", "fsdp2", lambda ps: wdopt.FusedAdamW(ps)),
        ("FSDP2 + CPUOffloadPolicy, FusedAdamW", "offload", lambda ps: wdopt.FusedAdamW(ps)),
        ("plain, torch.optim.AdamW foreach", "plain", lambda ps: torch.optim.AdamW(ps, foreach=True)),
        ("FSDP2, torch.optim.AdamW foreach", "fsdp2", lambda ps: torch.optim.AdamW(ps, foreach=True)),
        ("FSDP2, torch.optim.AdamW fused", "fsdp2", lambda ps: torch.optim.AdamW(ps, fused=True)),
    ]
    results = {}
    for name, kind, make in cases:
        opt = make(list(model(kind).parameters()))
        if "validation path)" in name and kind == "plain":
            opt._fast_kind = None  # this instance keeps the validation path
        results[name] = min(timed(opt) for _ in range(5))
        dist.barrier()
    if dist.get_rank() == 0:
        print(f"torch {torch.__version__}, {dist.get_world_size()} ranks, {dist.get_backend()}, {DEVICE}")
        for name, us in results.items():
            print(f"{us:8.1f} µs/step  {name}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
