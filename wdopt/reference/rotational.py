"""Rotational variants (RV) of the base optimizers: the specification (docs/theory.md section 3).

Each rotational neuron (a row of the tensor viewed as K×C, or the whole tensor when not
per_neuron) is kept at its norm n, frozen at its first step, and rotated by the equilibrium
angle of the base optimizer from the first step on:

    u ← the base optimizer's update direction, without weight decay and without −η
    u ← u − mean(u)                                  (zero_mean)
    u ← u − p·⟨u, p⟩/n²                              (the tangent part)
    s ← norm_decay·s + (1−norm_decay)·‖u‖²;   ū ← sqrt(s/(1 − norm_decay^k))
    p ← p − η_r·n·u/(ū + ε);     p ← p·n/‖p‖        (back on the sphere; re-centred first with
                                                       zero_mean, against rounding drift)

Projected mode, for projected optimization on the sphere: p ← n·(p − η·u)/‖p − η·u‖ with the
same centred tangent u. Math in fp32 (fp64 for fp64 tensors), per-row reductions in that type.

Low precision (rounding.py, quantization.py) enters only where arrays are read and written, as in
the base optimizers, through one ``Rounder`` shared by the direction and the rotation: p is loaded
as its master weight when compensated and stored (lane 0) stochastically, or split into bf16 and
correction; the base optimizer's states are stored in their lanes (1, 2) stochastically or as
8-bit codes. The rotational state (n, s, k) is in the math dtype and rounds nothing.
"""

from __future__ import annotations

import math

import torch

from ._common import compute_dtype, reciprocal, scalar, sqrt, unscaled
from .adamw import moments
from .lion import interpolations, sign
from .rounding import Rounder


def rows(t: torch.Tensor, per_neuron: bool) -> torch.Tensor:
    """The tensor as K×C (one row per neuron), or 1×N for a whole-tensor sphere."""
    # The row length spelled out: -1 is ambiguous for zero rows (an empty shard of a DTensor).
    return t.reshape(t.shape[0], math.prod(t.shape[1:])) if per_neuron else t.reshape(1, -1)


def centre_(p: torch.Tensor, per_neuron: bool) -> None:
    """p ← (p − mean(p))·‖p‖/‖p − mean(p)‖ per row: zero mean, same norm (at construction).
    Rows already centred to rounding are left as they are, so that building the optimizer again
    over trained weights (to resume from a checkpoint) changes nothing."""
    with torch.no_grad():
        dt = compute_dtype(p)
        r = rows(p.detach(), per_neuron).to(dt)
        mean = r.mean(dim=1, keepdim=True)
        rounding = 4 * torch.finfo(p.dtype).eps * r.abs().amax(dim=1, keepdim=True)
        if bool((mean.abs() <= rounding).all()):
            return
        centred = r - mean
        rescaled = centred * (r.norm(dim=1, keepdim=True) / centred.norm(dim=1, keepdim=True))
        p.copy_(torch.where(mean.abs() <= rounding, r, rescaled).reshape(p.shape))


def _store(store, param):
    return Rounder(None, param) if store is None else store


def adamw_direction(grad, exp_avg, exp_avg_sq, step, *, beta1, beta2, eps, maximize, grad_scale, store=None):
    """Adam's update direction m̂/(sqrt(v̂)+ε), with m and v updated in place (as in adamw_step);
    ``store``: the parameter's Rounder (low-precision states), None to round to nearest."""
    dt = compute_dtype(grad)
    store = _store(store, grad)
    g = unscaled(grad, dt, grad_scale, maximize)
    m, v = moments(g, store.load_state(exp_avg, 1, dt), store.load_state(exp_avg_sq, 2, dt), beta1, beta2)
    store.store_state(exp_avg, m, 1)
    store.store_state(exp_avg_sq, v, 2)
    denom = sqrt(v) * reciprocal(math.sqrt(1.0 - beta2**step), dt) + scalar(eps, dt)
    return (m * reciprocal(1.0 - beta1**step, dt)) / denom


def sgd_direction(grad, momentum_buffer, first_step, *, momentum, nesterov, maximize, grad_scale, store=None):
    """SGD's momentum direction fed with g only (no L2 term, no dampening)."""
    dt = compute_dtype(grad)
    g = unscaled(grad, dt, grad_scale, maximize)
    if momentum == 0:
        return g
    store = _store(store, grad)
    b = g if first_step else store.load_state(momentum_buffer, 1, dt) * scalar(momentum, dt) + g
    store.store_state(momentum_buffer, b, 1)
    return g + scalar(momentum, dt) * b if nesterov else b


def lion_direction(grad, exp_avg, *, beta1, beta2, maximize, grad_scale, store=None):
    """sign(β1·m + (1−β1)·g), with m updated in place. Lion's NaN-propagating sign: a NaN gradient
    gives a NaN direction, which makes its whole row NaN (the row's norms are NaN)."""
    dt = compute_dtype(grad)
    store = _store(store, grad)
    g = unscaled(grad, dt, grad_scale, maximize)
    c, m = interpolations(g, store.load_state(exp_avg, 1, dt), beta1, beta2)
    store.store_state(exp_avg, m, 1)
    return sign(c)


def init_state(param: torch.Tensor, state: dict, per_neuron: bool) -> None:
    """The rotational state of a tensor: per row its frozen norm n (set by the first step) and the
    running average s of ‖u‖², in the compute dtype; the rotational step count k."""
    k = param.shape[0] if per_neuron else 1
    state["rotational_norm"] = torch.zeros(k, dtype=compute_dtype(param), device=param.device)
    state["update_norm_avg"] = torch.zeros(k, dtype=compute_dtype(param), device=param.device)
    state["rotational_step"] = torch.zeros((), dtype=torch.float32, device=param.device)


@torch.no_grad()
def rotate_(param, direction, state, *, angle, lr, norm_decay, eps, zero_mean, per_neuron, mode, store=None) -> None:
    """Apply one RV step to ``param`` given the base direction; ``state`` holds ``rotational_norm``
    (n per row, set at the first step), ``update_norm_avg`` (s per row) and ``rotational_step`` (k);
    ``store``: the parameter's Rounder (stochastic rounding, compensation), None to round to nearest."""
    dt = compute_dtype(param)
    store = _store(store, param)
    p = rows(store.load(param, dt), per_neuron)
    u = rows(direction, per_neuron).to(dt)
    if "rotational_norm" not in state:
        init_state(param, state, per_neuron)
    if state["rotational_step"].item() == 0:  # the first step freezes each row's (centred) norm
        state["rotational_norm"].copy_((p - p.mean(dim=1, keepdim=True) if zero_mean else p).norm(dim=1))
    state["rotational_step"] += 1
    k = int(state["rotational_step"].item())
    n = state["rotational_norm"].to(dt).unsqueeze(1)
    if zero_mean:
        u = u - u.mean(dim=1, keepdim=True)
    u = u - p * torch.nan_to_num((u * p).sum(dim=1, keepdim=True) / (n * n))  # n = 0: nothing radial
    if mode == "projected":
        p = _onto_sphere(p - scalar(lr, dt) * u, n, zero_mean)
    else:
        s = state["update_norm_avg"].to(dt) * scalar(norm_decay, dt) + scalar(1.0 - norm_decay, dt) * (u * u).sum(dim=1)
        state["update_norm_avg"].copy_(s)
        u_bar = torch.sqrt(s / scalar(1.0 - norm_decay**k, dt)).unsqueeze(1)
        p = _onto_sphere(p - scalar(angle, dt) * n * u / (u_bar + scalar(eps, dt)), n, zero_mean)
    store.store_param(param, p.reshape(param.shape))


def _onto_sphere(p: torch.Tensor, n: torch.Tensor, zero_mean: bool) -> torch.Tensor:
    """Back onto the sphere of radius n (and, with zero_mean, the zero-mean hyperplane). In exact
    arithmetic p is already centred; re-centring removes the rounding drift, which a nearly
    constant u (Adam's first step on same-signed gradients) amplifies when it is centred and
    normalised."""
    if zero_mean:
        p = p - p.mean(dim=1, keepdim=True)
    norm = p.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, p * (n / norm), p)  # a zero row (n = 0) stays zero
