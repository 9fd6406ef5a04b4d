"""Low-precision AdamW: resident bytes per parameter and step time of each configuration against
torch's fused fp32 AdamW, in the same run.

    python benchmarks/low_precision.py [--iters 10] [--device cpu|cuda] [--shapes gpt2|cache|all] [--threads N]

Arms: torch.optim.AdamW(fused=True) in fp32 (the baseline); wdopt FusedAdamW in fp32; bf16
parameters, gradients and states rounded to nearest; the same with stochastic rounding; with
compensated parameters (``master_weight_bits`` 32 and 24); and, where installed (``pip install
wdopt[bench]``), the like-for-like competitors: torchao's AdamW with ``bf16_stochastic_round=True``
(of stochastic rounding) and optimi's AdamW with ``kahan_sum=True`` (of compensation). A
competitor that cannot run here is listed with the reason. 8-bit states (``state_bits=8``) beside
torchao's and bitsandbytes' AdamW8bit (fp32 parameters, like for like), and on a GPU FlashOptim's
FlashAdamW where it is installed (bf16 with a 24-bit master and quantized states).

Shape sets: GPT-2 small (124M parameters, 148 tensors: memory-bound) and a cache-resident set
(16 × 16,384 elements, 1 MiB of fp32 parameters: the compute floor, where bytes do not matter).
The arms step in turn within each iteration (interleaved), so a machine's drifting speed falls on
all of them alike; the table gives each arm's median and its ratio to the baseline's median, and
on the CPU the median in nanoseconds per parameter per thread (``--threads 1`` on the cache-resident
set: the cost of one element's arithmetic on one core, which no memory system can lower).

Resident bytes per parameter are measured from the tensors (parameter + every state tensor,
including stochastic rounding's 24-byte [key, count, index base] per tensor; gradients counted separately).
Bytes moved per step are the model's (docs/performance.md): every resident byte read and written
once, and the gradient read once (fp32 AdamW: 2·12 + 4 = 28).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import wdopt  # noqa: E402
from wdopt import backends  # noqa: E402
from wdopt.bench.shapes import HYPER, gpt2_small_shapes  # noqa: E402
from wdopt.env import cpu_model  # noqa: E402

SHAPES = {"gpt2": gpt2_small_shapes, "cache": lambda: [(16384,)] * 16}


def _params(shapes, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device=device, dtype=dtype)) for s in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(device=device, dtype=dtype)
    return params


def _torchao_adamw():
    """torchao's AdamW with bf16 stochastic rounding, or the reason it cannot run."""
    try:
        from torchao.optim import _AdamW
    except Exception as error:  # noqa: BLE001 - any import failure is a reason to report
        return None, f"torchao is not importable ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
    return _AdamW, None


def _torchao_adamw8bit():
    """torchao's AdamW8bit (blockwise 8-bit states), or the reason it cannot run."""
    try:
        from torchao.optim import AdamW8bit
    except Exception as error:  # noqa: BLE001
        return None, f"torchao is not importable ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
    return AdamW8bit, None


def _bitsandbytes_adamw8bit():
    """bitsandbytes' AdamW8bit, or the reason it cannot run."""
    try:
        from bitsandbytes.optim import AdamW8bit
    except Exception as error:  # noqa: BLE001
        return None, f"bitsandbytes is not importable ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
    return AdamW8bit, None


def _optimi_adamw():
    """optimi's AdamW (Kahan-compensated bf16 parameters), or the reason it cannot run."""
    try:
        from optimi import AdamW
    except Exception as error:  # noqa: BLE001
        return None, f"torch-optimi is not importable ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
    return AdamW, None


def _flashoptim_adamw(device):
    """FlashOptim's FlashAdamW (bf16 parameters with a 24-bit master and quantized states, Triton
    kernels on CUDA only), or the reason it cannot run. Never installed by wdopt: measured where
    the GPU machine has it."""
    if device != "cuda":
        return None, "FlashOptim runs on CUDA only"
    try:
        from flashoptim import FlashAdamW
    except Exception as error:  # noqa: BLE001
        return None, f"flashoptim is not importable ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
    return FlashAdamW, None


def arms(device):
    """name -> (dtype, make(params) -> optimizer) or name -> reason (cannot run)."""
    hyper = HYPER["adamw"]
    out = {
        "torch fused fp32": (torch.float32, lambda ps: torch.optim.AdamW(ps, fused=True, **hyper)),
        "wdopt fp32": (torch.float32, lambda ps: wdopt.FusedAdamW(ps, **hyper)),
        "wdopt bf16 nearest": (torch.bfloat16, lambda ps: wdopt.FusedAdamW(ps, **hyper)),
        "wdopt bf16 stochastic": (torch.bfloat16, lambda ps: wdopt.FusedAdamW(ps, stochastic_rounding=True, **hyper)),
        "wdopt bf16 + 32-bit master": (torch.bfloat16, lambda ps: wdopt.FusedAdamW(ps, master_weight_bits=32, **hyper)),
        "wdopt bf16 + 24-bit master": (torch.bfloat16, lambda ps: wdopt.FusedAdamW(ps, master_weight_bits=24, **hyper)),
    }
    # 8-bit states: kernels in every backend (the default one here; on a GPU Triton's too).
    out["wdopt fp32 + 8-bit states"] = (torch.float32, lambda ps: wdopt.FusedAdamW(ps, state_bits=8, **hyper))
    out["wdopt bf16 + 24-bit master + 8-bit states"] = (torch.bfloat16, lambda ps: wdopt.FusedAdamW(
        ps, master_weight_bits=24, state_bits=8, stochastic_rounding=True, **hyper))
    # Issue 11's configuration by its letter (it names no rounding): to nearest, which costs the
    # three random words an element of the stochastic arm above.
    out["wdopt bf16 + 24-bit master + 8-bit states, to nearest"] = (torch.bfloat16, lambda ps: wdopt.FusedAdamW(
        ps, master_weight_bits=24, state_bits=8, **hyper))
    out["wdopt bf16 + 32-bit master + 8-bit states"] = (torch.bfloat16, lambda ps: wdopt.FusedAdamW(
        ps, master_weight_bits=32, state_bits=8, **hyper))
    if device == "cuda":
        out["wdopt bf16 + 24-bit master + 8-bit states (triton)"] = (torch.bfloat16, lambda ps: wdopt.FusedAdamW(
            ps, master_weight_bits=24, state_bits=8, stochastic_rounding=True, backend="triton", **hyper))
    ao, why = _torchao_adamw()
    out["torchao bf16 stochastic"] = why if ao is None else \
        (torch.bfloat16, lambda ps: ao(ps, bf16_stochastic_round=True, **hyper))
    ao8, why = _torchao_adamw8bit()
    out["torchao AdamW8bit fp32"] = why if ao8 is None else (torch.float32, lambda ps: ao8(ps, **hyper))
    bnb8, why = _bitsandbytes_adamw8bit()
    out["bitsandbytes AdamW8bit fp32"] = why if bnb8 is None else (torch.float32, lambda ps: bnb8(ps, **hyper))
    optimi, why = _optimi_adamw()
    # optimi's weight decay is decoupled and scaled by lr (decouple_lr=False): torch's AdamW's.
    out["optimi bf16 Kahan"] = why if optimi is None else \
        (torch.bfloat16, lambda ps: optimi(ps, lr=hyper["lr"], betas=hyper["betas"], eps=hyper["eps"],
                                           weight_decay=hyper["weight_decay"], kahan_sum=True, foreach=True))
    flash, why = _flashoptim_adamw(device)
    out["FlashOptim FlashAdamW bf16 (24-bit master)"] = why if flash is None else \
        (torch.bfloat16, lambda ps: flash(ps, lr=hyper["lr"], betas=hyper["betas"], eps=hyper["eps"],
                                          weight_decay=hyper["weight_decay"]))
    return out


def resident_bytes(opt, params) -> float:
    """Bytes per parameter element held by the parameters and the optimizer's state tensors."""
    total = sum(p.numel() * p.element_size() for p in params)
    for p in params:
        for value in opt.state.get(p, {}).values():
            if hasattr(value, "__tensor_flatten__"):  # torchao's tensor subclasses: their inner tensors
                names, _ = value.__tensor_flatten__()
                total += sum(getattr(value, n).numel() * getattr(value, n).element_size() for n in names)
            elif isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total / sum(p.numel() for p in params)


def bench(shape_set: str, device: str, iters: int) -> list[dict]:
    shapes = SHAPES[shape_set]()
    ready, rows = {}, []
    for name, spec in arms(device).items():
        if isinstance(spec, str):
            rows.append({"arm": name, "skipped": spec})
            continue
        dtype, make, timed = spec if len(spec) == 3 else (*spec, True)
        params = _params(shapes, dtype, device)
        try:
            opt = make(params)
            for _ in range(3 if timed else 1):  # state made, kernels built or compiled
                opt.step()
        except Exception as error:  # noqa: BLE001 - a competitor failing here is reported, not fatal
            rows.append({"arm": name, "skipped": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"})
            continue
        if not timed:
            resident = resident_bytes(opt, params)
            rows.append({"arm": name, "median_ms": None, "ratio": None, "resident_B_per_param": resident,
                         "moved_B_per_param": 2 * resident + params[0].element_size()})
            del opt, params
            continue
        ready[name] = (opt, params)
    times = {name: [] for name in ready}
    for _ in range(iters):
        for name, (opt, _) in ready.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            opt.step()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["torch fused fp32"])
    for name, (opt, params) in ready.items():
        median = statistics.median(times[name])
        resident = resident_bytes(opt, params)
        rows.append({"arm": name, "median_ms": 1e3 * median, "ratio": median / base, "resident_B_per_param": resident,
                     "ns_per_param_thread": 1e9 * median * torch.get_num_threads() / sum(p.numel() for p in params),
                     # every resident byte read and written once, the gradient read
                     "moved_B_per_param": 2 * resident + params[0].element_size()})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", choices=(*SHAPES, "all"), default="all")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"# low-precision AdamW, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{torch.cuda.get_device_name() if args.device == 'cuda' else cpu_model()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}, "
          f"wdopt {wdopt.__version__}")
    # Arms that name no backend take "auto"; say which it is (on the H200, 2026-11-28, a process
    # that had not loaded the built CUDA kernels yet took Triton for its first arms).
    print(f"# wdopt arms without '(backend)': backend='auto' = {backends.resolve('auto', args.device)!r}")
    for shape_set in (SHAPES if args.shapes == "all" else [args.shapes]):
        print(f"\n## {shape_set} ({args.iters} interleaved iterations)\n")
        print("| arm | median ms | × torch fused fp32 | ns/param·thread | resident B/param | moved B/param |")
        print("|---|---|---|---|---|---|")
        for row in bench(shape_set, args.device, args.iters):
            if "skipped" in row:
                print(f"| {row['arm']} | not run: {row['skipped']} | | | | |")
            elif row["median_ms"] is None:
                print(f"| {row['arm']} | not timed | | | {row['resident_B_per_param']:.2f} | "
                      f"{row['moved_B_per_param']:.1f} |")
            else:
                per_thread = f"{row['ns_per_param_thread']:.2f}" if args.device == "cpu" else ""
                print(f"| {row['arm']} | {row['median_ms']:.2f} | {row['ratio']:.2f} | {per_thread} | "
                      f"{row['resident_B_per_param']:.2f} | {row['moved_B_per_param']:.1f} |")


if __name__ == "__main__":
    main()
