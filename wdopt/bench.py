"""Kernel benchmark: one optimizer step of wdopt's backends against torch.optim, on model-sized tensor lists.

    python -m wdopt.bench                                  # AdamW, every shape set, fp32, fastest device
    python -m wdopt.bench --optimizer all --shapes many-small
    python -m wdopt.bench --device cuda --dtype bfloat16 --compile

An optimizer step is memory-bound, so each result is reported three ways (docs/performance.md):
the step time (median, p10, p90), the effective bandwidth from an explicit bytes-per-parameter model,
and that bandwidth as a fraction of a ceiling measured in the same run on the same device (a large
in-place axpy). Every competitor is also divided by torch's fused step measured in the same run,
since ratios survive a noisy machine better than absolute times. See benchmarks/README.md.

Fairness rules: every competitor starts from the same parameter values and the same gradients
(set once, before timing), with fresh optimizer state; memory is freed between shape sets.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .env import package_version

OPTIMIZERS = ("adamw", "sgd", "lion")
PUBLIC_SHAPE_SETS = ("gpt2", "resnet50", "many-small")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Hyperparameters shared by every competitor of an optimizer. Weight decay is on everywhere so the
# decay path is timed; SGD has momentum, as in practice (and as the 20 B/param figure assumes).
HYPER = {
    "adamw": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2),
    "sgd": dict(lr=1e-3, momentum=0.9, weight_decay=1e-2),
    "lion": dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=1e-2),
}

# The axpy ceiling's two fp32 tensors: 1 GiB each, several times any cache on our machines
# (the CPU VM reports a 480 MiB L3; an H100 has 50 MB of L2).
AXPY_ELEMENTS = 256 * 1024 * 1024
AXPY_BYTES_PER_ELEMENT = 12  # read a, read b, write a (fp32)

# Competitors whose step is a per-tensor Python op sequence with full-size temporaries: timed with
# fewer iterations (--slow-iters) so the default run stays near five minutes on a 2-core CPU.
SLOW_COMPETITORS = ("wdopt reference",)

# torch.compile's compile time grows with the number of tensors; 10,000 tensors is impractical.
COMPILE_MAX_TENSORS = 1000


# ----------------------------------------------------------------------------- shape sets

def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """GPT-2 small (124.4M parameters, 148 tensors) as Hugging Face stores it (Conv1D is in×out)."""
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes = [(vocab, d), (ctx, d)]  # wte, wpe
    for _ in range(layers):
        shapes += [
            (d,), (d,),                   # ln_1 weight, bias
            (d, 3 * d), (3 * d,),         # attn.c_attn
            (d, d), (d,),                 # attn.c_proj
            (d,), (d,),                   # ln_2
            (d, 4 * d), (4 * d,),         # mlp.c_fc
            (4 * d, d), (d,),             # mlp.c_proj
        ]
    shapes += [(d,), (d,)]  # ln_f
    return shapes


def resnet50_shapes() -> list[tuple[int, ...]]:
    """ResNet-50's parameters (25.56M, 161 tensors) from its layer list, as torchvision builds it:
    conv weights K×C×kh×kw without bias, BatchNorm weight and bias, fc 1000×2048 plus bias."""
    def conv_bn(k, c, kernel):
        return [(k, c, kernel, kernel), (k,), (k,)]

    shapes = conv_bn(64, 3, 7)  # stem
    in_ch = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        out_ch = 4 * width  # bottleneck expansion
        for block in range(blocks):
            shapes += conv_bn(width, in_ch, 1) + conv_bn(width, width, 3) + conv_bn(out_ch, width, 1)
            if block == 0:
                shapes += conv_bn(out_ch, in_ch, 1)  # downsample projection
            in_ch = out_ch
    shapes += [(1000, 2048), (1000,)]
    return shapes


def many_small_shapes() -> list[tuple[int, ...]]:
    """10,000 tensors of 256 elements: per-tensor overhead dominates (the bytes take ~2 ms on CPU)."""
    return [(256,)] * 10_000


def tiny_shapes() -> list[tuple[int, ...]]:
    """A few small tensors for the smoke test (--shapes tiny, not listed in --help)."""
    return [(7,), (33, 17), (256,), (4, 3, 3, 3)]


SHAPE_SETS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "gpt2": gpt2_small_shapes,
    "resnet50": resnet50_shapes,
    "many-small": many_small_shapes,
    "tiny": tiny_shapes,
}


def numel(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def make_tensors(shapes, dtype, device, seed=0):
    """Parameters (leaf tensors) with their gradients attached, identical for every competitor."""
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = (0.02 * torch.randn(shape, generator=g)).to(device=device, dtype=dtype).requires_grad_(True)
        p.grad = (1e-3 * torch.randn(shape, generator=g)).to(device=device, dtype=dtype)
        params.append(p)
    return params


# ----------------------------------------------------------------------------- bytes model

def bytes_per_param(optimizer: str, param_dtype: torch.dtype, state_dtype: torch.dtype | None = None,
                    *, amsgrad: bool = False, momentum: bool = True) -> int:
    """Bytes one step must move per parameter if each input is read once and each output written once:
    the parameter is read and written, the gradient (parameter dtype) read, each state tensor read and
    written. AdamW fp32: 3·4 + 2·4·2 = 28 (amsgrad 36); SGD with momentum and Lion fp32: 20."""
    p = torch.empty(0, dtype=param_dtype).element_size()
    s = torch.empty(0, dtype=state_dtype or param_dtype).element_size()
    states = {"adamw": 2 + int(amsgrad), "sgd": int(momentum), "lion": 1}[optimizer]
    return 3 * p + 2 * s * states


# ----------------------------------------------------------------------------- competitors

class TorchOpsLion:
    """Lion written with torch ops, the baseline for FusedLion: torch.optim has no Lion.
    foreach=False loops over tensors (like torch's for-loop path); foreach=True uses _foreach_ ops."""

    def __init__(self, params, lr, betas, weight_decay, foreach):
        self.params, self.lr, self.betas, self.wd, self.foreach = list(params), lr, betas, weight_decay, foreach
        self.exp_avg = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self):
        (b1, b2), lr = self.betas, self.lr
        grads = [p.grad for p in self.params]
        if self.foreach:
            torch._foreach_mul_(self.params, 1 - lr * self.wd)
            update = torch._foreach_lerp(self.exp_avg, grads, 1 - b1)  # b1·m + (1−b1)·g
            torch._foreach_sign_(update)
            torch._foreach_add_(self.params, update, alpha=-lr)
            torch._foreach_lerp_(self.exp_avg, grads, 1 - b2)
            return
        for p, g, m in zip(self.params, grads, self.exp_avg):
            p.mul_(1 - lr * self.wd)
            p.add_(m.lerp(g, 1 - b1).sign_(), alpha=-lr)
            m.lerp_(g, 1 - b2)


@dataclass
class Competitor:
    """One way to run the step: ``make(params)`` builds fresh optimizer state and returns step()."""
    name: str
    make: Callable[[list[torch.Tensor]], Callable[[], object]]


def _torch_factory(optimizer: str, **impl) -> Callable:
    """torch.optim's implementation of ``optimizer`` (hand-written for Lion) with ``impl`` flags."""
    hyper = HYPER[optimizer]
    if optimizer == "lion":
        return lambda params: TorchOpsLion(params, foreach=impl.get("foreach", False), **hyper).step
    cls = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[optimizer]
    return lambda params: cls(params, **hyper, **impl).step


def _torch_fused_supported(optimizer: str, device: str, dtype: torch.dtype) -> str | None:
    """None when torch has a fused step for this optimizer, device and dtype; else why not."""
    if optimizer == "lion":
        return "torch.optim has no Lion"
    p = torch.zeros(4, device=device, dtype=dtype, requires_grad=True)
    p.grad = torch.ones_like(p)
    try:
        _torch_factory(optimizer, fused=True)([p])()
    except (RuntimeError, ValueError, NotImplementedError) as e:
        return f"torch fused unsupported: {e}"
    return None


def _compiled(make_step: Callable) -> Callable:
    def make(params):
        step = make_step(params)

        @torch.compile(fullgraph=False)
        def compiled_step():
            step()

        return compiled_step
    return make


def _torch_fused_then_projection(params):
    """The rotational variant's baseline: torch's fused AdamW step (no decay on the matrices), then
    the projection back onto each neuron's sphere written as batched torch ops per tensor: centre
    every row and rescale it to its initial norm."""
    matrices = [p for p in params if p.dim() > 1]
    others = [p for p in params if p.dim() <= 1]
    hyper = dict(HYPER["adamw"])
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.0}, {"params": others}], fused=True, **hyper)
    norms = [p.detach().reshape(p.shape[0], -1).norm(dim=1, keepdim=True) for p in matrices]

    def step():
        opt.step()
        with torch.no_grad():
            for p, n in zip(matrices, norms):
                rows = p.view(p.shape[0], -1)
                rows.sub_(rows.mean(dim=1, keepdim=True))
                rows.mul_(n / rows.norm(dim=1, keepdim=True))
    return step


def _rotational_competitors(device: str, dtype: torch.dtype) -> list[Competitor]:
    """RotationalAdamW on every backend with a fused rotational kernel, its baseline, and FusedAdamW
    with a RotationMonitor recording every step (the telemetry's cost)."""
    import wdopt

    out = []
    for b in _wdopt_backends(device):
        if b == "reference":
            continue
        out.append(Competitor(f"wdopt rotational {b}",
                              lambda ps, b=b: wdopt.RotationalAdamW(ps, backend=b, **HYPER["adamw"]).step))
        out.append(Competitor(f"wdopt {b} + monitor", lambda ps, b=b: _monitored(ps, b)))
    if _torch_fused_supported("adamw", device, dtype) is None:
        out.append(Competitor("torch fused + projection", _torch_fused_then_projection))
    return out


def _monitored(params, backend: str):
    import wdopt

    opt = wdopt.FusedAdamW(params, backend=backend, **HYPER["adamw"])
    monitor = wdopt.RotationMonitor(opt, every=1, keep=1)
    opt._bench_monitor = monitor  # kept alive with the optimizer
    return opt.step


def _wdopt_backends(device: str) -> list[str]:
    """Every wdopt backend that can run here, except Triton on CPU tensors: that is the interpreter."""
    import wdopt

    return [b for b in wdopt.available_backends(device) if not (b == "triton" and device == "cpu")]


def _external_adamw(device: str) -> tuple[list[Competitor], list[tuple[str, str]]]:
    """apex and DeepSpeed AdamW kernels, only if already importable (never installed by us)."""
    out, skipped = [], []
    h = HYPER["adamw"]
    if device == "cuda":
        try:
            from apex.optimizers import FusedAdam as ApexFusedAdam
            out.append(Competitor("apex FusedAdam", lambda ps: ApexFusedAdam(ps, adam_w_mode=True, **h).step))
        except Exception as e:  # noqa: BLE001 - any import failure means "not available"
            skipped.append(("apex FusedAdam", f"not importable: {type(e).__name__}"))
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam as DSFusedAdam
        if device == "cuda":
            out.append(Competitor("deepspeed FusedAdam", lambda ps: DSFusedAdam(ps, adam_w_mode=True, **h).step))
        else:
            out.append(Competitor("deepspeed CPUAdam", lambda ps: DeepSpeedCPUAdam(ps, adamw_mode=True, **h).step))
    except Exception as e:  # noqa: BLE001
        skipped.append(("deepspeed", f"not importable: {type(e).__name__}"))
    return out, skipped


def competitors(optimizer, device, dtype, compile_) -> tuple[list[Competitor], list[tuple[str, str]]]:
    """Everything to time for ``optimizer`` on ``device``/``dtype``, and what was skipped and why."""
    import wdopt

    cls = {"adamw": wdopt.FusedAdamW, "sgd": wdopt.FusedSGD, "lion": wdopt.FusedLion}[optimizer]
    hyper = HYPER[optimizer]
    comps = [Competitor(f"wdopt {b}", lambda ps, b=b: cls(ps, backend=b, **hyper).step)
             for b in _wdopt_backends(device)]
    skipped = []
    if device == "cpu" and "triton" in wdopt.available_backends("cpu"):
        skipped.append(("wdopt triton", "CPU tensors would run under the Triton interpreter"))
    comps += [
        Competitor("torch for-loop", _torch_factory(optimizer, foreach=False)),
        Competitor("torch foreach", _torch_factory(optimizer, foreach=True)),
    ]
    reason = _torch_fused_supported(optimizer, device, dtype)
    if reason is None:
        comps.append(Competitor("torch fused", _torch_factory(optimizer, fused=True)))
    else:
        skipped.append(("torch fused", reason))
    if compile_:
        comps.append(Competitor("torch.compile foreach", _compiled(_torch_factory(optimizer, foreach=True))))
    if optimizer == "adamw":
        extra, extra_skipped = _external_adamw(device)
        comps += extra + _rotational_competitors(device, dtype)
        skipped += extra_skipped
    return comps, skipped


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


# ----------------------------------------------------------------------------- one shape set

@dataclass
class Row:
    optimizer: str
    dtype: str
    shape_set: str
    n_tensors: int
    n_params: int
    competitor: str
    warmup: int
    iters: int
    first_step_ms: float
    median_ms: float
    p10_ms: float
    p90_ms: float
    bytes_per_param: int
    gbps: float
    ceiling_gbps: float = float("nan")  # filled in at the end of the run: see run_ceiling()
    frac_ceiling: float = float("nan")
    baseline: str = ""
    ratio: float = float("nan")


CSV_FIELDS = [f for f in Row.__dataclass_fields__]


@dataclass
class Skip:
    optimizer: str
    dtype: str
    shape_set: str
    competitor: str
    reason: str


@dataclass
class ShapeSetResult:
    rows: list[Row] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)


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


def _add_ratios(rows: list[Row]) -> None:
    """Each row's median over the baseline's, the baseline being torch fused where it ran, else torch foreach."""
    by_name = {r.competitor: r for r in rows}
    base = by_name.get("torch fused") or by_name.get("torch foreach")
    for r in rows:
        if base is not None:
            r.baseline, r.ratio = base.competitor, r.median_ms / base.median_ms


# ----------------------------------------------------------------------------- reporting

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall s, machine-wide busy CPU s, this process's CPU s), to measure other processes' load."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None  # not Linux
    busy = sum(fields) - fields[3] - fields[4]  # everything but idle and iowait
    own = os.times()
    return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def others_cpu_cores(start, end) -> float | None:
    """Average number of cores other processes kept busy between two snapshots: they stall torch's
    OpenMP regions and share the memory bandwidth, so any value well above 0 makes timings noisy."""
    if start is None or end is None:
        return None
    wall, busy, own = (e - s for s, e in zip(start, end))
    return max(0.0, (busy - own) / wall)


def _git_state() -> dict:
    """The commit of the wdopt checkout being run and whether its source has uncommitted edits
    (read-only queries: GIT_OPTIONAL_LOCKS=0 keeps git from even refreshing the index)."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")

    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=root, env=env, capture_output=True, text=True, timeout=10)

    try:
        commit = git("rev-parse", "HEAD").stdout.strip()
        dirty = git("diff", "--quiet", "HEAD", "--", "wdopt", "csrc").returncode == 1
    except (OSError, subprocess.SubprocessError):
        return {"wdopt_git_commit": "unknown", "wdopt_uncommitted_edits": None}
    return {"wdopt_git_commit": commit or "unknown", "wdopt_uncommitted_edits": dirty if commit else None}


def environment(device: str, argv: list[str]) -> dict:
    """Everything needed to reproduce or compare a result: where, when, with what, run how."""
    import wdopt

    env = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "python -m wdopt.bench" + ("" if not argv else " " + shlex.join(argv)),
        "device": device,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": package_version("triton"),
        "numpy": np.__version__,
        "wdopt": wdopt.__version__,
        "wdopt_backends_available": wdopt.available_backends(device),
        "wdopt_backends_timed": _wdopt_backends(device),
        **_git_state(),
    }
    if device == "cuda":
        env["gpu_name"] = torch.cuda.get_device_name()
        try:
            env["gpu_driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            env["gpu_driver"] = "unknown (nvidia-smi failed)"
    return env


def format_table(rows: list[Row], skipped: list[Skip], env: dict) -> str:
    samples = ", ".join(f"{c:.1f}" for c in env["axpy_ceiling_samples_gbps"])
    lines, key = [f"axpy ceiling {env['axpy_ceiling_gbps']:.1f} GB/s (best of {samples}); "
                  f"'ceiling' = GB/s as a fraction of it; '~' marks p90 > 1.5 × p10 (noisy)"], None
    for r in rows:
        if (r.optimizer, r.dtype, r.shape_set) != key:
            key = (r.optimizer, r.dtype, r.shape_set)
            lines += ["", f"{r.optimizer} {r.dtype} | {r.shape_set}: {r.n_tensors} tensors, "
                          f"{r.n_params / 1e6:.2f}M params, {r.bytes_per_param} B/param",
                      f"  {'competitor':<24}{'iters':>6}{'median ms':>12}{'p10–p90 ms':>22}"
                      f"{'GB/s':>9}{'ceiling':>9}{'× ' + (r.baseline or 'none'):>17}"]
        spread = f"{r.p10_ms:.2f}–{r.p90_ms:.2f}" + ("~" if r.p90_ms > 1.5 * r.p10_ms else " ")
        lines.append(f"  {r.competitor:<24}{r.iters:>6}{r.median_ms:>12.2f}{spread:>22}"
                     f"{r.gbps:>9.2f}{r.frac_ceiling:>9.1%}{r.ratio:>17.3g}")
    if skipped:
        lines += ["", "not timed:"] + [f"  {s.optimizer} {s.shape_set} {s.competitor}: {s.reason}" for s in skipped]
    return "\n".join(lines)


def write_csv(rows: list[Row], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))


def write_json(rows: list[Row], skipped: list[Skip], env: dict, path: Path) -> None:
    doc = {"environment": env, "bytes_model": bytes_per_param.__doc__.strip(),
           "rows": [asdict(r) for r in rows], "skipped": [asdict(s) for s in skipped]}
    path.write_text(json.dumps(doc, indent=2) + "\n")


def plot_ratios(rows: list[Row], path: Path) -> str:
    """Grouped bars of each competitor's time over torch fused, per shape set (one panel per
    optimizer and dtype). Returns a note on what was written; matplotlib is optional."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no results.png (pip install matplotlib)"
    panels = sorted({(r.optimizer, r.dtype) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (opt, dtype) in zip(axes[0], panels):
        sub = [r for r in rows if (r.optimizer, r.dtype) == (opt, dtype)]
        sets = list(dict.fromkeys(r.shape_set for r in sub))
        names = list(dict.fromkeys(r.competitor for r in sub))
        width = 0.8 / len(names)
        # A ratio is noisy when its own timing or its baseline's is (p90 > 1.5 × p10, the text
        # table's '~'): hatched and marked '~', so that a loaded machine's outlier (e.g. 0.019×)
        # does not read as a measurement.
        noisy_row = {(r.shape_set, r.competitor): r.p90_ms > 1.5 * r.p10_ms for r in sub}
        any_noisy = False
        for i, name in enumerate(names):
            ratio = {r.shape_set: r.ratio for r in sub if r.competitor == name}
            baseline = {r.shape_set: r.baseline for r in sub if r.competitor == name}
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(sets))]
            heights = [ratio.get(s, float("nan")) for s in sets]
            bars = ax.bar(xs, heights, width, label=name)
            for bar, s, h in zip(bars, sets, heights):
                if noisy_row.get((s, name)) or noisy_row.get((s, baseline.get(s))):
                    any_noisy = True
                    bar.set_hatch("///")
                    bar.set_alpha(0.5)
                    ax.annotate("~", (bar.get_x() + bar.get_width() / 2, h), ha="center", va="bottom", fontsize=12)
        if any_noisy:
            ax.bar([0], [float("nan")], color="white", edgecolor="gray", hatch="///",
                   label="~ hatched: noisy (p90 > 1.5 × p10)")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(sets)), sets)
        ax.set_yscale("log")
        ax.set_ylabel(f"step time / {sub[0].baseline} (lower is better)")
        ax.set_title(f"{opt} {dtype}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"


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
