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
