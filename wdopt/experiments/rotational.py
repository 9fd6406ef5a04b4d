"""``wdopt rotational``: a base optimizer against its rotational variant at the same hyperparameters.

Setup. The ConvNet (BatchNorm after every conv, so the conv filters are scale-invariant) learns
the digits with 20% of the training labels randomised and mini-batches of 32, so the loss cannot
collapse to zero and the gradients stay noise-dominated (the regime docs/theory.md section 2.1 assumes).
AdamW and RotationalAdamW (``--optimizer sgd|lion``: SGD with momentum 0.9 and L2, or Lion, and
their variants) train it from the same initialisation on the same batches, each once with a
constant learning rate and once with a linear warm-up over the first 10% of steps followed by a
constant rate. A RotationMonitor reads every neuron's angular update inside the kernels.

Measured, per monitored step: the imbalance of the angular updates — the coefficient of variation
(std/mean) of the three scale-invariant layers' mean angles ("layer CV"), and of all their
neurons' angles pooled ("neuron CV"). Reported: the mean over all monitored steps and over the
first 20% of steps (the transient); the time to equilibrium of each conv layer — the first
monitored step after which its mean angle stays within ±20% of the predicted one for the rest of
the run (``wdopt.theory`` for the base optimizer, the variant's own target angle for the
variant; both follow the warm-up since the prediction depends on the current lr·λ) — and the
final training loss (mean over the last 10% of steps) and test accuracy.
The angle in the time to equilibrium is the ratio measured/predicted averaged over the trailing
10 monitored steps (one step's layer mean fluctuates by ~8% over 16 neurons, which would make
"stays within ±20%" a test of noise rather than of equilibrium).

Claim (Kosson et al. 2024): the rotational variant rotates every neuron at the equilibrium angle
from the first step, so it has no transient and no imbalance between layers and neurons, and it
makes learning-rate warm-up less necessary; the base optimizer's layers start away from
equilibrium (their initial norms differ from the equilibrium norms) and reach it only after a
few time constants 1/(2ηλ). Assumption: noise-dominated gradients, ηλ ≪ 1 − β.
"""

from __future__ import annotations

import math

import torch

from ..telemetry import RotationMonitor
from . import data, harness
from .models import ConvNet

NAME = "rotational"
HELP = "base optimizer vs its rotational variant: angular-update imbalance, time to equilibrium, warm-up"

PRESETS = {
    "default": {"steps": 2000, "batch": 32, "width": 16, "every": 10, "warmup": 0.1,
                "adamw": (3e-3, 0.5), "sgd": (0.1, 2e-3), "lion": (1e-3, 1.0)},
    "quick": {"steps": 200, "batch": 32, "width": 8, "every": 4, "warmup": 0.1,
              "adamw": (1e-2, 1.0), "sgd": (0.1, 5e-3), "lion": (3e-3, 3.0)},
    "gpu": {"steps": 6000, "batch": 128, "width": 64, "every": 10, "warmup": 0.1,
            "adamw": (1e-3, 1.0), "sgd": (0.1, 2e-3), "lion": (3e-4, 3.0)},
}
BASE = ("adamw", "sgd", "lion")
LABEL_NOISE = 0.2
BAND = 0.2        # equilibrium: within ±20% of the predicted angle
TRANSIENT = 0.2   # the first 20% of steps
SMOOTH = 10       # time to equilibrium: trailing mean over 10 monitored steps
LAYERS = ConvNet.scale_invariant


def add_arguments(parser) -> None:
    harness.add_common_arguments(parser, optimizers=BASE)


def _hyper(run: harness.Run, base: str) -> tuple[float, float]:
    lr, wd = run[base]
    return (run.args.lr if run.args.lr is not None else lr,
            run.args.weight_decay if run.args.weight_decay is not None else wd)


def train(run: harness.Run, name: str, lr: float, wd: float, warmup: int, label: str, bar):
    x, y, x_test, y_test = harness.digits(run, LABEL_NOISE)
    torch.manual_seed(run.args.seed)
    model = ConvNet(run["width"]).to(run.device)
    names = dict(model.named_parameters())
    rotate_only = ConvNet.scale_invariant if name.startswith("rotational") else None
    opt = harness.make_optimizer(name, harness.param_groups(model, wd, rotate_only), lr, wd, run.args.backend)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, harness.warmup_schedule(run["steps"], warmup))
    monitor = RotationMonitor(opt, every=run["every"], names=names)
    batches = data.Batches(x, y, run["batch"], seed=run.args.seed + 1)

    def measure(record):
        row, means, pooled = {}, [], []
        for layer in LAYERS:
            t = record.tensor(layer)
            means.append(t["neuron_angular_update_mean"])
            pooled.append(record.neurons(layer)["angular_update"])
            row[f"{layer}:angle"] = t["neuron_angular_update_mean"]
            row[f"{layer}:predicted_angle"] = t["predicted_angular_update"]
            row[f"{layer}:norm"] = t["neuron_norm_rms"]
        row["layer_cv"] = harness.coefficient_of_variation(means)
        row["neuron_cv"] = harness.coefficient_of_variation(torch.cat(pooled))
        return row

    losses, series = harness.train_classifier(run, model, opt, monitor, batches, label, bar, measure, scheduler=sched)
    test_loss, test_acc = harness.accuracy(model, x_test, y_test)
    return model, losses, series, test_acc


def time_to_equilibrium(series: list[dict], layer: str, band: float = BAND, smooth: int = SMOOTH):
    """First monitored step after which the layer's mean angle, relative to the prediction and
    averaged over the trailing ``smooth`` records (one step's mean angle is noisy: ~8% over 16
    neurons), stays within ±band of 1 to the end (None: not reached)."""
    ratios = []
    for row in series:
        pred, angle = row[f"{layer}:predicted_angle"], row[f"{layer}:angle"]
        ratios.append(angle / pred if pred is not None and pred > 0 else math.nan)
    reached = None
    for i, row in enumerate(series):
        window = ratios[max(0, i - smooth + 1):i + 1]
        inside = all(math.isfinite(r) for r in window) and abs(sum(window) / len(window) - 1) <= band
        if inside and reached is None:
            reached = row["step"]
        elif not inside:
            reached = None
    return reached


def _mean(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def run(args) -> dict:
    run = harness.Run(NAME, args, PRESETS)
    steps = run["steps"]
    base = args.optimizer or "adamw"
    lr, wd = _hyper(run, base)
    warmup_steps = int(round(run["warmup"] * steps))
    plan = [(name, w) for w in (0, warmup_steps) for name in (base, f"rotational-{base}")]
    bar = run.progress(steps * len(plan), NAME)
    rows, curves, weights = [], {}, {}
    for name, warmup in plan:
        label = f"{name} {'warmup' if warmup else 'no warmup'}"
        bar.set_postfix_str(label)
        model, losses, series, test_acc = train(run, name, lr, wd, warmup, label, bar)
        curves[label] = series
        weights[label] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        early = [r for r in series if r["step"] <= TRANSIENT * steps]
        times = {layer: time_to_equilibrium(series, layer) for layer in LAYERS}
        slowest = None if any(t is None for t in times.values()) else max(times.values())
        rows.append({
            "optimizer": name, "warmup": warmup > 0, "warmup_steps": warmup, "lr": lr, "weight_decay": wd,
            "layer_cv_mean": _mean([r["layer_cv"] for r in series]),
            "layer_cv_early": _mean([r["layer_cv"] for r in early]),
            "neuron_cv_mean": _mean([r["neuron_cv"] for r in series]),
            "neuron_cv_early": _mean([r["neuron_cv"] for r in early]),
            "time_to_equilibrium": {layer: t if t is not None else "not reached" for layer, t in times.items()},
            "time_to_equilibrium_max": slowest if slowest is not None else "not reached",
            "final_loss": harness.tail_mean(losses, 0.1), "test_accuracy": test_acc,
        })
    bar.close()
    table = [{**r, **{f"t_eq {layer.split('.')[0]}": r["time_to_equilibrium"][layer] for layer in LAYERS}}
             for r in rows]
    columns = ["optimizer", "warmup", "layer_cv_mean", "layer_cv_early", "neuron_cv_mean", "neuron_cv_early",
               *[f"t_eq {layer.split('.')[0]}" for layer in LAYERS], "final_loss", "test_accuracy"]
    notes = [f"\nlr {lr:g}, λ {wd:g}, {steps} steps, warm-up {warmup_steps} steps; CV = std/mean of the angular "
             f"updates across the {len(LAYERS)} conv layers (layer) or all their neurons (neuron); 'early': first "
             f"{TRANSIENT:.0%} of steps; t_eq: first step after which the layer's angle stays within ±{BAND:.0%} "
             f"of the prediction (trailing mean of {SMOOTH} monitored steps)."]
    relaxation = _relaxation_time(base, lr, wd)
    span = harness.steps_in_relaxation_times(steps, relaxation)
    summary = {"rows": rows, "band": BAND, "smooth": SMOOTH, "label_noise": LABEL_NOISE, "base": base,
               "relaxation_time": relaxation, "relaxation_times": span}
    if span < harness.MIN_RELAXATION_TIMES:
        notes.append(f"{base}: the run spans {span:.2g} relaxation times (< {harness.MIN_RELAXATION_TIMES:g}): "
                     "not at equilibrium yet")
    return run.finish(summary, table, columns, weights=weights, notes=notes, verdict=verdict_sentences(rows, span),
                      plots=lambda out: _plots(out, curves))


def _relaxation_time(base: str, lr: float, wd: float) -> float:
    """wdopt.theory's relaxation time of the base optimizer's ‖ω‖² (1/(2d); SGD (1−μ)/(4d))."""
    d = lr * wd
    if d <= 0:
        return math.inf
    return (1 - 0.9) / (4 * d) if base == "sgd" else 1 / (2 * d)


def _times(x: float) -> str:
    return f"{x:.2g}×" if x is not None and math.isfinite(x) else "—"


def verdict_sentences(rows: list[dict], span: float) -> list[str]:
    """The table in words: per warm-up setting, the rotational variant against its base."""
    out = []
    for warm in (False, True):
        pair = [r for r in rows if r["warmup"] == warm]
        base = next((r for r in pair if not r["optimizer"].startswith("rotational")), None)
        rot = next((r for r in pair if r["optimizer"].startswith("rotational")), None)
        if base is None or rot is None:
            continue
        ratio = base["layer_cv_mean"] / rot["layer_cv_mean"] if rot["layer_cv_mean"] else math.nan
        early = base["layer_cv_early"] / rot["layer_cv_early"] if rot["layer_cv_early"] else math.nan
        neuron = base["neuron_cv_mean"] / rot["neuron_cv_mean"] if rot["neuron_cv_mean"] else math.nan
        smaller = "smaller" if ratio >= 1 else "larger"
        shown = ratio if ratio >= 1 else 1 / ratio
        out.append(f"{'with' if warm else 'without'} warm-up: {rot['optimizer']}'s angle imbalance across layers is "
                   f"{_times(shown)} {smaller} than {base['optimizer']}'s over the run ({_times(early)} in the first "
                   f"{TRANSIENT:.0%}), across neurons {_times(neuron)}; slowest layer within ±{BAND:.0%} of its "
                   f"target from step {rot['time_to_equilibrium_max']} ({base['optimizer']}: "
                   f"{base['time_to_equilibrium_max']}); final loss {harness.fmt(rot['final_loss'])} vs "
                   f"{harness.fmt(base['final_loss'])}, test accuracy {harness.fmt(rot['test_accuracy'])} vs "
                   f"{harness.fmt(base['test_accuracy'])} (one seed)")
    base_name = next((r["optimizer"] for r in rows if not r["optimizer"].startswith("rotational")), "the base optimizer")
    if span < harness.MIN_RELAXATION_TIMES:
        out.append(f"{base_name} is not at equilibrium yet: the run spans {span:.2g} relaxation times "
                   f"(< {harness.MIN_RELAXATION_TIMES:g}), so its t_eq and late imbalance are still the transient")
    return out


def _plots(out, curves) -> list[str]:
    plt = harness.pyplot()
    labels = list(curves)
    fig, axes = plt.subplots(2, len(labels), figsize=(3.6 * len(labels), 5.6), squeeze=False, sharey="row")
    for j, label in enumerate(labels):
        series = curves[label]
        steps = [r["step"] for r in series]
        ax = axes[0][j]
        for i, layer in enumerate(LAYERS):
            ax.plot(steps, [r[f"{layer}:angle"] for r in series], color=f"C{i}", lw=1, label=layer)
            ax.plot(steps, [r[f"{layer}:predicted_angle"] or math.nan for r in series], color=f"C{i}", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(label, fontsize=9)
        ax = axes[1][j]
        ax.plot(steps, [r["layer_cv"] for r in series], lw=1, label="layer CV")
        ax.plot(steps, [r["neuron_cv"] for r in series], lw=1, label="neuron CV")
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("angular update (rad)")
    axes[1][0].set_ylabel("imbalance (CV)")
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=7)
    written = [harness.savefig(fig, out / "imbalance.png")]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for label in labels:
        series = curves[label]
        ax.plot([r["step"] for r in series], [r["loss"] for r in series], lw=0.8, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (monitored steps)")
    ax.legend(fontsize=7)
    written.append(harness.savefig(fig, out / "loss.png"))
    return written
