"""AdamW (decoupled weight decay), as torch.optim.AdamW defines it.

    g ← −g if maximize;  g ← g / grad_scale under GradScaler
    p ← p·(1 − d)                      d = lr·λ, or λ·lr/initial_lr with decay_scaling="schedule"
    m ← m + (1−β1)·(g − m)
    v ← β2·v + (1−β2)·g²
    v_max ← max(v_max, v)              (amsgrad; v_max replaces v below)
    p ← p − (lr/(1−β1^t)) · m / (sqrt(v)/sqrt(1−β2^t) + ε)

Rounding, which every backend reproduces: scalars are computed in double and rounded once to the
compute dtype; a division of every element by one scalar (the unscale, sqrt(1−β2^t)) is a
multiplication by that scalar's reciprocal, as in torch.optim; m / denom is a true division; the
square root is correctly rounded.
"""

from __future__ import annotations

import math

import torch

from .rounding import Rounder
from ._common import compute_dtype, decay_factor, lerp, reciprocal, scalar, sqrt, step_skipped, unscaled


def moments(g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, beta1: float, beta2: float):
    """The new first and second moments, m + (1−β1)(g − m) and β2·v + (1−β2)·g², in g's dtype."""
    dt = g.dtype
    m = lerp(exp_avg.to(dt), g, scalar(1.0 - beta1, dt))
    v = exp_avg_sq.to(dt) * scalar(beta2, dt) + scalar(1.0 - beta2, dt) * g * g
    return m, v


@torch.no_grad()
def adamw_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    max_exp_avg_sq: torch.Tensor | None,
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decay_lr_scale: float = 1.0,
    maximize: bool = False,
    grad_scale: torch.Tensor | None = None,
    rng: torch.Tensor | None = None,
    correction: torch.Tensor | None = None,
    scales: dict | None = None,
) -> None:
    """One AdamW step on one real tensor, in place. ``step`` is the count after this step (≥ 1).
    ``rng``: the parameter's (key, count) for stochastic rounding of bf16/fp16 stores;
    ``correction``: the low bits of a compensated bf16 parameter's master weight (rounding.py);
    ``scales``: {lane: block scales} of the 8-bit states (lanes 1-3: exp_avg, exp_avg_sq,
    max_exp_avg_sq; quantization.py)."""
    dt = compute_dtype(param)
    store = Rounder(rng, param, correction, scales)
    g = unscaled(grad, dt, grad_scale, maximize)
    p = store.load(param, dt) * scalar(decay_factor(lr, weight_decay, decay_lr_scale), dt)
    m, v = moments(g, store.load_state(exp_avg, 1, dt), store.load_state(exp_avg_sq, 2, dt), beta1, beta2)
    if max_exp_avg_sq is not None:
        v_max = torch.maximum(store.load_state(max_exp_avg_sq, 3, dt), v)
    else:
        v_max = v
    step_size = lr / (1.0 - beta1**step)
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
    denom = sqrt(v_max) * reciprocal(bias_correction2_sqrt, dt) + scalar(eps, dt)
    p = p - scalar(step_size, dt) * (m / denom)
    if max_exp_avg_sq is not None:
        store.store_state(max_exp_avg_sq, v_max, 3)
    store.store_param(param, p)
    store.store_state(exp_avg, m, 1)
    store.store_state(exp_avg_sq, v, 2)


def adamw(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
    *, lr, beta1, beta2, eps, weight_decay, decay_lr_scale, amsgrad, maximize,
    grad_scale=None, found_inf=None, rng=(), correction=(), scales=None,
) -> None:
    """The reference backend: ``adamw_step`` on each tensor; ``steps`` are advanced here. ``rng``:
    [] (round to nearest) or one (key, count) int64 tensor per parameter (stochastic rounding; the
    caller advances the counts); ``correction``: [] or one per parameter (compensated bf16);
    ``scales``: None or {lane: one block-scale tensor per parameter} for 8-bit states."""
    if step_skipped(found_inf):
        return
    lr = float(lr)
    for i, param in enumerate(params):
        steps[i] += 1
        adamw_step(
            param, grads[i], exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i] if amsgrad else None,
            int(steps[i].item()), lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, decay_lr_scale=decay_lr_scale, maximize=maximize,
            grad_scale=grad_scale, rng=rng[i] if rng else None, correction=correction[i] if correction else None,
            scales={lane: s[i] for lane, s in scales.items()} if scales else None,
        )
