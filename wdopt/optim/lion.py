"""FusedLion: Lion (Chen et al. 2023) with decoupled weight decay, on fused kernels."""

from __future__ import annotations

import torch

from ._base import FusedOptimizer, _fresh, check_betas, check_common, check_rounding


class FusedLion(FusedOptimizer):
    r"""Lion, "EvoLved Sign Momentum" (Chen et al. 2023), with decoupled weight decay.

    For each parameter with a gradient::

        g ← −g if maximize;   g ← g / grad_scale    (under torch.amp.GradScaler)
        c ← β1·m + (1−β1)·g
        p ← p·(1 − d) − lr·sign(c)      d = lr·λ, or λ·lr/initial_lr with decay_scaling="schedule"
        m ← β2·m + (1−β2)·g

    sign(c) is ±1, and c itself where c is ±0 or NaN: a NaN gradient makes the parameter NaN, as
    torch's AdamW and SGD do, instead of freezing it (torch.sign(nan) is 0). An infinite gradient
    moves p by ±lr and makes m infinite; the next step's c is then inf − inf = NaN, and so is p.

    State: ``exp_avg`` (m), in the parameter's dtype; math in fp32 (fp64 for fp64 parameters).
    Lion's update has unit size per element, so its lr is typically 3-10× smaller than AdamW's
    and its weight decay 3-10× larger.

    Args:
        params: parameters or parameter groups.
        lr: learning rate, a float or a 1-element tensor (read on device when ``capturable``).
        betas: (β1, β2), the interpolation for the update sign and the momentum decay.
        weight_decay, maximize, capturable, decay_scaling, stochastic_rounding, rounding_seed,
            master_weight_bits, state_bits,
            backend: see FusedAdamW.
        foreach, fused: accepted for compatibility; they have no effect.
        differentiable: must be False.
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        capturable: bool = False,
        decay_scaling: str = "lr",
        backend: str = "auto",
        stochastic_rounding: bool = False,
        rounding_seed: int = 0,
        master_weight_bits: int = 16,
        state_bits: int | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
    ):
        check_common(lr, weight_decay, decay_scaling, backend, differentiable)
        defaults = dict(
            lr=lr, betas=check_betas(betas), weight_decay=weight_decay, maximize=maximize,
            foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
            decay_scaling=decay_scaling, backend=backend,
            stochastic_rounding=stochastic_rounding, rounding_seed=rounding_seed,
            master_weight_bits=master_weight_bits, state_bits=state_bits,
        )
        super().__init__(params, defaults)

    def _check_group(self, group, constructing=True):
        check_common(group["lr"], group["weight_decay"], group["decay_scaling"], group["backend"],
                     group["differentiable"], constructing)
        check_rounding(group, type(self).__name__, self._stochastic_rounding_supported, self._state_bits_supported)
        group["betas"] = check_betas(group["betas"])

    _state_tensors = ("exp_avg",)
    _required_state = ("exp_avg",)

    _quantized_states = {"exp_avg": torch.int8}

    def _init_state(self, p, group):
        state = self.state[p]
        if _fresh(state):
            state["exp_avg"] = self._zeros_state(p, group, "exp_avg")

    _fast_kind = "lion"
    _statistics_kind = "lion"

    def _fast_constants(self, group):
        beta1, beta2 = group["betas"]
        return [float(beta1), float(beta2), float(group["weight_decay"])], [int(group["maximize"])]

    def _state_lists(self, group, params, states):
        return {"exp_avg": [s["exp_avg"] for s in states]}, [], [None] * len(params)

    def _update(self, group, backend, params, grads, grad_scale, found_inf, kernel_ready, telemetry=()):
        self._run_bucket(group, backend, params, grads, grad_scale, found_inf, kernel_ready, telemetry)

    def _launch(self, backend, group, params, grads, lists, steps, first_steps, lr, decay_lr_scale, grad_scale,
                found_inf, **extra):
        beta1, beta2 = group["betas"]
        return backend.lion(
            params, grads, lists["exp_avg"], lr=lr, beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
            decay_lr_scale=decay_lr_scale, maximize=group["maximize"], grad_scale=grad_scale, found_inf=found_inf,
            **extra)
