"""``wdopt sphere``: the warm-up of the theory — SGD on scale-invariant weights from several initial norms.

Setup. The ConvNet (BatchNorm after every conv: the conv filters are scale-invariant) learns the
digits with 20% of the training labels randomised and mini-batches of 32, so the loss cannot
collapse to zero and the gradients stay noise-dominated. At initialisation its conv filters are
multiplied by 0.25, 1 or 4 (the function it computes does not change). Each start is trained
(same initialisation otherwise, same batches) with

- SGD, momentum 0.9, L2 weight decay λ on the conv filters and the classifier, as torch does;
- projected SGD on the sphere (``wdopt.RotationalSGD(mode="projected", zero_mean=False)``, the
  conv filters rotational, the rest plain SGD): the same SGD direction with its radial part
  removed, then renormalised — every filter keeps its initial norm.

Measured (RotationMonitor, averaged over the last 20% of steps): each conv layer's RMS neuron norm
‖w‖ and its effective learning rate η/‖w‖², against the prediction of
``wdopt.theory.sgd_equilibrium`` with the measured E‖g̃‖² (mean over neurons of ‖g‖²‖w‖², the
squared gradient at unit norm) over the same window; for the projected runs the "prediction" is
the fixed norm ‖w0‖ and rate η/‖w0‖².

Claim (docs/theory.md sections 2 and 4; D'Angelo et al. 2024): SGD on a scale-invariant w moves like
SGD on the unit sphere with effective rate η/‖w‖²; weight decay drives ‖w‖ to an equilibrium
independent of the start, so the effective rate converges to the same value from every initial
norm (time constant (1−μ)/(4ηλ) near equilibrium; from far above, the norm first shrinks by
L2 alone at rate ≈ ηλ/(1−μ) per step). Projected optimisation is the fixed-norm counterpart:
its effective rate stays η/‖w0‖², so it depends on the start. Assumption: noise-dominated
gradients, ηλ ≪ 1 − μ.
"""

from __future__ import annotations


import torch

import wdopt

from .. import theory
from ..telemetry import RotationMonitor
from . import data, harness
from .models import ConvNet

NAME = "sphere"
HELP = "SGD on scale-invariant weights from several initial norms: norm and effective lr converge; projected SGD keeps them"

PRESETS = {
    "default": {"steps": 2500, "batch": 32, "width": 16, "every": 10, "lr": 0.1, "weight_decay": 2e-3,
                "scales": (0.25, 1.0, 4.0)},
    "quick": {"steps": 300, "batch": 32, "width": 8, "every": 4, "lr": 0.1, "weight_decay": 1e-2,
              "scales": (0.25, 1.0, 4.0)},
    "gpu": {"steps": 8000, "batch": 128, "width": 64, "every": 10, "lr": 0.1, "weight_decay": 1e-3,
            "scales": (0.25, 1.0, 4.0)},
}
LABEL_NOISE = 0.2
WINDOW = 0.2
MOMENTUM = 0.9
LAYERS = ConvNet.scale_invariant
METHODS = ("sgd", "projected")


def add_arguments(parser) -> None:
    harness.add_common_arguments(parser, optimizers=("sgd",))
    parser.add_argument("--scales", type=float, nargs="+", default=None,
                        help="factors applied to the conv filters at initialisation (default 0.25 1 4)")


def _groups(model: ConvNet, wd: float, projected: bool) -> list[dict]:
    named = dict(model.named_parameters())
    convs = [named[n] for n in LAYERS]
    others = [p for n, p in named.items() if n not in LAYERS and p.dim() >= 2]
    rest = [p for n, p in named.items() if p.dim() < 2]
    if projected:
        return [{"params": convs, "weight_decay": wd, "rotational": True},
                {"params": others, "weight_decay": wd, "rotational": False},
                {"params": rest, "weight_decay": 0.0, "rotational": False}]
    return [{"params": convs + others, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]


def train(run: harness.Run, method: str, scale: float, label: str, bar):
    lr, wd = run["lr"], run["weight_decay"]
    x, y, x_test, y_test = harness.digits(run, LABEL_NOISE)
    torch.manual_seed(run.args.seed)
    model = ConvNet(run["width"]).to(run.device)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for n in LAYERS:
            named[n].mul_(scale)
    if method == "projected":
        opt = wdopt.RotationalSGD(_groups(model, wd, True), lr=lr, momentum=MOMENTUM, mode="projected",
                                  zero_mean=False, backend=run.args.backend)
    else:
        opt = harness.make_optimizer("sgd", _groups(model, wd, False), lr, wd, run.args.backend, momentum=MOMENTUM)
    initial = {n: float(named[n].detach().double().flatten(1).norm(dim=1).pow(2).mean().sqrt()) for n in LAYERS}
    monitor = RotationMonitor(opt, every=run["every"], names=named)
    batches = data.Batches(x, y, run["batch"], seed=run.args.seed + 1)

    def measure(record):
        row = {}
        for layer in LAYERS:
            t = record.tensor(layer)
            row[f"{layer}:norm"] = t["neuron_norm_rms"]
            row[f"{layer}:effective_lr"] = lr / t["neuron_norm_rms"] ** 2
            row[f"{layer}:angle"] = t["neuron_angular_update_mean"]
            row[f"{layer}:g_unit_sq"] = t["neuron_grad_norm_sq_unit_mean"]
        return row

    losses, series = harness.train_classifier(run, model, opt, monitor, batches, label, bar, measure)
    test_loss, test_acc = harness.accuracy(model, x_test, y_test)
    return model, initial, losses, series, test_acc


def run(args) -> dict:
    run = harness.Run(NAME, args, PRESETS)
    steps, lr, wd = run["steps"], run["lr"], run["weight_decay"]
    scales = tuple(args.scales) if args.scales else run["scales"]
    plan = [(m, s) for m in METHODS for s in scales]
    bar = run.progress(steps * len(plan), NAME)
    rows, curves, weights, runs, predicted_lines = [], {}, {}, {}, {}
    for method, scale in plan:
        label = f"{method} ×{scale:g}"
        bar.set_postfix_str(label)
        model, initial, losses, series, test_acc = train(run, method, scale, label, bar)
        curves[label] = series
        weights[label] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        runs[label] = {"method": method, "scale": scale, "final_loss": harness.tail_mean(losses, 0.1),
                       "test_accuracy": test_acc}
        for layer in LAYERS:
            final_norm = harness.window_mean(series, steps, f"{layer}:norm", WINDOW)
            if method == "projected":
                pred_norm = initial[layer]
            else:
                pred_norm = theory.sgd_equilibrium(lr, lr * wd, harness.window_mean(series, steps, f"{layer}:g_unit_sq", WINDOW),
                                                   MOMENTUM).norm
            predicted_lines[(label, layer)] = pred_norm
            eff, eff_pred = lr / final_norm**2, lr / pred_norm**2
            drift = harness.window_drift(series, steps, f"{layer}:norm", WINDOW)
            rows.append({"run": label, "method": method, "init_scale": scale, "layer": layer, "norm_drift": drift,
                         "initial_norm": initial[layer], "final_norm": final_norm, "predicted_norm": pred_norm,
                         "norm_error": harness.relative_error(final_norm, pred_norm),
                         "effective_lr_final": eff, "effective_lr_predicted": eff_pred,
                         "effective_lr_error": harness.relative_error(eff, eff_pred),
                         "final_loss": runs[label]["final_loss"], "test_accuracy": test_acc})
    bar.close()
    # Does the end point depend on the start? Spread of the final effective lr across scales, per layer.
    spread = []
    for method in METHODS:
        for layer in LAYERS:
            effs = [r["effective_lr_final"] for r in rows if r["method"] == method and r["layer"] == layer]
            spread.append({"method": method, "layer": layer, "effective_lr_max_over_min": max(effs) / min(effs)})
    columns = ["run", "layer", "initial_norm", "final_norm", "predicted_norm", "norm_error", "effective_lr_final",
               "effective_lr_predicted", "final_loss", "test_accuracy"]
    notes = ["", f"SGD momentum {MOMENTUM}, lr {lr:g}, λ {wd:g} (L2), {steps} steps; final = mean over the last "
             f"{WINDOW:.0%} of steps; projected: 'predicted' = the initial (fixed) norm."]
    notes += [f"final effective lr, max/min over initial scales: {s['method']:9s} {s['layer']}: "
              f"{s['effective_lr_max_over_min']:.3f}" for s in spread]
    relaxation = (1 - MOMENTUM) / (4 * lr * wd) if lr * wd > 0 else float("inf")
    span = harness.steps_in_relaxation_times(steps, relaxation)
    summary = {"rows": rows, "runs": runs, "spread": spread, "window": WINDOW, "label_noise": LABEL_NOISE,
               "momentum": MOMENTUM, "relaxation_time": relaxation, "relaxation_times": span}
    verdict = verdict_sentences(rows, spread, span)
    return run.finish(summary, rows, columns, weights=weights, notes=notes, verdict=verdict,
                      plots=lambda out: _plots(out, curves, predicted_lines, lr))


#: The final effective lr "forgot its start" when it agrees across initial scales within this factor.
CONVERGED = 1.25


def verdict_sentences(rows: list[dict], spread: list[dict], span: float) -> list[str]:
    """The table in words: does SGD's end point forget its start; does projected SGD keep it."""
    out = []
    sgd = [r for r in rows if r["method"] == "sgd"]
    if sgd:
        starts = [r["initial_norm"] for r in sgd]
        worst = max(s["effective_lr_max_over_min"] for s in spread if s["method"] == "sgd")
        drifts = [r["norm_drift"] for r in sgd if abs(r["norm_drift"]) > harness.MAX_WINDOW_DRIFT]
        reasons = []
        if span < harness.MIN_RELAXATION_TIMES:
            reasons.append(f"the run spans {span:.2g} relaxation times (< {harness.MIN_RELAXATION_TIMES:g})")
        if drifts:
            reasons.append(f"norms still move {harness.percent_range(drifts)} across the window")
        if len({r["init_scale"] for r in sgd}) > 1:
            verb = "forgot its start" if worst <= CONVERGED else "still depends on the start"
            out.append(f"sgd: from initial norms {max(starts) / min(starts):.3g}× apart, the final effective lr agrees "
                       f"within ×{worst:.3g} across starts (max/min, worst layer): the end point {verb}")
        errors = harness.percent_range([r["norm_error"] for r in sgd])
        if reasons:
            out.append(f"sgd: not at equilibrium yet ({'; '.join(reasons)}): final norms {errors} of the predicted "
                       "equilibrium")
        else:
            out.append(f"sgd: final norms {errors} of the predicted equilibrium (E‖g̃‖² measured in the same window)")
    projected = [r for r in rows if r["method"] == "projected"]
    if projected:
        kept = max(abs(r["final_norm"] / r["initial_norm"] - 1) for r in projected)
        worst = max(s["effective_lr_max_over_min"] for s in spread if s["method"] == "projected")
        accuracy = f"test accuracy {_span(projected, 'test_accuracy')}" + (
            f" (sgd: {_span(sgd, 'test_accuracy')})" if sgd else "")
        out.append(f"projected: every filter kept its initial norm (to {kept:.1g}), so the effective lr stays what the "
                   f"initialisation made it (×{worst:.3g} apart across starts); {accuracy}")
    return out


def _span(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows]
    return f"{min(values):.3g}–{max(values):.3g}"


def _plots(out, curves, predicted, lr) -> list[str]:
    plt = harness.pyplot()
    # One y range per row: the layers' norms and effective lrs are meant to be compared.
    fig, axes = plt.subplots(2, len(LAYERS), figsize=(4 * len(LAYERS), 6), squeeze=False, sharey="row")
    styles = {"sgd": "-", "projected": ":"}
    scales = sorted({label.split("×")[1] for label in curves}, key=float)
    for j, layer in enumerate(LAYERS):
        for label, series in curves.items():
            method, scale = label.split(" ×")
            color = f"C{scales.index(scale)}"
            steps = [r["step"] for r in series]
            axes[0][j].plot(steps, [r[f"{layer}:norm"] for r in series], styles[method], color=color, lw=1,
                            label=label)
            axes[1][j].plot(steps, [r[f"{layer}:effective_lr"] for r in series], styles[method], color=color, lw=1)
            if method == "sgd":
                pred = predicted[(label, layer)]
                axes[0][j].axhline(pred, color=color, ls="--", lw=0.6)
                axes[1][j].axhline(lr / pred**2, color=color, ls="--", lw=0.6)
        axes[0][j].set_title(layer, fontsize=10)
        axes[0][j].set_yscale("log")
        axes[1][j].set_yscale("log")
        axes[1][j].set_xlabel("step")
    axes[0][0].set_ylabel("RMS neuron norm ‖w‖")
    axes[1][0].set_ylabel("effective lr η/‖w‖²")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("SGD (solid) vs projected SGD (dotted); dashed: predicted SGD equilibrium", fontsize=10)
    return [harness.savefig(fig, out / "sphere.png")]
