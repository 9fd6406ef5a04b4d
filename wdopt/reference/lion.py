"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), decoupled decay.

    g ← −g if maximize;  g ← g / grad_scale under GradScaler
    c ← m + (1−β1)·(g − m)               (= β1·m + (1−β1)·g)
    p ← p·(1 − d) − lr·sign(c)
    m ← m + (1−β2)·(g − m)

sign(c) is +1 where c > 0, −1 where c < 0, and c itself otherwise: ±0 stays ±0 and NaN stays NaN.
So a NaN gradient makes the parameter NaN, as torch's AdamW and SGD do; a NaN must not freeze an
element while exp_avg silently holds it (torch.sign(nan) is 0 in torch 2.13, so torch.sign is not
used). An infinite gradient moves p by ±lr and makes m infinite; the next step's c = inf − inf is
NaN, and p becomes NaN then.
"""

from __future__ import annotations

import torch

from .rounding import Rounder
from ._common import compute_dtype, decay_factor, lerp, scalar, step_skipped, unscaled


def sign(c: torch.Tensor) -> torch.Tensor:
    """Lion's sign, NaN-propagating (see the module docstring); the kernels' lion_sign."""
    return torch.where(c > 0, 1.0, torch.where(c < 0, -1.0, c))


def interpolations(g: torch.Tensor, exp_avg: torch.Tensor, beta1: float, beta2: float):
    """c = m + (1−β1)(g − m), whose sign is the update, and the new m = m + (1−β2)(g − m)."""
    dt = g.dtype
    m = exp_avg.to(dt)
    return lerp(m, g, scalar(1.0 - beta1, dt)), lerp(m, g, scalar(1.0 - beta2, dt))


@torch.no_grad()
def lion_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    decay_lr_scale: float = 1.0,
    maximize: bool = False,
    grad_scale: torch.Tensor | None = None,
    rng: torch.Tensor | None = None,
    correction: torch.Tensor | None = None,
    scales: dict | None = None,
) -> None:
    """One Lion step on one real tensor, in place (``rng``, ``correction``, ``scales`` (lane 1:
    exp_avg): as adamw_step's)."""
    dt = compute_dtype(param)
    store = Rounder(rng, param, correction, scales)
    g = unscaled(grad, dt, grad_scale, maximize)
    c, m = interpolations(g, store.load_state(exp_avg, 1, dt), beta1, beta2)
    p = store.load(param, dt) * scalar(decay_factor(lr, weight_decay, decay_lr_scale), dt)
    store.store_param(param, p - scalar(lr, dt) * sign(c))
    store.store_state(exp_avg, m, 1)


def lion(
    params, grads, exp_avgs,
    *, lr, beta1, beta2, weight_decay, decay_lr_scale, maximize, grad_scale=None, found_inf=None, rng=(),
    correction=(), scales=None,
) -> None:
    """The reference backend: ``lion_step`` on each tensor (``rng``, ``correction``, ``scales``: as adamw's)."""
    if step_skipped(found_inf):
        return
    lr = float(lr)
    for i, param in enumerate(params):
        lion_step(
            param, grads[i], exp_avgs[i], lr=lr, beta1=beta1, beta2=beta2,
            weight_decay=weight_decay, decay_lr_scale=decay_lr_scale, maximize=maximize,
            grad_scale=grad_scale, rng=rng[i] if rng else None, correction=correction[i] if correction else None,
            scales={lane: s[i] for lane, s in scales.items()} if scales else None,
        )
