"""``wdopt equilibrium``: do weight norms and angular updates reach the values the theory predicts?

A ConvNet with BatchNorm (its conv filters are scale-invariant) learns the digits with 20% of the
training labels randomised, in mini-batches of 32, so the loss never collapses and the gradients
stay noise-dominated, as the theory assumes (docs/theory.md section 2.1). FusedAdamW, FusedSGD (momentum
0.9, L2 as torch) and FusedLion train it at a per-step decay ηλ that makes the run span several
time constants; a RotationMonitor records every neuron's norm and angular update inside the
kernels. Measured values are averaged over the last 20% of steps (norm: RMS over the layer's
neurons; angle: mean over its neurons) and compared with ``wdopt.theory`` (SGD's prediction uses
the measured E‖g̃‖² = mean ‖g‖²‖ω‖² over the same window). A control run of AdamW with λ = 0
shows the norm still growing at the end: without weight decay there is no equilibrium.
"""

from __future__ import annotations

import math

import torch

from .. import theory
from ..telemetry import RotationMonitor
from . import data, harness
from .models import ConvNet

NAME = "equilibrium"
HELP = "predicted vs measured equilibrium norms and angular updates (AdamW, SGD, Lion)"

# Per optimizer: lr and λ. Time constants: AdamW, Lion 1/(2ηλ); SGD (1−μ)/(4ηλ).
PRESETS = {
    "default": {"steps": 4000, "batch": 32, "width": 16, "every": 10,
                "adamw": (3e-3, 0.5), "sgd": (0.1, 1e-3), "lion": (1e-3, 1.0)},
    "quick": {"steps": 300, "batch": 32, "width": 8, "every": 2,
              "adamw": (1e-2, 1.0), "sgd": (0.1, 5e-3), "lion": (3e-3, 3.0)},
    "gpu": {"steps": 6000, "batch": 128, "width": 64, "every": 10,
            "adamw": (1e-3, 1.0), "sgd": (0.1, 2e-3), "lion": (3e-4, 3.0)},
}
BASE = ("adamw", "sgd", "lion")
LABEL_NOISE = 0.2
WINDOW = 0.2  # the measured equilibrium: the last 20% of steps


def add_arguments(parser) -> None:
    harness.add_common_arguments(parser, optimizers=BASE)


def _hyper(run: harness.Run, name: str) -> tuple[float, float]:
    lr, wd = run[name]
    return (run.args.lr if run.args.lr is not None else lr,
            run.args.weight_decay if run.args.weight_decay is not None else wd)


def time_constant(name: str, lr: float, wd: float, momentum: float = 0.9) -> float:
    d = lr * wd
    if d == 0:
        return math.inf
    return (1 - momentum) / (4 * d) if name == "sgd" else 1 / (2 * d)


def train(run: harness.Run, name: str, lr: float, wd: float, bar, label: str):
    """One training run; returns the model, its monitor records per step and the weights of the
    scale-invariant layers before the last step."""
    x, y, x_test, y_test = harness.digits(run, LABEL_NOISE)
    torch.manual_seed(run.args.seed)
    model = ConvNet(run["width"]).to(run.device)
    names = dict(model.named_parameters())
    opt = harness.make_optimizer(name, harness.param_groups(model, wd), lr, wd, run.args.backend)
    monitor = RotationMonitor(opt, every=run["every"], names=names)
    batches = data.Batches(x, y, run["batch"], seed=run.args.seed + 1)
    before_last = {}

    def snapshot(step):
        if step == run["steps"]:
            before_last.update({n: names[n].detach().clone() for n in ConvNet.scale_invariant})

    def measure(record):
        row = {}
        for layer in (*ConvNet.scale_invariant, "fc.weight"):
            t = record.tensor(layer)
            row[f"{layer}:norm"] = t["neuron_norm_rms"]
            row[f"{layer}:angle"] = t["neuron_angular_update_mean"]
            row[f"{layer}:g_unit_sq"] = t["neuron_grad_norm_sq_unit_mean"]
        return row

    harness.train_classifier(run, model, opt, monitor, batches, label, bar, measure, before_step=snapshot)
    test_loss, test_acc = harness.accuracy(model, x_test, y_test)
    return model, monitor, before_last, test_acc


def run(args) -> dict:
    if (args.lr is not None or args.weight_decay is not None) and args.optimizer is None:
        raise SystemExit("equilibrium: --lr/--weight-decay set one optimizer's hyperparameters; pass --optimizer too")
    run = harness.Run(NAME, args, PRESETS)
    steps = run["steps"]
    if steps % run["every"] or steps < run["every"] / WINDOW:
        raise SystemExit(f"equilibrium: --steps must be a multiple of the telemetry interval {run['every']} and at "
                         f"least {int(run['every'] / WINDOW)} (the last {WINDOW:.0%} must hold a record)")
    chosen = run.optimizers(BASE)
    plan = [(name, *_hyper(run, name), name) for name in chosen]
    if "adamw" in chosen:
        plan.append(("adamw", _hyper(run, "adamw")[0], 0.0, "adamw λ=0"))
    bar = run.progress(steps * len(plan), NAME)
    rows, curves, control, weights, runs = [], {}, [], {}, {}
    for name, lr, wd, label in plan:
        bar.set_postfix_str(label)
        model, monitor, before_last, test_acc = train(run, name, lr, wd, bar, label)
        log = [r for r in run.metrics if r["run"] == label]
        curves[label] = log
        weights[label] = {"final": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                          "before_last_step": {k: v.cpu() for k, v in before_last.items()}}
        runs[label] = {"optimizer": name, "lr": lr, "weight_decay": wd, "time_constant": time_constant(name, lr, wd),
                       "final_loss": log[-1]["loss"], "test_accuracy": test_acc}
        last = monitor.last
        for layer in (*ConvNet.scale_invariant, "fc.weight"):
            p = dict(model.named_parameters())[layer]
            c = p.numel() // p.shape[0]
            t_last = last.tensor(layer)
            measured_norm = harness.window_mean(log, steps, f"{layer}:norm", WINDOW)
            measured_angle = harness.window_mean(log, steps, f"{layer}:angle", WINDOW)
            if wd == 0:
                start = [r for r in log if r["step"] > steps * (1 - WINDOW)][0][f"{layer}:norm"]
                control.append({"optimizer": label, "layer": layer, "norm_at_window_start": start,
                                "norm_final": t_last["neuron_norm_rms"], "growth": t_last["neuron_norm_rms"] / start})
                continue
            if name == "adamw":
                pred = theory.adamw_equilibrium(lr, lr * wd, c, (0.9, 0.999))
            elif name == "lion":
                pred = theory.lion_equilibrium(lr, lr * wd, c, (0.9, 0.99))
            else:
                pred = theory.sgd_equilibrium(lr, lr * wd, harness.window_mean(log, steps, f"{layer}:g_unit_sq", WINDOW), 0.9)
            rows.append({
                "optimizer": name, "layer": layer, "scale_invariant": layer in ConvNet.scale_invariant,
                "predicted_norm": pred.norm, "measured_norm": measured_norm,
                "norm_error": harness.relative_error(measured_norm, pred.norm),
                "predicted_angular_update": pred.angular_update, "measured_angular_update": measured_angle,
                "angle_error": harness.relative_error(measured_angle, pred.angular_update),
                "time_constant": pred.time_constant, "neuron_size": c,
                "last_step_norm": t_last["neuron_norm_rms"], "last_step_angular_update": t_last["neuron_angular_update_mean"],
            })
    bar.close()
    summary = {"rows": rows, "control": control, "runs": runs, "window": WINDOW, "label_noise": LABEL_NOISE}
    columns = ["optimizer", "layer", "scale_invariant", "predicted_norm", "measured_norm", "norm_error",
               "predicted_angular_update", "measured_angular_update", "angle_error"]
    notes = [f"control, {c['optimizer']} {c['layer']}: RMS neuron norm {c['norm_at_window_start']:.4g} → "
             f"{c['norm_final']:.4g} over the last {WINDOW:.0%} of steps (×{c['growth']:.3f}: still growing)"
             for c in control]
    notes = ["", *notes] if notes else notes
    return run.finish(summary, rows, columns, weights=weights, notes=notes,
                      plots=lambda out: _plots(out, curves, rows, runs))


def _plots(out, curves, rows, runs) -> list[str]:
    plt = harness.pyplot()
    layers = ConvNet.scale_invariant
    labels = list(curves)
    written = []
    for quantity, key, title in (("angle", "predicted_angular_update", "angular update per step (rad)"),
                                 ("norm", "predicted_norm", "RMS neuron norm")):
        fig, axes = plt.subplots(1, len(labels), figsize=(4.2 * len(labels), 3.4), squeeze=False)
        for ax, label in zip(axes[0], labels):
            log = curves[label]
            steps = [r["step"] for r in log]
            for i, layer in enumerate(layers):
                color = f"C{i}"
                ax.plot(steps, [r[f"{layer}:{quantity}"] for r in log], color=color, lw=1, label=layer)
                pred = next((r[key] for r in rows if r["layer"] == layer and r["optimizer"] == runs[label]["optimizer"]
                             and runs[label]["weight_decay"] > 0), None)
                if pred is not None:
                    ax.axhline(pred, color=color, ls="--", lw=1)
            tau = runs[label]["time_constant"]
            if quantity == "norm" and math.isfinite(tau):
                ax.axvline(tau, color="gray", ls=":", lw=1)
                ax.text(tau, ax.get_ylim()[1], " τ", va="top", color="gray")
            ax.set_title(label, fontsize=10)
            ax.set_xlabel("step")
            if quantity == "angle":
                ax.set_yscale("log")
        axes[0][0].set_ylabel(title)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{title}: measured (solid) and predicted (dashed)", fontsize=10)
        written.append(harness.savefig(fig, out / f"{quantity}s.png"))
    return written
