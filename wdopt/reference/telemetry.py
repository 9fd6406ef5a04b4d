"""Rotation telemetry: the per-row sums every backend's kernels accumulate during a step, and the
quantities the monitor derives from them (docs/theory.md section 5). This is the specification.

A monitored step hands the kernel, per parameter, a float64 buffer of shape (K, 4), K the number of
rows (``telemetry_rows``): row r is elements [r·C, (r+1)·C) of the contiguous parameter, C = numel/K.
The kernel overwrites row r of the buffer with

    [ Σ ω²,  Σ ω·Δω,  Σ Δω²,  Σ ĝ² ]                           (the columns W2, WD, D2, G2)

ω the parameter as stored before the step, Δω = (the parameter as stored after the step) − ω,
ĝ the gradient the optimizer used, unscaled (g / grad_scale; its sign does not matter). This
function computes them in float64. A kernel may form the products and partial sums of up to 1024
elements in its math dtype (fp32 for fp32/bf16/fp16 tensors) and add those in float64 — the CPU
kernels do, to keep a monitored step's vector width: each sum is then exact to a few fp32 ulps of
Σ|term|, which keeps angles to better than 1e-6 rad at the sizes of real updates (tested). The
summation order is the kernel's own, fixed: results are deterministic. When GradScaler skips the
step the buffer is not written.

Derived per row, or per tensor from the column sums:
    weight norm       ‖ω‖ = sqrt(W2)
    angular update    θ = atan2( sqrt(max(W2·D2 − WD², 0)), W2 + WD )   (the angle ω_t, ω_t+1)
    relative update   ‖Δω‖/‖ω‖ = sqrt(D2 / W2)
    ‖g‖·‖ω‖           sqrt(G2 · W2)   (for a scale-invariant tensor: ‖g̃‖, the gradient at unit norm)
The atan2 form keeps angles of 1e-4 rad that arccos of a rounded cosine would lose.
"""

from __future__ import annotations

import math

import torch

W2, WD, D2, G2 = range(4)
COLUMNS = 4


def telemetry_rows(p: torch.Tensor) -> int:
    """Rows (neurons) of a tensor: its first dimension when dim ≥ 2, else the whole tensor."""
    return p.shape[0] if p.dim() >= 2 and p.shape[0] > 0 else 1


def empty_buffer(p: torch.Tensor) -> torch.Tensor:
    """The (K, 4) float64 buffer a kernel fills, on the parameter's device; NaN until written."""
    return torch.full((telemetry_rows(p), COLUMNS), float("nan"), dtype=torch.float64, device=p.device)


@torch.no_grad()
def row_sums(before: torch.Tensor, after: torch.Tensor, grad: torch.Tensor, rows: int,
             grad_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The (rows, 4) sums from snapshots of a parameter before and after its step, and its gradient.
    Complex tensors count as their real pairs."""
    def as_rows(t):
        t = torch.view_as_real(t) if t.is_complex() else t
        return t.detach().reshape(rows, -1).to(torch.float64)

    w = as_rows(before)
    d = as_rows(after) - w
    g = as_rows(grad)
    if grad_scale is not None:
        g = g * (1.0 / grad_scale.to(device=g.device, dtype=torch.float64))
    return torch.stack([(w * w).sum(1), (w * d).sum(1), (d * d).sum(1), (g * g).sum(1)], dim=1)


def derived(sums: torch.Tensor) -> dict[str, torch.Tensor]:
    """Weight norm, angular update, relative update and ‖g‖·‖ω‖ from sums (..., 4)."""
    w2, wd, d2, g2 = sums.unbind(-1)
    cross = torch.clamp(w2 * d2 - wd * wd, min=0.0)
    return {
        "weight_norm": torch.sqrt(w2),
        "angular_update": torch.atan2(torch.sqrt(cross), w2 + wd),
        "relative_update": torch.sqrt(d2 / w2),
        "grad_norm_x_weight_norm": torch.sqrt(g2 * w2),
    }


# ---------------------------------------------------------------------- direction statistics
#
# What the refined equilibrium predictor (wdopt.theory.refined, docs/theory.md section 2.4) needs
# beyond the four sums: per row, statistics of the *gradient and the optimizer's state before the
# step* — not of the update, so that a prediction made from them is not the norm balance restated.
# Each optimizer's update is made from a per-element "direction" n and its momentum s before the
# step, in the same units: AdamW n = ĝ/(sqrt(v̂)+ε), s = m/(sqrt(v̂)+ε) (v̂ this step's); SGD n = ĝ,
# s = the momentum buffer; Lion n = c = β1·m + (1−β1)·ĝ (the update is its sign), s = m. Per row:
#
#     [ Σ n²,  Σ n·s,  Σ ω·n,  Σ s² ]                              (the columns N2, NS, WN, S2)
#
# N2 is the direction's power, NS its correlation with its own past (through the momentum), WN its
# radial part (zero for a scale-invariant tensor's raw gradient; not for Adam's normalised one),
# S2 the momentum's power.
N2, NS, WN, S2 = range(4)
STATISTICS = 4


@torch.no_grad()
def direction(kind: str, group: dict, grad: torch.Tensor, state: dict,
              grad_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, s) of one parameter in float64, from its gradient and its state *before* the step."""
    g = grad.detach().to(torch.float64)
    if group.get("maximize"):
        g = -g
    if grad_scale is not None:
        g = g * (1.0 / grad_scale.to(device=g.device, dtype=torch.float64))

    def old(key):
        t = state.get(key)
        return torch.zeros_like(g) if t is None else t.detach().to(torch.float64)

    if kind == "adamw":
        beta2 = float(group["betas"][1])
        step = float(state.get("step", 0)) + 1
        v = old("exp_avg_sq") * beta2 + (1 - beta2) * g * g
        if group.get("amsgrad"):
            v = torch.maximum(old("max_exp_avg_sq"), v)
        denom = v.sqrt() / math.sqrt(1 - beta2**step) + float(group["eps"])
        return g / denom, old("exp_avg") / denom
    if kind == "sgd":
        return g, old("momentum_buffer")
    if kind == "lion":
        beta1 = float(group["betas"][0])
        m = old("exp_avg")
        return m + (1 - beta1) * (g - m), m
    raise ValueError(f"no direction statistics for optimizer kind {kind!r}")


@torch.no_grad()
def direction_sums(weight: torch.Tensor, n: torch.Tensor, s: torch.Tensor, rows: int) -> torch.Tensor:
    """The (rows, 4) sums [Σn², Σn·s, Σω·n, Σs²] of ``weight`` (before the step) and its (n, s)."""
    w = weight.detach().reshape(rows, -1).to(torch.float64)
    n, s = n.reshape(rows, -1), s.reshape(rows, -1)
    return torch.stack([(n * n).sum(1), (n * s).sum(1), (w * n).sum(1), (s * s).sum(1)], dim=1)
