"""FusedAdamW: torch.optim.AdamW's interface and trajectory, on fused multi-tensor kernels."""

from __future__ import annotations

import torch

from ._base import FusedOptimizer, _fresh, _step_tensor, check_betas, check_common, check_rounding


class FusedAdamW(FusedOptimizer):
    r"""AdamW with decoupled weight decay, a drop-in replacement for ``torch.optim.AdamW``.

    For each parameter with a gradient (t counts this parameter's steps from 1)::

        g ← −g if maximize;   g ← g / grad_scale    (under torch.amp.GradScaler)
        p ← p·(1 − d)         d = lr·λ  (decay_scaling="lr", torch)  or  λ·lr/initial_lr ("schedule")
        m ← β1·m + (1−β1)·g
        v ← β2·v + (1−β2)·g²
        v_max ← max(v_max, v)                      (amsgrad; v_max replaces v below)
        p ← p − lr/(1−β1^t) · m / (sqrt(v)/sqrt(1−β2^t) + ε)

    Math is fp32 for fp32/bf16/fp16 parameters (fp64 for fp64); state has the parameter's dtype and
    torch's names (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``), so state dicts move
    between torch.optim.AdamW and FusedAdamW in both directions. ``step`` is a float32 0-d tensor on
    the parameter's device, as in torch's fused AdamW.

    Args:
        params: parameters or parameter groups.
        lr: learning rate, a float or a 1-element tensor (read on device when ``capturable``).
        betas, eps, weight_decay, amsgrad, maximize: as in torch.optim.AdamW.
        capturable: read lr and step on the device, never syncing the host (CUDA graphs).
        decay_scaling: "lr" for torch's p·(1 − lr·λ); "schedule" for p·(1 − λ·lr/initial_lr):
            decay follows an LR schedule's shape but not lr's magnitude (muP, LR sweeps).
        backend: "auto", "reference", "triton", "cpu" or "cuda" (see ``wdopt.available_backends``).
        stochastic_rounding: store bf16/fp16 parameters and states rounded stochastically (unbiased)
            instead of to nearest, so updates and decay far below half an ulp still act on average;
            fp32/fp64 tensors are unaffected. Bits are a hash of (seed, parameter, step, element):
            every backend gives the same bits (wdopt/reference/rounding.py). Adds state ``rng``.
        rounding_seed: the integer the parameters' random streams derive from (saved in ``rng``).
        master_weight_bits: 16 (plain parameters), or 24/32 for bf16 parameters with a master
            weight of that precision: the bf16 parameter plus its low bits in state ``correction``
            (int8/int16), 1 or 2 bytes more per parameter (``master_weight``, ``set_master_weight``).
        state_bits: None (states in the parameter's dtype, as torch) or 8: each state one byte per
            element plus a float32 scale per 256 (wdopt/reference/quantization.py); a torch.optim
            state dict loads (quantized at the next step), ``to_torch_state_dict`` goes back.
        foreach, fused: accepted for compatibility with torch.optim calls; they have no effect.
        differentiable: must be False.
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
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
        betas = check_betas(betas)
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=True, decay_scaling=decay_scaling, backend=backend,
            stochastic_rounding=stochastic_rounding, rounding_seed=rounding_seed,
            master_weight_bits=master_weight_bits, state_bits=state_bits,
        )
        super().__init__(params, defaults)

    def _check_group(self, group, constructing=True):
        check_common(group["lr"], group["weight_decay"], group["decay_scaling"], group["backend"],
                     group["differentiable"], constructing)
        check_rounding(group, type(self).__name__, self._stochastic_rounding_supported, self._state_bits_supported)
        group["betas"] = check_betas(group["betas"])
        if not 0.0 <= group["eps"]:
            raise ValueError(f"Invalid epsilon value: {group['eps']}")

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True  # what torch.optim.AdamW's own groups say

    _state_tensors = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _required_state = ("step", "exp_avg", "exp_avg_sq")  # max_exp_avg_sq is made when amsgrad is turned on

    _quantized_states = {"exp_avg": torch.int8, "exp_avg_sq": torch.uint8, "max_exp_avg_sq": torch.uint8}

    def _init_state(self, p, group):
        state = self.state[p]
        if _fresh(state):
            state["step"] = _step_tensor(0.0, p.device)
            state["exp_avg"] = self._zeros_state(p, group, "exp_avg")
            state["exp_avg_sq"] = self._zeros_state(p, group, "exp_avg_sq")
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = self._zeros_state(p, group, "max_exp_avg_sq")

    _fast_kind = "adamw"
    _statistics_kind = "adamw"

    def _fast_constants(self, group):
        beta1, beta2 = group["betas"]
        return [float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"])], \
            [int(group["amsgrad"]), int(group["maximize"])]

    def _state_lists(self, group, params, states):
        keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq")
        return {key: [s[key] for s in states] for key in keys}, [s["step"] for s in states], [None] * len(params)

    def _update(self, group, backend, params, grads, grad_scale, found_inf, kernel_ready, telemetry=()):
        self._run_bucket(group, backend, params, grads, grad_scale, found_inf, kernel_ready, telemetry)

    def _launch(self, backend, group, params, grads, lists, steps, first_steps, lr, decay_lr_scale, grad_scale,
                found_inf, **extra):
        beta1, beta2 = group["betas"]
        amsgrad = group["amsgrad"]
        return backend.adamw(
            params, grads, lists["exp_avg"], lists["exp_avg_sq"],
            lists["max_exp_avg_sq"] if amsgrad else (), steps,  # () is never read without amsgrad
            lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            decay_lr_scale=decay_lr_scale, amsgrad=amsgrad, maximize=group["maximize"], grad_scale=grad_scale,
            found_inf=found_inf, **extra)
