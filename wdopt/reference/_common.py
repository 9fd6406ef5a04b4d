"""Small helpers shared by the reference implementations."""

from __future__ import annotations

import numpy as np
import torch


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """fp64 math for fp64 tensors, fp32 math for everything else (fp32, bf16, fp16)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def scalar(x: float, dtype: torch.dtype) -> torch.Tensor:
    """A Python double rounded once to the compute dtype, as the kernels receive it."""
    return torch.tensor(x, dtype=torch.float64).to(dtype)


def step_skipped(found_inf: torch.Tensor | None) -> bool:
    """GradScaler found an inf/nan: the whole step is skipped (the reference may sync)."""
    return found_inf is not None and bool(found_inf.item() != 0)


def reciprocal(x: float | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """1/x in the compute dtype, from x rounded to it. Dividing many elements by one scalar is
    done as a multiplication by its reciprocal, as torch's own kernels do (torch's CPU division by
    a scalar, GradScaler's unscale): it is what lets the fused kernels match torch.optim."""
    x = x.to(dtype) if isinstance(x, torch.Tensor) else scalar(x, dtype)
    return 1 / x


def sqrt(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded square root, as every hardware sqrt instruction gives it. torch's CPU
    sqrt is vectorized with SLEEF (within 0.5001 ulp, not always the nearest float: about 0.6% of
    random inputs differ by an ulp), so on the CPU the root is taken by numpy (IEEE)."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.asarray(np.sqrt(x.numpy())))  # asarray: 0-d stays an array
    return torch.sqrt(x)


def unscaled(grad: torch.Tensor, dtype: torch.dtype, grad_scale: torch.Tensor | None, maximize: bool) -> torch.Tensor:
    g = grad.to(dtype)
    if grad_scale is not None:
        g = g * reciprocal(grad_scale.to(g.device), dtype)
    return -g if maximize else g


def lerp(start: torch.Tensor, end: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """start + weight·(end − start): the exponential moving average used by Adam and Lion."""
    return start + weight * (end - start)


def decay_factor(lr: float, weight_decay: float, decay_lr_scale: float) -> float:
    """1 − d, with d the per-step decay fraction: lr·λ (torch) or λ·lr/initial_lr (schedule)."""
    return 1.0 - lr * weight_decay * decay_lr_scale
