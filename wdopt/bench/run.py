"""The run: one shape set at a time, every competitor from the same start, and the command line."""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import sys
from pathlib import Path

import numpy as np
import torch

from .competitors import competitors
from .machine import cpu_snapshot, environment, others_cpu_cores
from .report import Row, ShapeSetResult, Skip, _add_ratios, format_table, plot_ratios, write_csv, write_json
from .shapes import DTYPES, OPTIMIZERS, PUBLIC_SHAPE_SETS, SHAPE_SETS, bytes_per_param, make_tensors, numel
from .timing import add_ceiling, axpy_ceiling_gbps, run_ceiling, time_steps

# Competitors whose step is a per-tensor Python op sequence with full-size temporaries: timed with
# fewer iterations (--slow-iters) so the default run stays near five minutes on a 2-core CPU.
SLOW_COMPETITORS = ("wdopt reference",)

# torch.compile's compile time grows with the number of tensors; 10,000 tensors is impractical.
COMPILE_MAX_TENSORS = 1000

def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bench_shape_set(optimizer: str, shape_set: str, args) -> ShapeSetResult:
    """Time every competitor on one shape set; rows carry their ratio to torch fused (else foreach)."""
    dtype = DTYPES[args.dtype]
    shapes = SHAPE_SETS[shape_set]()
    n_params = sum(numel(s) for s in shapes)
    bpp = bytes_per_param(optimizer, dtype)
    params = make_tensors(shapes, dtype, args.device)
    initial = [p.detach().clone() for p in params]
    comps, skipped = competitors(optimizer, args.device, dtype, args.compile)
    result = ShapeSetResult(skipped=[Skip(optimizer, args.dtype, shape_set, n, r) for n, r in skipped])
    for comp in comps:
        warmup, iters = args.warmup, args.iters
        if comp.name in SLOW_COMPETITORS:
            if args.skip_slow:
                result.skipped.append(Skip(optimizer, args.dtype, shape_set, comp.name, "--skip-slow"))
                continue
            warmup, iters = min(warmup, 1), min(iters, args.slow_iters)
        if comp.name.startswith("torch.compile"):
            if len(shapes) > COMPILE_MAX_TENSORS:
                result.skipped.append(Skip(optimizer, args.dtype, shape_set, comp.name,
                                           f"more than {COMPILE_MAX_TENSORS} tensors: compiling would take too long"))
                continue
            # Step 1 (no state yet) and step 2 (state exists) compile different graphs: warm up past both.
            warmup = max(warmup, 3)
        with torch.no_grad():
            for p, p0 in zip(params, initial):  # same starting point for everyone
                p.copy_(p0)
        try:
            step = comp.make(params)  # fresh optimizer: no state carried over
            first, times = time_steps(step, args.device, warmup, iters)
        except Exception as e:  # noqa: BLE001 - a backend that cannot run this case is reported, not fatal
            result.skipped.append(Skip(optimizer, args.dtype, shape_set, comp.name, f"{type(e).__name__}: {e}"))
            continue
        finally:
            step = None
            gc.collect()
        median = float(np.median(times))
        gbps = bpp * n_params / median / 1e9
        row = Row(optimizer, args.dtype, shape_set, len(shapes), n_params, comp.name, warmup, iters,
                  first * 1e3, median * 1e3, float(np.percentile(times, 10)) * 1e3,
                  float(np.percentile(times, 90)) * 1e3, bpp, gbps)
        result.rows.append(row)
        _log(f"  {optimizer:<5} {shape_set:<10} {comp.name:<24} median {row.median_ms:10.2f} ms  ({iters} iters)")
    _add_ratios(result.rows)
    return result



# ----------------------------------------------------------------------------- entry point

def _cores(x: float | None) -> str:
    return "unknown" if x is None else f"{x:.2f}"


def parse_args(argv: list[str] | None, prog: str = "python -m wdopt.bench") -> argparse.Namespace:
    # ``prog``: the command the user typed (``wdopt bench`` through the CLI), for --help and errors.
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--optimizer", choices=OPTIMIZERS + ("all",), default="adamw")
    # "tiny" is accepted but not advertised: it exists for tests/test_bench.py.
    parser.add_argument("--shapes", choices=PUBLIC_SHAPE_SETS + ("all", "tiny"), default="all",
                        metavar="{gpt2,resnet50,many-small,all}")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    # A GPU step takes about a millisecond and its clocks ramp up under load: ten steps after two
    # warm-ups moved ratios by up to 2.5x between two runs on an H200 (2026-11-27, RESULTS.md).
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (default 2 on CPU, 20 on CUDA; at least 1)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps (default 10 on CPU, 100 on CUDA)")
    parser.add_argument("--slow-iters", type=int, default=3,
                        help=f"timed steps for {', '.join(SLOW_COMPETITORS)} (default 3, after 1 warm-up)")
    parser.add_argument("--skip-slow", action="store_true", help=f"do not time {', '.join(SLOW_COMPETITORS)}")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile of torch's foreach step (compiling takes about a minute on CPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the run (default: torch's own choice). On a shared "
                             "CPU, 1 avoids OpenMP regions stalling on a thread another process descheduled")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/bench-<UTC timestamp>)")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.warmup = args.warmup if args.warmup is not None else (20 if cuda else 2)
    args.iters = args.iters if args.iters is not None else (100 if cuda else 10)
    if args.warmup < 1 or args.iters < 1 or args.slow_iters < 1:
        parser.error("--warmup, --iters and --slow-iters must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.out is None:
        args.out = Path("runs") / f"bench-{_dt.datetime.now(_dt.timezone.utc):%Y%m%d-%H%M%S}"
    return args


def main(argv: list[str] | None = None, prog: str = "python -m wdopt.bench") -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv, prog)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = environment(args.device, argv)
    cpu_start = cpu_snapshot()
    optimizers = OPTIMIZERS if args.optimizer == "all" else (args.optimizer,)
    shape_sets = PUBLIC_SHAPE_SETS if args.shapes == "all" else (args.shapes,)
    _log(f"wdopt.bench on {args.device} ({env.get('gpu_name', env['cpu_model'])}); wdopt backends timed: "
         f"{env['wdopt_backends_timed']}")
    rows, skipped = [], []
    # On a shared machine the available bandwidth drifts: measure the ceiling around every shape set.
    ceilings = [axpy_ceiling_gbps(args.device)]
    args.out.mkdir(parents=True, exist_ok=True)
    for shape_set in shape_sets:
        _log(f"axpy ceiling {ceilings[-1]:.1f} GB/s")
        for optimizer in optimizers:
            result = bench_shape_set(optimizer, shape_set, args)
            rows += result.rows
            skipped += result.skipped
            gc.collect()  # free this shape set's parameters, gradients and state before the next
            if args.device == "cuda":
                torch.cuda.empty_cache()
        ceilings.append(axpy_ceiling_gbps(args.device))
        # Partial results as soon as a shape set is done: a run cut short still leaves its rows.
        write_csv(rows, args.out / "results.partial.csv")
    (args.out / "results.partial.csv").unlink(missing_ok=True)
    env["axpy_ceiling_gbps"] = run_ceiling(ceilings)
    env["axpy_ceiling_samples_gbps"] = ceilings
    add_ceiling(rows, env["axpy_ceiling_gbps"])
    env["others_cpu_cores"] = others_cpu_cores(cpu_start, cpu_snapshot())
    write_csv(rows, args.out / "results.csv")
    write_json(rows, skipped, env, args.out / "results.json")
    note = plot_ratios(rows, args.out / "results.png")
    print(f"{env['command']}\n{env['date_utc']} | {env['device']}: {env.get('gpu_name', env['cpu_model'])}, "
          f"{env['cpu_count']} CPUs, {env['torch_threads']} torch threads | torch {env['torch']}, "
          f"triton {env['triton']}, python {env['python']} | other processes used "
          f"{_cores(env['others_cpu_cores'])} cores on average during the run")
    print(format_table(rows, skipped, env))
    if (env["others_cpu_cores"] or 0.0) > 0.1 and args.device == "cpu":
        print(f"\nwarning: other processes kept {env['others_cpu_cores']:.2f} cores busy during the run: "
              "CPU timings are noisy; compare ratios, and rerun when the machine is quiet")
    print(f"\n{note}\nresults in {args.out}/ (results.csv, results.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
