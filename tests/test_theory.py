"""wdopt.theory against the model it assumes, simulated: the reference optimizers step a layer of
scale-invariant neurons on pure-noise gradients g = (I − ω̂ω̂ᵀ)ξ/‖ω‖, ξ ~ N(0, I), for several
relaxation times; the measured equilibrium norm, angular update and relaxation time must match
the formulas.

Tolerance: 4 standard errors of the simulated estimate (batch means over the equilibrium window,
across neurons), plus 3% for the model's first-order approximations, which hold when the decay
fraction d is small against 1 − β (the momentum's horizon is shorter than the relaxation time);
the hyperparameters below are in that regime."""

from __future__ import annotations

import math

import pytest
import torch

import wdopt
from wdopt import theory

K, C = 128, 64  # neurons, elements per neuron
MODEL_ALLOWANCE = 0.03


def simulate(opt_factory, steps, init_norm, seed=0, measure_from=0):
    """Per step from ``measure_from`` on: every neuron's norm after the step, and its angle to the
    neuron before the step; and E‖g̃‖² over all steps. (The steps before an equilibrium window are
    not measured: that halves the time of the longest runs, whose trajectory is the same.)"""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(K, C, generator=g, dtype=torch.float64)
    w = (w / w.norm(dim=1, keepdim=True) * init_norm).requires_grad_()
    opt = opt_factory([w])
    norms, angles, unit_grad_sq = [], [], torch.zeros((), dtype=torch.float64)
    for step in range(steps):
        measured = step >= measure_from
        with torch.no_grad():
            norm = w.norm(dim=1, keepdim=True)
            direction = w / norm
            before = w.detach().clone() if measured else None
            xi = torch.randn(K, C, generator=g, dtype=torch.float64)
            w.grad = (xi - (xi * direction).sum(1, keepdim=True) * direction) / norm
            unit_grad_sq += ((w.grad.norm(dim=1) * norm[:, 0]) ** 2).mean()
        opt.step()
        if measured:
            with torch.no_grad():
                delta = w.detach() - before
                ww, wd, dd = (before * before).sum(1), (before * delta).sum(1), (delta * delta).sum(1)
                angles.append(torch.atan2(torch.sqrt(torch.clamp(ww * dd - wd * wd, min=0)), ww + wd))
                norms.append(w.detach().norm(dim=1))
    return torch.stack(norms), torch.stack(angles), unit_grad_sq.item() / steps


def mean_and_se(values: torch.Tensor, blocks: int = 10) -> tuple[float, float]:
    """Mean over (steps × neurons) and its standard error from batch means over time."""
    per_step = values.mean(dim=1)
    usable = per_step[: per_step.numel() // blocks * blocks].reshape(blocks, -1).mean(dim=1)
    return per_step.mean().item(), (usable.std() / math.sqrt(blocks)).item()


def assert_matches(measured: float, se: float, predicted: float, what: str):
    tolerance = 4 * se + MODEL_ALLOWANCE * abs(predicted)
    assert abs(measured - predicted) <= tolerance, f"{what}: measured {measured:.5g}, predicted {predicted:.5g}, " \
                                                   f"tolerance {tolerance:.3g} (SE {se:.2g})"


CASES = {
    # name: (factory(lr, wd), lr, weight decay, prediction(lr, d, measured E‖g̃‖²))
    # β2 = 0.99: Adam's second-moment horizon (100 steps) well inside the relaxation time (500).
    "adamw": (lambda lr, wd: (lambda ps: wdopt.FusedAdamW(ps, lr=lr, betas=(0.9, 0.99), weight_decay=wd,
                                                          backend="reference")),
              1e-2, 0.1, lambda lr, d, g2: theory.adamw_equilibrium(lr, d, C, (0.9, 0.99))),
    "sgd": (lambda lr, wd: (lambda ps: wdopt.FusedSGD(ps, lr=lr, momentum=0.9, weight_decay=wd, backend="reference")),
            0.1, 0.0025, lambda lr, d, g2: theory.sgd_equilibrium(lr, d, g2, 0.9)),
    "lion": (lambda lr, wd: (lambda ps: wdopt.FusedLion(ps, lr=lr, weight_decay=wd, backend="reference")),
             1e-3, 0.3, lambda lr, d, g2: theory.lion_equilibrium(lr, d, C)),
}


@pytest.mark.parametrize("name", CASES)
def test_equilibrium_norm_and_angular_update(name):
    factory, lr, wd, prediction = CASES[name]
    d = lr * wd
    tau = prediction(lr, d, 1.0).time_constant
    steps = int(8 * tau)
    # Start at the predicted norm (SGD's needs E‖g̃‖², C−1 for this noise: measured below).
    start = prediction(lr, d, C - 1.0).norm
    # The window: after five relaxation times.
    norms, angles, unit_grad_sq = simulate(factory(lr, wd), steps, start, measure_from=int(5 * tau))
    predicted = prediction(lr, d, unit_grad_sq)
    rms, rms_se = mean_and_se(norms ** 2)
    assert_matches(math.sqrt(rms), rms_se / (2 * math.sqrt(rms)), predicted.norm, f"{name} equilibrium norm")
    angle, angle_se = mean_and_se(angles)
    assert_matches(angle, angle_se, predicted.angular_update, f"{name} angular update")


@pytest.mark.parametrize("name", CASES)
def test_relaxation_time(name):
    """From 3× the equilibrium norm, the excess decays as exp(−t/τ): ‖ω‖² for decoupled decay,
    ‖ω‖⁴ for SGD's L2 through momentum (docs/theory.md §2.2). τ is fitted over the first 2τ steps, after
    SGD's momentum buffer has filled (1/(1−μ) steps)."""
    factory, lr, wd, prediction = CASES[name]
    d = lr * wd
    predicted = prediction(lr, d, C - 1.0)
    steps = int(2 * predicted.time_constant)
    norms, _, unit_grad_sq = simulate(factory(lr, wd), steps, 3 * predicted.norm, seed=1)
    predicted = prediction(lr, d, unit_grad_sq)
    power, skip = (4, 10) if name == "sgd" else (2, 0)
    excess = ((norms**power).mean(dim=1) - predicted.norm**power)[skip:]
    t = torch.arange(skip + 1, steps + 1, dtype=torch.float64)
    slope = -(torch.log(excess) * (t - t.mean())).sum() / ((t - t.mean()) ** 2).sum()
    measured_tau = 1 / slope.item()
    # The fit's statistical error is tiny (128 neurons, a deterministic-dominated decay): the
    # allowance is the model's, plus SGD's transient while its momentum buffer fills.
    assert abs(measured_tau - predicted.time_constant) <= 0.1 * predicted.time_constant, \
        (name, measured_tau, predicted.time_constant)


def test_predict_for_an_optimizer():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
    opt = wdopt.FusedAdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    predictions = theory.predict(opt)
    assert set(predictions) == {model[0].weight, model[2].weight}  # dim ≥ 2 only
    assert predictions[model[0].weight].norm == pytest.approx(math.sqrt(1e-3 * 16 / (2 * 0.1)))
    assert theory.decay_fraction({"lr": 0.5, "weight_decay": 0.2, "decay_scaling": "schedule",
                                  "initial_lr": 1.0}) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="weight decay"):
        theory.adamw_equilibrium(1e-3, 0.0, 16)
