"""FusedSGD: torch.optim.SGD's interface and trajectory, plus decoupled decay, on fused kernels."""

from __future__ import annotations

import weakref

import torch

from ._base import FusedOptimizer, KernelTensors, check_common


class FusedSGD(FusedOptimizer):
    r"""SGD with momentum, a drop-in replacement for ``torch.optim.SGD``.

    For each parameter with a gradient::

        g ← −g if maximize;   g ← g / grad_scale    (under torch.amp.GradScaler)
        g ← g + λ·p                                 (L2, torch's default)
        p ← p·(1 − d)                               (decoupled_weight_decay=True instead of L2;
                                                     d = lr·λ, or λ·lr/initial_lr with "schedule")
        b ← g on the first step, else b ← μ·b + (1 − dampening)·g      (μ ≠ 0)
        g ← g + μ·b if nesterov else b
        p ← p − lr·g

    State is torch's: ``momentum_buffer`` when μ ≠ 0, nothing otherwise. Math is fp32 for
    fp32/bf16/fp16 parameters (fp64 for fp64).

    If GradScaler skips the very first step of a parameter (inf/nan gradients), its momentum buffer
    is kept as zeros, so the next step gives b = (1 − dampening)·g rather than b = g; with the usual
    dampening = 0 the two agree.

    Args:
        params: parameters or parameter groups.
        lr: learning rate, a float or a 1-element tensor (read on device when ``capturable``).
        momentum, dampening, weight_decay, nesterov, maximize: as in torch.optim.SGD.
        decoupled_weight_decay: SGDW — decay the weights instead of adding λ·p to the gradient.
        capturable: read lr on the device, never syncing the host (CUDA graphs).
        decay_scaling: "lr" or "schedule" (see FusedAdamW); only with decoupled_weight_decay.
        backend: "auto", "reference", "triton", "cpu" or "cuda" (see ``wdopt.available_backends``).
        foreach, fused: accepted for compatibility with torch.optim calls; they have no effect.
        differentiable: must be False.
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
        capturable: bool = False,
        decay_scaling: str = "lr",
        backend: str = "auto",
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
    ):
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused,
            capturable=capturable, decoupled_weight_decay=decoupled_weight_decay,
            decay_scaling=decay_scaling, backend=backend,
        )
        self._check_group(defaults)
        super().__init__(params, defaults)

    def _check_group(self, group):
        check_common(group["lr"], group["weight_decay"], group["decay_scaling"], group["backend"],
                     group["differentiable"])
        if group["momentum"] < 0.0:
            raise ValueError(f"Invalid momentum value: {group['momentum']}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if group["decay_scaling"] == "schedule" and not group["decoupled_weight_decay"]:
            raise ValueError("decay_scaling='schedule' applies to decoupled weight decay: "
                             "pass decoupled_weight_decay=True")

    _state_tensors = ("momentum_buffer",)

    def _init_state(self, p, group):
        if group["momentum"] == 0:
            return  # torch keeps no state for plain SGD
        state = self.state[p]
        if state.get("momentum_buffer") is None:  # torch ≤ 2.0 checkpoints store None
            # Zeros, flagged as "no history yet": the kernel then stores b = g.
            buffer = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["momentum_buffer"] = buffer
            self._fresh_buffers[id(buffer)] = weakref.ref(buffer)

    def _update(self, group, backend, params, grads, grad_scale, found_inf, plain, telemetry=()):
        has_momentum = group["momentum"] != 0
        buffers = [self.state[p]["momentum_buffer"] if has_momentum else None for p in params]
        fresh = self._fresh_buffers
        first_steps = [b is not None and (r := fresh.get(id(b))) is not None and r() is b for b in buffers]
        tensors = KernelTensors(params, grads, {"momentum_buffer": buffers}, plain)
        backend.sgd(
            tensors.params, tensors.grads, tensors.states["momentum_buffer"], first_steps,
            lr=self._lr(group, params[0].device), weight_decay=group["weight_decay"],
            momentum=group["momentum"], dampening=group["dampening"], nesterov=group["nesterov"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            decay_lr_scale=self._decay_lr_scale(group), maximize=group["maximize"],
            grad_scale=grad_scale, found_inf=found_inf,
            **({"telemetry": telemetry} if telemetry else {}),
        )
        tensors.write_back()
        for b in buffers:
            if b is not None:
                fresh.pop(id(b), None)

    @property
    def _fresh_buffers(self) -> dict:
        """Buffers created this step, by id, with a weak reference that tells a reused id apart.
        Not saved in state dicts: a buffer loaded from a checkpoint always has history."""
        if "_fresh" not in self.__dict__:
            self.__dict__["_fresh"] = {}
        return self.__dict__["_fresh"]

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.pop("_fresh", None)
