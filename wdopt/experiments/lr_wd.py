"""``wdopt lr-wd``: the learning rate swept at a constant product η·λ, AdamW against RotationalAdamW.

Setup. The ConvNet (BatchNorm after every conv: scale-invariant conv filters) learns the digits
with 20% of the training labels randomised and mini-batches of 32, so the loss cannot collapse
to zero and gradients stay noise-dominated. Five learning rates spaced geometrically over a 30×
range are each paired with λ = c/η (c = η·λ fixed, default 1.5e-3, a time constant 1/(2c) ≈ 330
steps), and AdamW and RotationalAdamW train from the same initialisation on the same batches at
a constant rate. Reported per (optimizer, lr): the final training loss (mean over the last 10%
of steps), the test accuracy, and the conv layers' mean angular update over the last 20% of
steps against the predicted sqrt(2ηλ(1−β1)/(1+β1)) (the same for every lr in the sweep).

Claim (Kosson et al. 2024): at equilibrium a scale-invariant neuron's angular update depends on
η·λ only (its norm scales with η, sqrt(ηC/(2λ)) = η·sqrt(C/(2ηλ))), so at constant η·λ the
scale-invariant layers learn at the same rate whatever η; only the transient before equilibrium
(AdamW starts at the initial norm, not the equilibrium one) and the parameters that are not
scale-invariant (classifier, BatchNorm gains and biases, whose step is ∝ η) change with η. The
rotational variant removes the transient, so it should be the less lr-sensitive of the two where
the transient matters. Assumption: noise-dominated gradients, ηλ ≪ 1 − β1.
"""

from __future__ import annotations

import math

import torch

from ..telemetry import RotationMonitor
from . import data, harness
from .models import ConvNet

NAME = "lr-wd"
HELP = "learning rate swept at constant η·λ: AdamW vs RotationalAdamW sensitivity"

PRESETS = {
    "default": {"steps": 1500, "batch": 32, "width": 16, "every": 10, "lr": 3e-3, "weight_decay": 0.5,
                "range": 30.0, "points": 5},
    "quick": {"steps": 150, "batch": 32, "width": 8, "every": 5, "lr": 1e-2, "weight_decay": 1.0,
              "range": 30.0, "points": 3},
    "gpu": {"steps": 6000, "batch": 128, "width": 64, "every": 10, "lr": 1e-3, "weight_decay": 1.0,
            "range": 30.0, "points": 5},
}
LABEL_NOISE = 0.2
LAYERS = ConvNet.scale_invariant
BETAS = (0.9, 0.999)


def add_arguments(parser) -> None:
    harness.add_common_arguments(parser, optimizers=("adamw", "rotational-adamw"))
    parser.add_argument("--points", type=int, default=None, help="learning rates in the sweep (default 5)")


def sweep(center: float, spread: float, points: int) -> list[float]:
    """``points`` learning rates spaced geometrically over a ``spread``× range, centred on ``center``."""
    if points == 1:
        return [center]
    return [center * spread ** (i / (points - 1) - 0.5) for i in range(points)]


def train(run: harness.Run, name: str, lr: float, wd: float, label: str, bar):
    x, y, x_test, y_test = harness.digits(run, LABEL_NOISE)
    torch.manual_seed(run.args.seed)
    model = ConvNet(run["width"]).to(run.device)
    names = dict(model.named_parameters())
    rotate_only = ConvNet.scale_invariant if name.startswith("rotational") else None
    opt = harness.make_optimizer(name, harness.param_groups(model, wd, rotate_only), lr, wd, run.args.backend,
                                 betas=BETAS)
    monitor = RotationMonitor(opt, every=run["every"], names=names)
    batches = data.Batches(x, y, run["batch"], seed=run.args.seed + 1)

    def measure(record):
        row = {}
        for layer in LAYERS:
            t = record.tensor(layer)
            row[f"{layer}:angle"] = t["neuron_angular_update_mean"]
            row[f"{layer}:norm"] = t["neuron_norm_rms"]
        return row

    losses, series = harness.train_classifier(run, model, opt, monitor, batches, label, bar, measure)
    test_loss, test_acc = harness.accuracy(model, x_test, y_test)
    return model, losses, series, test_acc, test_loss


def run(args) -> dict:
    run = harness.Run(NAME, args, PRESETS)
    steps, lr0, wd0 = run["steps"], run["lr"], run["weight_decay"]
    product = lr0 * wd0
    points = args.points or run["points"]
    lrs = sweep(lr0, run["range"], points)
    names = run.optimizers(("adamw", "rotational-adamw"))
    plan = [(name, lr) for name in names for lr in lrs]
    bar = run.progress(steps * len(plan), NAME)
    predicted_angle = math.sqrt(2 * product * (1 - BETAS[0]) / (1 + BETAS[0]))
    rows, curves, weights = [], {}, {}
    for name, lr in plan:
        wd = product / lr
        label = f"{name} lr={lr:.3g}"
        bar.set_postfix_str(label)
        model, losses, series, test_acc, test_loss = train(run, name, lr, wd, label, bar)
        curves[label] = series
        weights[label] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        tail = [r for r in series if r["step"] > 0.8 * steps]
        angle = sum(r[f"{layer}:angle"] for r in tail for layer in LAYERS) / (len(tail) * len(LAYERS))
        rows.append({"optimizer": name, "lr": lr, "weight_decay": wd, "lr_times_wd": product,
                     "final_loss": harness.tail_mean(losses, 0.1), "test_accuracy": test_acc, "test_loss": test_loss,
                     "conv_angle_final": angle, "predicted_angle": predicted_angle,
                     "angle_error": harness.relative_error(angle, predicted_angle)})
    bar.close()
    sensitivity = []
    for name in names:
        mine = [r for r in rows if r["optimizer"] == name]
        losses = [r["final_loss"] for r in mine]
        accs = [r["test_accuracy"] for r in mine]
        sensitivity.append({"optimizer": name, "final_loss_range": max(losses) - min(losses),
                            "test_accuracy_range": max(accs) - min(accs)})
    columns = ["optimizer", "lr", "weight_decay", "final_loss", "test_accuracy", "conv_angle_final", "predicted_angle",
               "angle_error"]
    notes = ["", f"η·λ = {product:g} throughout, {steps} steps, constant lr; conv_angle_final: mean angular update "
             "of the conv layers over the last 20% of steps."]
    notes += [f"{s['optimizer']}: final loss range over the sweep {s['final_loss_range']:.4f}, test accuracy range "
              f"{s['test_accuracy_range']:.4f}" for s in sensitivity]
    relaxation = 1 / (2 * product)  # AdamW's, wdopt.theory; the same at every point of the sweep
    span = harness.steps_in_relaxation_times(steps, relaxation)
    for r in rows:
        # The rotational variant enforces the equilibrium angle from its first step: no transient.
        r["at_equilibrium"] = r["optimizer"].startswith("rotational") or span >= harness.MIN_RELAXATION_TIMES
    if span < harness.MIN_RELAXATION_TIMES:
        notes.append(f"the run spans {span:.2g} relaxation times 1/(2ηλ) (< {harness.MIN_RELAXATION_TIMES:g}): "
                     "AdamW is not at equilibrium yet")
    summary = {"rows": rows, "sensitivity": sensitivity, "lr_times_wd": product, "label_noise": LABEL_NOISE,
               "relaxation_time": relaxation, "relaxation_times": span}
    return run.finish(summary, rows, columns, weights=weights, notes=notes,
                      verdict=verdict_sentences(rows, sensitivity, span),
                      plots=lambda out: _plots(out, rows, names))


def verdict_sentences(rows: list[dict], sensitivity: list[dict], span: float) -> list[str]:
    """The table in words: the conv angle against the prediction per optimizer, and whether the
    loss and accuracy are lr-invariant at constant ηλ."""
    out = []
    for s in sensitivity:
        mine = [r for r in rows if r["optimizer"] == s["optimizer"]]
        errors = [r["angle_error"] for r in mine]
        if all(r["at_equilibrium"] for r in mine):
            out.append(f"{s['optimizer']}: conv angle {harness.within(errors)} of the prediction at every lr "
                       f"({harness.percent_range(errors)})")
        else:
            furthest = min(mine, key=lambda r: r["angle_error"])
            out.append(f"{s['optimizer']}: not at equilibrium yet (the run spans {span:.2g} relaxation times, "
                       f"< {harness.MIN_RELAXATION_TIMES:g}): conv angle {harness.percent_range(errors)} of the "
                       f"prediction, furthest at lr {furthest['lr']:.3g}")
    out.append("training loss and test accuracy are not lr-invariant at constant ηλ: "
               + "; ".join(f"{s['optimizer']} loss range {s['final_loss_range']:.3g}, accuracy range "
                           f"{s['test_accuracy_range']:.3g}" for s in sensitivity)
               + " (the classifier and the BatchNorm parameters are not scale-invariant; their steps scale with η)")
    return out


def _plots(out, rows, names) -> list[str]:
    plt = harness.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for i, name in enumerate(names):
        mine = [r for r in rows if r["optimizer"] == name]
        lrs = [r["lr"] for r in mine]
        axes[0].plot(lrs, [r["final_loss"] for r in mine], "o-", color=f"C{i}", label=name)
        axes[1].plot(lrs, [r["test_accuracy"] for r in mine], "o-", color=f"C{i}", label=name)
        axes[2].plot(lrs, [r["conv_angle_final"] for r in mine], "o-", color=f"C{i}", label=name)
    axes[2].axhline(rows[0]["predicted_angle"], color="gray", ls="--", lw=1, label="predicted")
    lrs = sorted({r["lr"] for r in rows})
    for ax, title in zip(axes, ("final training loss", "test accuracy", "conv angular update (last 20%)")):
        ax.set_xscale("log")
        # Ticks at the swept lrs only: the log axis's own labels overlap on a short sweep.
        ax.set_xticks(lrs, [f"{lr:.2g}" for lr in lrs], rotation=30, fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel("learning rate (η·λ fixed)")
        ax.set_title(title, fontsize=10)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)  # the dashed line is the prediction
    return [harness.savefig(fig, out / "lr_wd.png")]
