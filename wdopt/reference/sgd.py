"""SGD with momentum, as torch.optim.SGD defines it, plus decoupled decay (SGDW).

    g ← −g if maximize;  g ← g / grad_scale under GradScaler
    g ← g + λ·p                                   (L2, torch's default)
    p ← p·(1 − d)                                 (decoupled_weight_decay=True instead of L2)
    b ← g on the first step, else b ← μ·b + (1 − dampening)·g        (μ ≠ 0)
    g ← g + μ·b if nesterov else b
    p ← p − lr·g
"""

from __future__ import annotations

import torch

from ._common import compute_dtype, decay_factor, scalar, step_skipped, unscaled


@torch.no_grad()
def sgd_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
    first_step: bool,
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    decoupled_weight_decay: bool = False,
    decay_lr_scale: float = 1.0,
    maximize: bool = False,
    grad_scale: torch.Tensor | None = None,
) -> None:
    """One SGD step on one real tensor, in place. ``first_step``: the buffer holds no history yet."""
    dt = compute_dtype(param)
    g = unscaled(grad, dt, grad_scale, maximize)
    p = param.to(dt)
    if decoupled_weight_decay:
        p = p * scalar(decay_factor(lr, weight_decay, decay_lr_scale), dt)
    elif weight_decay != 0:
        g = g + scalar(weight_decay, dt) * p
    if momentum != 0:
        if first_step:
            b = g
        else:
            b = momentum_buffer.to(dt) * scalar(momentum, dt) + scalar(1.0 - dampening, dt) * g
        momentum_buffer.copy_(b)
        g = g + scalar(momentum, dt) * b if nesterov else b
    param.copy_(p - scalar(lr, dt) * g)


def sgd(
    params, grads, momentum_buffers, first_steps,
    *, lr, weight_decay, momentum, dampening, nesterov, decoupled_weight_decay, decay_lr_scale,
    maximize, grad_scale=None, found_inf=None,
) -> None:
    """The reference backend: ``sgd_step`` on each tensor. ``first_steps``: per buffer, None (it has
    history) or the optimizer's 0-d flag tensor, nonzero while it has none (read on the host here:
    the reference backend syncs)."""
    if step_skipped(found_inf):
        return
    lr = float(lr)
    for i, param in enumerate(params):
        sgd_step(
            param, grads[i], momentum_buffers[i], first_steps[i] is not None and bool(first_steps[i]), lr=lr,
            weight_decay=weight_decay, momentum=momentum, dampening=dampening, nesterov=nesterov,
            decoupled_weight_decay=decoupled_weight_decay, decay_lr_scale=decay_lr_scale,
            maximize=maximize, grad_scale=grad_scale,
        )
