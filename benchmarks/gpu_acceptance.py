"""GPU acceptance checks that the test suite does not make, in priority order, for one lent GPU.

    python benchmarks/gpu_acceptance.py OUT.json            # on a CUDA machine (gpu_check.sh runs it)
    python benchmarks/gpu_acceptance.py OUT.json --smoke    # the same logic on the CPU, tiny sizes

Each check compares wdopt's GPU backends ("cuda", "triton") with the reference backend or with
torch itself, and OUT.json is rewritten after every check, so a run cut short by its time limit
still says what it found. Checks (issue 9's acceptance list; the graph-capture and parity checks
are the suite's own GPU tests, run before this by gpu_check.sh):

  rounding       the compiled kernels round fp32 to bf16/fp16 as torch's ``.to()`` does, bit for bit
  odd_offsets    parameters that are views at odd element offsets into one flat buffer (the
                 scalar-tail path of unaligned tensors), every class, against the reference
  side_stream    steps issued on a side stream, against the reference
  sync_free      ``torch.cuda.set_sync_debug_mode("error")`` around capturable steps with a tensor lr
  long_rows      rotational rows of 8,192 and 65,536 columns (on-chip and two-pass), against the reference
  huge_bf16      AdamW on one bf16 tensor of 2^31 + 5 elements (64-bit indexing), its last elements
                 against the reference
  host_overhead  host time of a step on many one-element tensors (kernels cost nothing), against
                 torch's fused AdamW with a float lr
  compiled       torch.compile of a training step that calls opt.step() (mode="reduce-overhead",
                 CUDA graphs, with capturable=True and a tensor lr, per backend) and of opt.step
                 alone (default mode), against the same steps in eager mode

Exit status 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

import wdopt

CLASSES = {
    "FusedAdamW": (wdopt.FusedAdamW, dict(weight_decay=0.1, amsgrad=True)),
    "FusedSGD": (wdopt.FusedSGD, dict(momentum=0.9, weight_decay=0.1, nesterov=True)),
    "FusedLion": (wdopt.FusedLion, dict(weight_decay=0.1)),
    "RotationalAdamW": (wdopt.RotationalAdamW, dict(weight_decay=0.1)),
    "RotationalSGD": (wdopt.RotationalSGD, dict(momentum=0.9, weight_decay=0.1)),
    "RotationalLion": (wdopt.RotationalLion, dict(weight_decay=0.1)),
}
BASE = ("FusedAdamW", "FusedSGD", "FusedLion")


class Failed(AssertionError):
    pass


def _close(name: str, got: torch.Tensor, want: torch.Tensor, exact: bool) -> None:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if exact:
        same = torch.equal(got.nan_to_num(1e300), want.nan_to_num(1e300))
        if not same:
            k = int((got != want).nonzero()[0, 0]) if got.numel() else 0
            raise Failed(f"{name}: not bit-identical (first at flat index {k}: {got.flatten()[k]!r} vs "
                         f"{want.flatten()[k]!r})")
    else:
        err = ((got - want).norm() / want.norm().clamp_min(1e-300)).item()
        if not err < 1e-5:
            raise Failed(f"{name}: relative error {err:.3g}")


def _trajectory(cls, kw, params, grads, backend, lr=1e-2):
    """Steps of ``cls`` on ``params`` (modified in place) with the gradient list of each step."""
    opt = cls(params, lr=lr, backend=backend, **kw)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g
        opt.step()
    return opt


def _compare_backends(cls, kw, make, backends, steps=3, exact=True, label=""):
    """Run ``make()`` → (params, grads_per_step) through each backend and the reference."""
    want_params, grads = make()
    want_opt = _trajectory(cls, kw, want_params, grads, "reference")
    for backend in backends:
        params, grads = make()
        opt = _trajectory(cls, kw, params, grads, backend)
        for i, (p, q) in enumerate(zip(params, want_params)):
            _close(f"{label}{backend} param {i}", p, q, exact)
            for key, value in want_opt.state[q].items():
                if isinstance(value, torch.Tensor) and value.numel() > 1:
                    _close(f"{label}{backend} param {i} {key}", opt.state[p][key], value, exact)


# ------------------------------------------------------------------------------------- checks

def check_rounding(ctx) -> str:
    """p ← p − 1·g with fp32 math rounds once to the storage dtype: torch's ``.to()`` is the truth."""
    n = ctx.size(1 << 20)
    gen = torch.Generator(device="cpu").manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        # Values over many binades, and exact ties of the storage dtype (halfway between neighbours).
        base = (torch.randn(n, generator=gen) * torch.exp2(torch.randint(-20, 12, (n,), generator=gen).float()))
        for backend in ctx.backends:
            p = base.to(dtype).to(ctx.device)
            g = (torch.randn(n, generator=gen) * 1e-2).to(dtype).to(ctx.device)
            want = (p.float() - g.float()).to(dtype)
            opt = wdopt.FusedSGD([p], lr=1.0, backend=backend)
            p.grad = g
            opt.step()
            _close(f"{backend} {dtype}", p, want, exact=True)
    return f"{n} elements, bf16 and fp16, bit-identical to torch's .to()"


def check_odd_offsets(ctx) -> str:
    # (rows, columns): 1-D tensors take the base step in every class, 2-D ones are rotated by the
    # rotational classes; every view starts at an odd element offset, so none is 16-byte aligned.
    shapes = [(7,), (3, 11), (1025,), (5, 205), (4099,)]

    def make():
        gen = torch.Generator(device="cpu").manual_seed(1)
        numels = [torch.Size(s).numel() for s in shapes]
        flat = torch.randn(sum(numels) + 2 * len(shapes) + 1, generator=gen).to(ctx.device)
        params, offset = [], 1
        for s, k in zip(shapes, numels):
            params.append(torch.nn.Parameter(flat[offset:offset + k].view(s)))
            offset += k + (2 if k % 2 == 0 else 1)  # the next offset is odd again
        grads = [[torch.randn(p.shape, generator=gen).to(ctx.device) for p in params] for _ in range(3)]
        return params, grads

    for name, (cls, kw) in CLASSES.items():
        _compare_backends(cls, kw, make, ctx.backends, exact=not name.startswith("Rotational"), label=f"{name} ")
    return f"{len(CLASSES)} classes, views at odd offsets of shapes {shapes}"


def check_side_stream(ctx) -> str:
    if ctx.device != "cuda":
        return "skipped on the CPU (no streams)"
    shapes = [(33, 17), (1000,), (5, 3, 3, 3)]

    def make():
        gen = torch.Generator(device="cpu").manual_seed(2)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).cuda()) for s in shapes]
        grads = [[torch.randn(s, generator=gen).cuda() for s in shapes] for _ in range(3)]
        return params, grads

    for name in BASE + ("RotationalAdamW",):
        cls, kw = CLASSES[name]
        want_params, grads = make()
        want_opt = _trajectory(cls, kw, want_params, grads, "reference")
        for backend in ctx.backends:
            params, grads = make()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                _trajectory(cls, kw, params, grads, backend)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            for i, (p, q) in enumerate(zip(params, want_params)):
                _close(f"{name} {backend} param {i}", p, q, exact=not name.startswith("Rotational"))
        del want_opt
    return "FusedAdamW/SGD/Lion and RotationalAdamW on a side stream"


def check_sync_free(ctx) -> str:
    if ctx.device != "cuda":
        return "skipped on the CPU (no device syncs)"
    failures = []
    for name, (cls, kw) in CLASSES.items():
        for backend in ctx.backends:
            p = torch.nn.Parameter(torch.randn(64, 32, device="cuda"))
            lr = torch.tensor(1e-3, device="cuda")
            opt = cls([p], lr=lr, capturable=True, backend=backend, **kw)
            p.grad = torch.randn_like(p)
            opt.step()  # state is created on the first step
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()
            except RuntimeError as e:
                failures.append(f"{name}/{backend}: {str(e).splitlines()[0][:120]}")
            finally:
                torch.cuda.set_sync_debug_mode(0)
    if failures:
        raise Failed("; ".join(failures))
    return f"{len(CLASSES)} classes × {ctx.backends}: no device-to-host sync in a capturable step"


def check_long_rows(ctx) -> str:
    cols = [ctx.size(8192), ctx.size(65536)]

    def make():
        gen = torch.Generator(device="cpu").manual_seed(3)
        params = [torch.nn.Parameter(torch.randn(3, c, generator=gen).to(ctx.device)) for c in cols]
        grads = [[torch.randn(3, c, generator=gen).to(ctx.device) for c in cols] for _ in range(3)]
        return params, grads

    for name in ("RotationalAdamW", "RotationalSGD", "RotationalLion"):
        cls, kw = CLASSES[name]
        _compare_backends(cls, kw, make, ctx.backends, exact=False, label=f"{name} ")
    return f"rotational rows of {cols} columns within 1e-5 of the reference"


def check_huge_bf16(ctx) -> str:
    n = (1 << 31) + 5 if not ctx.smoke else (1 << 12) + 5
    tail = 4096
    gen = torch.Generator(device=ctx.device).manual_seed(4)
    results = []
    for backend in ctx.backends:
        p = torch.randn(n, generator=gen, device=ctx.device, dtype=torch.bfloat16)
        g = torch.randn(n, generator=gen, device=ctx.device, dtype=torch.bfloat16)
        # The math is element-wise: the reference on the last elements alone is the truth for them.
        want = torch.nn.Parameter(p[-tail:].clone())
        want.grad = g[-tail:].clone()
        p = torch.nn.Parameter(p)
        p.grad = g
        for q, backend_ in ((p, backend), (want, "reference")):
            wdopt.FusedAdamW([q], lr=1e-3, weight_decay=0.1, backend=backend_).step()
        _close(f"{backend} last {tail} of {n}", p.detach()[-tail:], want, exact=True)
        results.append(backend)
        del p, g, want
        if ctx.device == "cuda":
            torch.cuda.empty_cache()
    return f"bf16 AdamW on {n} elements, last {tail} bit-identical to the reference ({', '.join(results)})"


def check_host_overhead(ctx) -> str:
    """Wall time of step() without a device sync, on one-element tensors (the kernels cost nothing),
    the default loop: new gradient tensors every step. Median of 50 after 5 warm-ups."""
    lines = []
    # Under --smoke the Triton interpreter costs seconds a step: time the C++ backend only.
    backends = [b for b in ctx.backends if not (ctx.smoke and b == "triton")]
    steps = 8 if ctx.smoke else 55
    for count in (150, ctx.size(10000)):
        params = [torch.nn.Parameter(torch.zeros(1, device=ctx.device)) for _ in range(count)]
        low = [torch.nn.Parameter(torch.zeros(1, device=ctx.device, dtype=torch.bfloat16)) for _ in range(count)]
        makers = {f"wdopt {b}": (lambda b=b: wdopt.FusedAdamW(params, lr=1e-3, backend=b)) for b in backends}
        # bf16 with a 24-bit master, stochastic rounding and 8-bit states: a stream, a correction
        # and two block-scale tensors per parameter more for the fast path to hold and check
        makers.update({f"wdopt {b} bf16+24-bit master+SR+8-bit": (lambda b=b: wdopt.FusedAdamW(
            low, lr=1e-3, backend=b, master_weight_bits=24, stochastic_rounding=True, state_bits=8)) for b in backends})
        makers["torch fused"] = lambda: torch.optim.AdamW(params, lr=1e-3, fused=True)
        times = {}
        for label, make in makers.items():
            opt = make()
            samples = []
            for i in range(steps):
                for p in opt.param_groups[0]["params"]:
                    p.grad = torch.ones(1, device=ctx.device, dtype=p.dtype)
                if ctx.device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                opt.step()
                if i >= 5:
                    samples.append(time.perf_counter() - t0)
            samples.sort()
            times[label] = samples[len(samples) // 2] * 1e6
        ref = times.get("torch fused")
        lines.append(f"{count} tensors: " + ", ".join(
            f"{k} {v:.0f} µs ({v / count:.2f} µs/tensor" + (f", {v / ref:.2f}× torch fused)" if ref else ")")
            for k, v in times.items()))
    return "; ".join(lines)


def check_compiled(ctx) -> str:
    """torch.compile around wdopt's step, against eager: a compiled training step (forward,
    backward, opt.step, zero_grad) per backend and mode, and a compiled ``opt.step`` alone. On the
    CPU (--smoke) the C++ backend, traced by dynamo without inductor's code generation (slow on 2
    cores; tests/test_custom_ops.py compiles a step with inductor on the CPU)."""
    from torch import nn

    # On the GPU the CUDA-graph mode for every backend (the default mode is the opt.step check's,
    # and the suite's on the CPU): three compiles fit the acceptance step's time cap.
    modes = ["reduce-overhead"] if ctx.device == "cuda" else ["default"]
    compile_options = {} if ctx.device == "cuda" else {"backend": "eager"}
    backends = ctx.backends if ctx.device == "cuda" else [b for b in ctx.backends if b == "cpu"]
    done = []

    def pair(backend, capturable):
        torch.manual_seed(0)
        models = [nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 1)).to(ctx.device)
                  for _ in range(2)]
        models[1].load_state_dict(models[0].state_dict())
        opts = [wdopt.FusedAdamW(m.parameters(), lr=torch.tensor(1e-2, device=ctx.device) if capturable else 1e-2,
                                 weight_decay=0.1, capturable=capturable, backend=backend) for m in models]
        return models, opts

    x, y = torch.randn(64, 16, device=ctx.device), torch.randn(64, 1, device=ctx.device)

    def loss_of(model):
        return nn.functional.mse_loss(model(x), y)

    def train_step(model, opt):
        loss = loss_of(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # static gradient buffers, as CUDA graphs want
        return loss.detach()

    def compare(label, models):
        for i, (p, q) in enumerate(zip(models[0].parameters(), models[1].parameters())):
            err = ((p - q).double().norm() / q.double().norm()).item()
            if not err < 1e-4:  # compiled forward/backward round differently from eager ones
                raise Failed(f"{label}: parameter {i} differs from eager by {err:.3g} (relative)")

    for backend in backends:
        for mode in modes:
            torch._dynamo.reset()
            models, (eager, ours) = pair(backend, capturable=mode == "reduce-overhead")
            compiled = torch.compile(train_step, mode=mode, **compile_options)
            for _ in range(5):
                train_step(models[0], eager)
                compiled(models[1], ours)
            if ctx.device == "cuda":
                torch.cuda.synchronize()
            compare(f"{backend} training step, {mode}", models)
            done.append(f"{backend}/{mode}")
    backend = backends[0]
    torch._dynamo.reset()
    models, (eager, ours) = pair(backend, capturable=False)
    step = torch.compile(ours.step, **compile_options)
    for _ in range(5):
        for model, opt_step in ((models[0], eager.step), (models[1], step)):
            loss_of(model).backward()
            opt_step()
    compare(f"{backend} compiled opt.step", models)
    return f"compiled training steps match eager ({', '.join(done)}); compiled opt.step ({backend}) too"


CHECKS = [
    ("rounding", check_rounding),
    ("odd_offsets", check_odd_offsets),
    ("side_stream", check_side_stream),
    ("sync_free", check_sync_free),
    ("long_rows", check_long_rows),
    ("huge_bf16", check_huge_bf16),
    ("host_overhead", check_host_overhead),
    ("compiled", check_compiled),
]


class Context:
    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.device = "cpu" if smoke else "cuda"
        self.backends = [b for b in wdopt.available_backends(self.device) if b not in ("reference", "auto")]

    def size(self, n: int) -> int:
        """Full size on the GPU; a small one of the same kind (odd stays odd) for --smoke."""
        return n if not self.smoke else max(1, min(n, 257 + (n & 1)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_acceptance.py", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the JSON summary, rewritten after every check")
    parser.add_argument("--smoke", action="store_true", help="run on the CPU with tiny sizes (tests the script)")
    parser.add_argument("--only", nargs="*", help="run only these checks")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: use --smoke to try the script on the CPU")
    ctx = Context(args.smoke)
    summary = {"device": torch.cuda.get_device_name() if not args.smoke else "cpu (smoke)",
               "torch": torch.__version__, "backends": ctx.backends, "checks": {}}
    failed = 0
    for name, check in CHECKS:
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        try:
            detail, ok = check(ctx), True
        except Exception as e:  # noqa: BLE001 - every check reports, none stops the run
            detail, ok = f"{type(e).__name__}: {e}", False
            traceback.print_exc()
        seconds = time.perf_counter() - t0
        failed += not ok
        summary["checks"][name] = {"ok": ok, "seconds": round(seconds, 2), "detail": detail}
        print(f"{'PASS' if ok else 'FAIL'} {name} ({seconds:.1f} s): {detail}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
