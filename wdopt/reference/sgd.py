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

from .rounding import Rounder
from ._common import compute_dtype, decay_factor, reciprocal, scalar, step_skipped, unscaled


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
    rng: torch.Tensor | None = None,
    correction: torch.Tensor | None = None,
    scales: dict | None = None,
) -> None:
    """One SGD step on one real tensor, in place. ``first_step``: the buffer holds no history yet.
    ``rng``, ``correction`` and ``scales`` (lane 1: momentum_buffer): as adamw_step's."""
    dt = compute_dtype(param)
    store = Rounder(rng, param, correction, scales)
    g = unscaled(grad, dt, grad_scale, maximize)
    p = store.load(param, dt)
    if decoupled_weight_decay:
        p = p * scalar(decay_factor(lr, weight_decay, decay_lr_scale), dt)
    elif weight_decay != 0:
        g = g + scalar(weight_decay, dt) * p
    if momentum != 0:
        if first_step:
            b = g
        else:
            b = store.load_state(momentum_buffer, 1, dt) * scalar(momentum, dt) + scalar(1.0 - dampening, dt) * g
        store.store_state(momentum_buffer, b, 1)
        g = g + scalar(momentum, dt) * b if nesterov else b
    store.store_param(param, p - scalar(lr, dt) * g)


def sgd(
    params, grads, momentum_buffers, first_steps,
    *, lr, weight_decay, momentum, dampening, nesterov, decoupled_weight_decay, decay_lr_scale,
    maximize, grad_scale=None, found_inf=None, rng=(), correction=(), scales=None,
) -> None:
    """The reference backend: ``sgd_step`` on each tensor (``rng``, ``correction``, ``scales``: as adamw's). ``first_steps``: per buffer, None (it has
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
            maximize=maximize, grad_scale=grad_scale, rng=rng[i] if rng else None,
            correction=correction[i] if correction else None,
            scales={lane: s[i] for lane, s in scales.items()} if scales else None,
        )


@torch.no_grad()
def sgd_sparse_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
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
) -> torch.Tensor | None:
    """torch.optim.SGD's single-tensor step for a sparse COO gradient on a dense parameter: the
    same torch ops in the same order (so the same numbers and state layout: a buffer made from a
    sparse gradient is sparse), in the parameter's dtype as torch computes it. ``momentum_buffer``
    None: no history yet. Returns the momentum buffer (None without momentum).

    Decoupled decay (wdopt's SGDW) scales the dense parameter first; L2 decay with a sparse
    gradient raises in torch (add(sparse, dense)), and FusedSGD refuses it before the step."""
    if grad_scale is not None:
        grad = grad * reciprocal(grad_scale.to(grad.device), grad.dtype)
    if maximize:
        grad = -grad
    if decoupled_weight_decay:
        param.mul_(decay_factor(lr, weight_decay, decay_lr_scale))
    elif weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)
    buffer = None
    if momentum != 0:
        buffer = momentum_buffer
        if buffer is None:
            buffer = grad.detach().clone()
        else:
            buffer.mul_(momentum).add_(grad, alpha=1 - dampening)
        grad = grad.add(buffer, alpha=momentum) if nesterov else buffer
    param.add_(grad, alpha=-lr)
    return buffer
