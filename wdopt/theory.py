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
    "lion_rotation_factor", "neurons", "predict", "Refined", "adamw_refined", "sgd_refined", "refined", "window_statistics",
    "lion_linear_response",
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


# ---------------------------------------------------------------------- the refined predictor
#
# docs/theory.md section 2.4. The paper's formulas assume a white-noise gradient of unit
# normalised power per element (AdamW: E[ĝ²/v̂] = 1) and an update with no radial part. A
# training run breaks both, and RotationMonitor(statistics=True) measures by how much, from the
# gradients and the optimizer state (never from the update itself): per row, the direction's
# power Σn², its correlation with the momentum Σn·s and its radial part Σω·n
# (wdopt/reference/telemetry.py). For a momentum that is an exponential average with factor β of
# the directions n, the long-run growth of ‖ω‖² per step (the diffusion) is
#     η²·Q,   Q = E Σn² + 2β/(1−β)·E Σn_t·s_{t−1}       (= C for unit white noise: the paper)
# and one step's E‖u‖² = (1−β)/(1+β)·Q. The radial part adds −2η·E⟨ω, n⟩ per step (through the
# momentum's long-run weight 1). These replace C and 0 in the paper's balance.


@dataclass(frozen=True)
class Refined:
    """The refined equilibrium of one neuron (or, from ``refined``, a tensor's RMS over neurons)."""
    norm: float              # ‖ω‖ at equilibrium
    angular_update: float    # RMS angle per step, sqrt(E‖Δω⊥‖²)/‖ω‖
    time_constant: float     # steps for ‖ω‖² to relax by e (linearised at the equilibrium)
    drive: float             # the measured diffusion relative to the paper's (AdamW: Q/C; SGD: Q̃/E‖g̃‖²)
    radial: float            # AdamW: E⟨ω̂, n⟩; SGD: E⟨ω, g⟩ (0 for an exactly scale-invariant row)

    def as_dict(self) -> dict:
        return asdict(self)


def adamw_refined(lr: float, d: float, power: float, correlation: float, radial: float = 0.0,
                  betas=(0.9, 0.999), neuron_size: int | None = None) -> Refined:
    """AdamW's equilibrium from measured direction statistics of a neuron (n = ĝ/(sqrt(v̂)+ε)):
    ``power`` E Σn², ``correlation`` E Σn_t·m_{t−1}/(sqrt(v̂)+ε), ``radial`` E⟨ω̂, n⟩.

    Q = power + 2β1/(1−β1)·correlation; the norm solves 2d·x + 2η·radial·sqrt(x) = η²Q
    (x = ‖ω‖²), the RMS angle is η·sqrt((1−β1)/(1+β1)·Q)/‖ω̂‖ and the relaxation time
    1/(2d + η·radial/‖ω̂‖). power = C, correlation = radial = 0 give ``adamw_equilibrium``."""
    _check(lr, d)
    beta1 = betas[0]
    _check_beta(beta1, "β1")
    q = power + 2 * beta1 / (1 - beta1) * correlation
    if not q > 0:
        raise ValueError(f"the measured diffusion Q = {q} must be positive")
    r = lr * (-radial + math.sqrt(radial * radial + 2 * d * q)) / (2 * d)
    return Refined(norm=r, angular_update=lr * math.sqrt((1 - beta1) / (1 + beta1) * q) / r,
                   time_constant=1 / (2 * d + lr * radial / r),
                   drive=q / neuron_size if neuron_size else math.nan, radial=radial)


def sgd_refined(lr: float, d: float, power_unit: float, correlation_unit: float, radial: float = 0.0,
                momentum: float = 0.0) -> Refined:
    """SGD's (momentum μ, L2) equilibrium from measured statistics at unit weight norm:
    ``power_unit`` E[‖g‖²‖ω‖²] (the paper's E‖g̃‖²), ``correlation_unit`` E[⟨g_t, b_{t−1}⟩‖ω‖²]
    (b the momentum buffer), ``radial`` E⟨ω, g⟩.

    Q̃ = power_unit + 2μ·correlation_unit; x = ‖ω‖² solves 2d·x² + 2η·radial·x = η²Q̃/(1−μ); the
    RMS angle is η·sqrt(Q̃/(1−μ²))/x and the relaxation time (1−μ)/(4d + 2η·radial/x).
    correlation_unit = radial = 0 give ``sgd_equilibrium``."""
    _check(lr, d)
    _check_beta(momentum, "momentum")
    q = power_unit + 2 * momentum * correlation_unit
    if not q > 0:
        raise ValueError(f"the measured diffusion Q̃ = {q} must be positive")
    x = (-lr * radial + math.sqrt((lr * radial) ** 2 + 2 * d * lr * lr * q / (1 - momentum))) / (2 * d)
    return Refined(norm=math.sqrt(x), angular_update=lr * math.sqrt(q / (1 - momentum**2)) / x,
                   time_constant=(1 - momentum) / (4 * d + 2 * lr * radial / x),
                   drive=q / power_unit if power_unit > 0 else math.nan, radial=radial)


def lion_linear_response(lr: float, d: float, power: float, correlation: float, direction_power: float,
                         neuron_size: int, betas=(0.9, 0.99)) -> Refined:
    """Lion's equilibrium if its sign(c) responded linearly to c (Bussgang, Gaussian c):
    sign(c) ≈ κ·c + white residual, κ² = 2C/(π·E Σc²). With ``power`` E Σĝ², ``correlation``
    E Σĝ_t·m_{t−1} and ``direction_power`` E Σc², the diffusion per step is
    η²·(C + κ²·(T − E Σc²)), T = power + 2β1/(1−β2)·correlation. White unit noise gives the
    paper's η·sqrt(C/(π·d·σ²)) up to the residual's (π/2 − 1)σ².

    **Not a predictor**: on ``wdopt equilibrium-sweep`` its norm errors run from −5% to +119%,
    because the measured radial part of sign(c) is 1.1–1.5× the linear response's (docs/theory.md
    section 2.4). It is here so that the sweep can show that with data."""
    _check(lr, d)
    beta1, beta2 = betas
    _check_beta(beta1, "β1")
    _check_beta(beta2, "β2")
    t = power + 2 * beta1 / (1 - beta2) * correlation
    kappa_sq = 2 * neuron_size / (math.pi * direction_power)
    diffusion = neuron_size + kappa_sq * (t - direction_power)
    if not diffusion > 0:
        raise ValueError(f"the linear response's diffusion {diffusion} must be positive")
    norm = lr * math.sqrt(diffusion / (2 * d))
    paper = 2 * neuron_size / (math.pi * lion_sigma_squared(betas))
    return Refined(norm=norm, angular_update=lr * math.sqrt(neuron_size) / norm, time_constant=1 / (2 * d),
                   drive=diffusion / paper, radial=0.0)


def window_statistics(records, name: str) -> dict[str, torch.Tensor]:
    """Per neuron of tensor ``name``: the statistics ``adamw_refined`` or ``sgd_refined`` take,
    averaged over ``records`` (a list of records with direction statistics, not skipped):
    {"power", "correlation", "radial"} as float64 CPU tensors of shape (K,). AdamW: E Σn²,
    E Σn·s, E⟨ω̂, n⟩; SGD: E[Σg²·‖ω‖²], E[Σg·b·‖ω‖²], E⟨ω, g⟩ (‖ω‖ before the step)."""
    from .reference import telemetry as tm

    w2 = torch.stack([r.sums[name][:, tm.W2].cpu() for r in records])
    st = torch.stack([r.statistics[name].cpu() for r in records])
    n2, ns, wn = st[..., tm.N2], st[..., tm.NS], st[..., tm.WN]
    kind = records[-1].optimizer_kind
    if kind == "adamw":
        return {"power": n2.mean(0), "correlation": ns.mean(0), "radial": (wn / w2.sqrt()).mean(0)}
    if kind == "lion":
        # n is c = β1·m + (1−β1)·ĝ and s is m: the gradient's own correlation with m is (NS − β1·S2)/(1−β1).
        group = records[-1].hyperparameters(name)
        beta1 = float(group["betas"][0])
        d, lr = decay_fraction(group), float(group["lr"])
        g2 = torch.stack([r.sums[name][:, tm.G2].cpu() for r in records])
        wd = torch.stack([r.sums[name][:, tm.WD].cpu() for r in records])
        return {"power": g2.mean(0), "correlation": ((ns - beta1 * st[..., tm.S2]) / (1 - beta1)).mean(0),
                "direction_power": n2.mean(0), "radial": (wn / w2.sqrt()).mean(0),
                # ⟨ω̂, sign(c)⟩ from the update itself (⟨ω, Δω⟩ = −d‖ω‖² − η⟨ω, sign c⟩): a consistency
                # check of the linear response, not an input of any prediction.
                "sign_radial": (-(wd + d * w2) / (lr * w2.sqrt())).mean(0)}
    return {"power": (n2 * w2).mean(0), "correlation": (ns * w2).mean(0), "radial": wn.mean(0)}


def refined(records, names=None, lion: bool = False) -> dict[str, Refined]:
    """Refined predictions for the tensors of ``records`` (RotationMonitor records made with
    ``statistics=True``; one or a list, e.g. a window of ``monitor.history`` before the one to
    predict): {name: Refined}, the norm and angle as RMS over the tensor's neurons of each
    neuron's prediction from its statistics averaged over the records (``window_statistics``),
    with the correlation as a fraction of the power pooled over the tensor's neurons.

    For FusedAdamW (not amsgrad) and FusedSGD (momentum, L2, no nesterov or dampening) tensors of
    dim ≥ 2 with weight decay; the hyperparameters are the last record's (keep lr and λ constant
    over the window: a change of lr, λ, betas, momentum, amsgrad or nesterov inside it raises).
    Only tensors measured in every record are predicted (a parameter without a gradient at a
    recorded step has none there). Lion has none: its update is the sign of a filter of the
    gradient, and the same argument with the sign linearised (``lion_linear_response``, included
    with ``lion=True``) predicts norms from −5% to +119% off on the sweep (docs/theory.md section
    2.4). Reading a record of sharded (DTensor) parameters is a collective: call this on every rank."""
    if isinstance(names, str):
        names = [names]
    records = [records] if not isinstance(records, (list, tuple)) else list(records)
    records = [r for r in records if not r.skipped]
    if not records:
        raise ValueError("refined() needs at least one record that was not skipped")
    last = records[-1]
    if not all(r._with_statistics or r._statistics_request is not None for r in records):
        raise ValueError("refined() needs records with direction statistics: make the monitor with "
                         "wdopt.RotationMonitor(optimizer, ..., statistics=True)")
    kind = last.optimizer_kind
    measured = set.intersection(*(set(r.statistics) & set(r.predictions) for r in records))
    out = {}
    for name in sorted(measured) if names is None else list(names):
        if name not in measured or kind not in ("adamw", "sgd", *(("lion",) if lion else ())):
            continue
        group = last.hyperparameters(name)
        d, lr = decay_fraction(group), float(group["lr"])
        for r in records:
            other = r.hyperparameters(name)
            changed = [key for key in ("betas", "momentum", "amsgrad", "nesterov", "dampening")
                       if other.get(key) != group.get(key)]
            if not (math.isclose(float(other["lr"]), lr, rel_tol=1e-9) and
                    math.isclose(decay_fraction(other), d, rel_tol=1e-9, abs_tol=1e-300)):
                changed.insert(0, "lr or the decay fraction")
            if changed:
                raise ValueError(f"{name}: {', '.join(changed)} changed within the window (step {r.step} against "
                                 f"step {last.step}): the equilibrium moves with them; pass records of constant "
                                 "hyperparameters")
        if d <= 0 or (kind == "adamw" and group.get("amsgrad")) or \
                (kind == "sgd" and (group.get("nesterov") or group.get("dampening") or group.get("decoupled_weight_decay"))):
            continue
        stats = window_statistics(records, name)
        # Each neuron keeps its own power and radial part; the correlation enters relative to the
        # power, pooled over the tensor's neurons: amplified by 2β/(1−β) (18 at β = 0.9; 180 for
        # Lion's β2), one neuron's estimate over a window is too noisy to use alone.
        ratio = float(stats["correlation"].sum() / stats["power"].sum())
        columns = zip(stats["power"].tolist(), (stats["power"] * ratio).tolist(), stats["radial"].tolist())
        try:
            _, c = neurons(last.predictions[name][1])
            if kind == "adamw":
                rows = [adamw_refined(lr, d, a, b, r, group["betas"], c) for a, b, r in columns]
            elif kind == "lion":
                rows = [lion_linear_response(lr, d, a, b, q, c, group["betas"])
                        for a, b, q in zip(stats["power"].tolist(), (stats["power"] * ratio).tolist(),
                                           stats["direction_power"].tolist())]
            else:
                rows = [sgd_refined(lr, d, a, b, r, group["momentum"]) for a, b, r in columns]
        except ValueError:
            # A neuron whose measured diffusion is not positive (a dead or not scale-invariant
            # one) has no equilibrium in this model: neither has its tensor.
            out[name] = Refined(*(math.nan,) * 5)
            continue

        out[name] = Refined(norm=_rms([p.norm for p in rows]), angular_update=_rms([p.angular_update for p in rows]),
                            time_constant=_mean([p.time_constant for p in rows]), drive=_mean([p.drive for p in rows]),
                            radial=_mean([p.radial for p in rows]))
    return out


def _check_beta(beta: float, name: str) -> None:
    if not 0 <= beta < 1:
        raise ValueError(f"the refined equilibrium needs 0 <= {name} < 1 (an average that forgets), got {beta}")


def _rms(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values) / len(values))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
