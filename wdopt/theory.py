"""Rotational equilibrium: what the base optimizers do to a scale-invariant neuron.

Kosson, Messmer & Jaggi, "Rotational Equilibrium: How Weight Decay Balances Learning Across
Neural Networks" (ICML 2024, arXiv 2305.17212); docs/theory.md section 2 of the project.

Model and assumptions. A neuron's weight vector ω (one row of a Linear weight, one conv filter:
C elements) is followed by a normalization, so the loss does not depend on ‖ω‖: its gradient is
orthogonal to ω and scales as 1/‖ω‖. Gradients are dominated by noise (random directions from
step to step). Gradient steps then grow ‖ω‖ (a random walk tangent to the sphere) while weight
decay shrinks it; the two balance at an equilibrium norm, and there the expected angle between ω
before and after one step — the angular update — depends on the hyperparameters alone.

Every prediction takes the per-step decay fraction d: d = lr·λ with torch's decay, or
d = λ·lr/initial_lr with ``decay_scaling="schedule"`` (``decay_fraction`` computes it from an
optimizer's parameter group). In the formulas below ηλ is written as d where it stands for it.

| optimizer | equilibrium norm ‖ω̂‖ | angular update per step | relaxation time (steps) |
|---|---|---|---|
| AdamW | η·sqrt(C / (2d)) (= sqrt(ηC/(2λ)) for d = ηλ) | sqrt(2d·(1−β1)/(1+β1)) | 1/(2d) |
| SGD, momentum μ, L2 | (η²·E‖g̃‖² / (2d(1−μ)))^(1/4) | sqrt(2d/(1+μ)) | (1−μ)/(4d) |
| Lion | η·sqrt(C / (π·d·σ²)), σ² = (1−β1)² + β1²(1−β2)/(1+β2) | sqrt(π/2)·sqrt(2d)·σ | 1/(2d) |
| Adam + L2 | (η·sqrt(C)·‖g̃‖ / (2λ))^(1/3) | depends on ‖g̃‖ | — |

The formulas are first order in d and hold when d ≪ 1 − β (the momentum's and Adam's
second-moment horizons are short against the relaxation time): tests/test_theory.py simulates
the model with the reference optimizers and finds them within a few percent there (Lion at
d = 0.01 with β2 = 0.99, outside it, was 22% off).

g̃ is the gradient the neuron would have at unit norm: for a scale-invariant tensor
‖g‖·‖ω‖ = ‖g̃‖, which a training run can measure. The relaxation time is that of ‖ω‖² for
decoupled decay ((1−2d)^t), and of ‖ω‖² near equilibrium for SGD with L2 through momentum.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

__all__ = [
    "Prediction", "adamw_equilibrium", "sgd_equilibrium", "lion_equilibrium", "adam_l2_equilibrium_norm",
    "lion_sigma_squared", "decay_fraction", "equilibrium_angle", "adamw_rotation_factor", "sgd_rotation_factor",
    "lion_rotation_factor", "neurons", "predict",
]


@dataclass(frozen=True)
class Prediction:
    """Equilibrium of one neuron (or, per element, of a whole tensor)."""
    norm: float              # expected ‖ω‖ per neuron at equilibrium
    angular_update: float    # expected angle (radians) between ω_t and ω_{t+1}
    time_constant: float     # steps for ‖ω‖² to relax by a factor e towards equilibrium

    def as_dict(self) -> dict:
        return asdict(self)


def _check(lr: float, d: float) -> None:
    if not lr > 0:
        raise ValueError(f"equilibrium needs a positive learning rate, got {lr}")
    if not d > 0:
        raise ValueError(f"equilibrium needs weight decay (a positive decay fraction), got d={d}")


def equilibrium_angle(d: float, factor: float) -> float:
    """The angular update per step at equilibrium, sqrt(d·factor), for every optimizer (its
    ``*_rotation_factor``). The rotational optimizers with a capturable tensor lr compute d·factor
    on the device and their kernels take the (correctly rounded) root: the same bits as here."""
    return math.sqrt(d * factor)


def adamw_rotation_factor(betas=(0.9, 0.999)) -> float:
    """AdamW's angular update is sqrt(factor·d) with factor 2(1−β1)/(1+β1)."""
    beta1 = betas[0]
    return 2 * (1 - beta1) / (1 + beta1)


def sgd_rotation_factor(momentum: float = 0.0) -> float:
    """SGD's (momentum μ) angular update is sqrt(factor·d) with factor 2/(1+μ)."""
    return 2 / (1 + momentum)


def lion_rotation_factor(betas=(0.9, 0.99)) -> float:
    """Lion's angular update sqrt(π/2)·sqrt(2d)·σ is sqrt(factor·d) with factor π·σ²."""
    return math.pi * lion_sigma_squared(betas)


def adamw_equilibrium(lr: float, d: float, neuron_size: int, betas=(0.9, 0.999)) -> Prediction:
    """AdamW: ‖ω̂‖ = η·sqrt(C/(2d)), angular update sqrt(2d(1−β1)/(1+β1)), relaxation 1/(2d).

    The update of Adam has about unit size per element (noise-dominated: m/sqrt(v) ≈ ±1 scaled
    by sqrt((1−β1)/(1+β1)) for the momentum's averaging), hence a norm growth of ≈ η²·C·(1−β1)/(1+β1)
    per step against a shrinkage of 2d·‖ω‖²; β1 cancels in the norm after the momentum's
    correlation between steps is counted."""
    _check(lr, d)
    return Prediction(norm=lr * math.sqrt(neuron_size / (2 * d)),
                      angular_update=equilibrium_angle(d, adamw_rotation_factor(betas)),
                      time_constant=1 / (2 * d))


def sgd_equilibrium(lr: float, d: float, grad_norm_sq_unit: float, momentum: float = 0.0) -> Prediction:
    """SGD with momentum μ and L2 (torch's): ‖ω̂‖ = (η²·E‖g̃‖²/(2d(1−μ)))^(1/4),
    angular update sqrt(2d/(1+μ)), relaxation (1−μ)/(4d).

    ``grad_norm_sq_unit`` is E‖g̃‖², the squared gradient norm at unit weight norm
    (‖g‖²·‖ω‖² measured on a scale-invariant tensor)."""
    _check(lr, d)
    if not grad_norm_sq_unit > 0:
        raise ValueError("SGD's equilibrium norm needs the measured E‖g̃‖² > 0")
    return Prediction(norm=(lr**2 * grad_norm_sq_unit / (2 * d * (1 - momentum))) ** 0.25,
                      angular_update=equilibrium_angle(d, sgd_rotation_factor(momentum)),
                      time_constant=(1 - momentum) / (4 * d))


def lion_sigma_squared(betas=(0.9, 0.99)) -> float:
    """σ² = (1−β1)² + β1²(1−β2)/(1+β2): the variance of Lion's interpolated momentum for unit noise."""
    beta1, beta2 = betas
    return (1 - beta1) ** 2 + beta1**2 * (1 - beta2) / (1 + beta2)


def lion_equilibrium(lr: float, d: float, neuron_size: int, betas=(0.9, 0.99)) -> Prediction:
    """Lion: ‖ω̂‖ = η·sqrt(C/(π·d·σ²)), angular update sqrt(π/2)·sqrt(2d)·σ, relaxation 1/(2d)."""
    _check(lr, d)
    sigma_sq = lion_sigma_squared(betas)
    return Prediction(norm=lr * math.sqrt(neuron_size / (math.pi * d * sigma_sq)),
                      angular_update=equilibrium_angle(d, lion_rotation_factor(betas)),
                      time_constant=1 / (2 * d))


def adam_l2_equilibrium_norm(lr: float, weight_decay: float, neuron_size: int, grad_norm_unit: float) -> float:
    """Adam with L2 regularization: ‖ω̂‖ = (η·sqrt(C)·‖g̃‖/(2λ))^(1/3); no hyperparameter-only
    angular update exists."""
    if not (lr > 0 and weight_decay > 0 and grad_norm_unit > 0):
        raise ValueError("Adam+L2's equilibrium norm needs lr, weight_decay and ‖g̃‖ positive")
    return (lr * math.sqrt(neuron_size) * grad_norm_unit / (2 * weight_decay)) ** (1 / 3)


def decay_fraction(group: dict) -> float:
    """d for an optimizer parameter group: lr·λ, or λ·lr/initial_lr with decay_scaling="schedule",
    rounded as the kernels round it: lr·λ·(1/initial_lr) (reads a tensor lr on the host)."""
    lr = float(group["lr"])
    weight_decay = float(group["weight_decay"])
    if group.get("decay_scaling", "lr") == "schedule":
        initial = float(group.get("initial_lr", group.get("decay_initial_lr", lr)))
        return lr * weight_decay * (1.0 / initial)
    return lr * weight_decay


def neurons(p: torch.Tensor) -> tuple[int, int]:
    """(K, C): a tensor of shape K×… has K neurons of C = numel/K elements. Only dim ≥ 2."""
    if p.dim() < 2:
        raise ValueError(f"neurons are rows of tensors with dim >= 2, got shape {tuple(p.shape)}")
    return p.shape[0], p.numel() // p.shape[0]


def predict(optimizer: torch.optim.Optimizer, grad_norm_sq_unit: dict | None = None) -> dict:
    """Predictions for every tensor of dim ≥ 2 of an AdamW, SGD (momentum, L2) or Lion optimizer:
    {param: Prediction} per neuron. SGD needs ``grad_norm_sq_unit`` {param: E‖g̃‖²} (measured)."""
    from .optim import FusedAdamW, FusedLion, FusedSGD

    out = {}
    for group in optimizer.param_groups:
        d = decay_fraction(group)
        lr = float(group["lr"])
        for p in group["params"]:
            if p.dim() < 2 or d == 0:
                continue
            _, c = neurons(p)
            if isinstance(optimizer, (FusedAdamW, torch.optim.AdamW)):
                out[p] = adamw_equilibrium(lr, d, c, group["betas"])
            elif isinstance(optimizer, FusedLion):
                out[p] = lion_equilibrium(lr, d, c, group["betas"])
            elif isinstance(optimizer, (FusedSGD, torch.optim.SGD)):
                if grad_norm_sq_unit is None or p not in grad_norm_sq_unit:
                    raise ValueError("SGD predictions need the measured E‖g̃‖² of each tensor")
                out[p] = sgd_equilibrium(lr, d, grad_norm_sq_unit[p], group["momentum"])
            else:
                raise TypeError(f"no equilibrium prediction for {type(optimizer).__name__}")
    return out
