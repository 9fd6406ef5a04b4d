"""Who is timed: wdopt's backends, torch.optim's implementations (for-loop, foreach, fused,
compiled), the rotational and monitored variants, and external fused AdamWs where installed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .shapes import HYPER

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
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        from deepspeed.ops.adam import FusedAdam as DSFusedAdam
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
