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
import textwrap

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


def train(run: harness.Run, name: str, lr: float, wd: float, bar, label: str, seed: int | None = None):
    """One training run (``seed``: the data split, initialisation and batches; default the
    run's); returns the model, its monitor, the weights of the scale-invariant layers before the
    last step and the test accuracy."""
    seed = run.args.seed if seed is None else seed
    x, y, x_test, y_test = harness.digits(run, LABEL_NOISE, seed)
    torch.manual_seed(seed)
    model = ConvNet(run["width"]).to(run.device)
    names = dict(model.named_parameters())
    opt = harness.make_optimizer(name, harness.param_groups(model, wd), lr, wd, run.args.backend)
    monitor = RotationMonitor(opt, every=run["every"], names=names, statistics=True)
    batches = data.Batches(x, y, run["batch"], seed=seed + 1)
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
            row[f"{layer}:angle_rms"] = t["neuron_angular_update_rms"]
            row[f"{layer}:g_unit_sq"] = t["neuron_grad_norm_sq_unit_mean"]
        return row

    harness.train_classifier(run, model, opt, monitor, batches, label, bar, measure, before_step=snapshot)
    test_loss, test_acc = harness.accuracy(model, x_test, y_test)
    return model, monitor, before_last, test_acc


# The theory is first order in d = ηλ and assumes d ≪ 1 − β of the momentum that carries the
# update's direction (AdamW's and SGD's β1/μ, Lion's β2: its momentum buffer): wdopt/theory.py.
MOMENTUM_HORIZON = {"adamw": 0.9, "sgd": 0.9, "lion": 0.99}
MAX_D_OVER_HORIZON = 0.25


def equilibrium_status(name: str, lr: float, wd: float, steps: int, time_constant: float, drift: float) -> list[str]:
    """Why a layer's window is not (yet) the theory's equilibrium: [] when it is."""
    reasons = []
    span = harness.steps_in_relaxation_times(steps, time_constant)
    if span < harness.MIN_RELAXATION_TIMES:
        reasons.append(f"the run spans {span:.2g} relaxation times (< {harness.MIN_RELAXATION_TIMES:g})")
    if abs(drift) > harness.MAX_WINDOW_DRIFT:
        reasons.append(f"the norm still moves {100 * drift:+.0f}% across the window")
    horizon = 1 - MOMENTUM_HORIZON[name]
    if lr * wd > MAX_D_OVER_HORIZON * horizon:
        beta = "β2" if name == "lion" else "β1" if name == "adamw" else "μ"
        reasons.append(f"d = ηλ = {lr * wd:.2g} is not ≪ 1 − {beta} = {horizon:.2g} (outside the theory's assumptions)")
    return reasons


def layer_rows(name: str, lr: float, wd: float, label: str, model, monitor, log: list[dict], steps: int,
               statistics: dict) -> tuple[list[dict], list[dict]]:
    """The table rows of one run (one per layer; the λ = 0 control's rows separately), measured over the
    last WINDOW of steps and predicted by the paper's formulas and by the refined predictor from the
    window before; the refined predictor's statistics go into ``statistics``."""
    rows, control = [], []
    last = monitor.last
    # The refined predictor's statistics come from the window *before* the measured one.
    before = [r for r in monitor.history if steps * (1 - 2 * WINDOW) < r.step <= steps * (1 - WINDOW)]
    refined = theory.refined(before, lion=True) if wd > 0 else {}
    for layer in (*ConvNet.scale_invariant, "fc.weight"):
        p = dict(model.named_parameters())[layer]
        c = p.numel() // p.shape[0]
        t_last = last.tensor(layer)
        measured_norm = harness.window_mean(log, steps, f"{layer}:norm", WINDOW)
        measured_angle = harness.window_mean(log, steps, f"{layer}:angle", WINDOW)
        drift = harness.window_drift(log, steps, f"{layer}:norm", WINDOW)
        if wd == 0:
            window = [r for r in log if r["step"] > steps * (1 - WINDOW)]
            start = window[0][f"{layer}:norm"]
            control.append({"optimizer": label, "layer": layer, "norm_at_window_start": start,
                            "norm_final": t_last["neuron_norm_rms"], "growth": t_last["neuron_norm_rms"] / start,
                            "window_drift": drift})
            continue
        if name == "adamw":
            pred = theory.adamw_equilibrium(lr, lr * wd, c, (0.9, 0.999))
        elif name == "lion":
            pred = theory.lion_equilibrium(lr, lr * wd, c, (0.9, 0.99))
        else:
            pred = theory.sgd_equilibrium(lr, lr * wd, harness.window_mean(log, steps, f"{layer}:g_unit_sq", WINDOW), 0.9)
        scale_invariant = layer in ConvNet.scale_invariant
        reasons = equilibrium_status(name, lr, wd, steps, pred.time_constant, drift)
        angle_rms = math.sqrt(harness.window_mean(log, steps, f"{layer}:angle_rms", WINDOW, square=True))
        ref = refined.get(layer)
        if layer in refined:
            window = theory.window_statistics(before, layer)
            statistics[f"{label}:{layer}"] = {
                "optimizer": name, "lr": lr, "weight_decay": wd, "neuron_size": c, "records": len(before),
                **{k: v.tolist() for k, v in window.items()}}
        rows.append({
            "optimizer": name, "layer": layer, "scale_invariant": scale_invariant,
            "predicted_norm": pred.norm, "measured_norm": measured_norm,
            "norm_error": harness.relative_error(measured_norm, pred.norm),
            "predicted_angular_update": pred.angular_update, "measured_angular_update": measured_angle,
            "angle_error": harness.relative_error(measured_angle, pred.angular_update),
            "measured_angle_rms": angle_rms, "angle_rms_error": harness.relative_error(angle_rms, pred.angular_update),
            "refined_norm": ref.norm if ref else None,
            "refined_norm_error": harness.relative_error(measured_norm, ref.norm) if ref else None,
            "refined_angular_update": ref.angular_update if ref else None,
            "refined_angle_error": harness.relative_error(angle_rms, ref.angular_update) if ref else None,
            "refined_time_constant": ref.time_constant if ref else None,
            "drive": ref.drive if ref else None, "radial": ref.radial if ref else None,
            "sign_radial_over_linear": _sign_radial_ratio(statistics.get(f"{label}:{layer}"), lr, wd, c) if name == "lion" else None,
            "time_constant": pred.time_constant, "relaxation_times": steps / pred.time_constant,
            "norm_drift": drift, "at_equilibrium": not reasons, "not_at_equilibrium_because": reasons,
            "note": "not scale-invariant" if not scale_invariant else "" if not reasons else "not at equilibrium yet",
            "neuron_size": c,
            "last_step_norm": t_last["neuron_norm_rms"], "last_step_angular_update": t_last["neuron_angular_update_mean"],
        })
    return rows, control


def _sign_radial_ratio(window: dict | None, lr: float, wd: float, c: int) -> float | None:
    """Lion: the measured radial part of sign(c), E⟨ω̂, sign c⟩, over the linear response's
    κ·E⟨ω̂, c⟩ (κ² = 2C/(π·E Σc²)), mean over neurons: 1 if sign(c) responded linearly."""
    if window is None:
        return None
    ratios = [s / (math.sqrt(2 * c / (math.pi * q)) * r) for s, r, q in
              zip(window["sign_radial"], window["radial"], window["direction_power"]) if r != 0 and q > 0]
    return sum(ratios) / len(ratios) if ratios else None


def run(args) -> dict:
    if (args.lr is not None or args.weight_decay is not None) and args.optimizer is None:
        harness.fail(NAME, "--lr/--weight-decay set one optimizer's hyperparameters; pass --optimizer too")
    run = harness.Run(NAME, args, PRESETS)
    steps = run["steps"]
    if steps % run["every"] or steps < run["every"] / WINDOW:
        harness.fail(NAME, f"--steps must be a multiple of the telemetry interval {run['every']} and at "
                     f"least {int(run['every'] / WINDOW)} (the last {WINDOW:.0%} must hold a record)")
    chosen = run.optimizers(BASE)
    plan = [(name, *_hyper(run, name), name) for name in chosen]
    if "adamw" in chosen:
        plan.append(("adamw", _hyper(run, "adamw")[0], 0.0, "adamw λ=0"))
    bar = run.progress(steps * len(plan), NAME)
    rows, curves, control, weights, runs, statistics = [], {}, [], {}, {}, {}
    for name, lr, wd, label in plan:
        bar.set_postfix_str(label)
        model, monitor, before_last, test_acc = train(run, name, lr, wd, bar, label)
        log = [r for r in run.metrics if r["run"] == label]
        curves[label] = log
        weights[label] = {"final": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                          "before_last_step": {k: v.cpu() for k, v in before_last.items()}}
        runs[label] = {"optimizer": name, "lr": lr, "weight_decay": wd, "time_constant": time_constant(name, lr, wd),
                       "final_loss": log[-1]["loss"], "test_accuracy": test_acc}
        new_rows, new_control = layer_rows(name, lr, wd, label, model, monitor, log, steps, statistics)
        rows += new_rows
        control += new_control
    bar.close()
    verdict = verdict_sentences(rows, control)
    summary = {"rows": rows, "control": control, "runs": runs, "window": WINDOW, "label_noise": LABEL_NOISE,
               "statistics": statistics,
               "min_relaxation_times": harness.MIN_RELAXATION_TIMES, "max_window_drift": harness.MAX_WINDOW_DRIFT}
    columns = ["optimizer", "layer", "neuron_size", "predicted_norm", "measured_norm", "norm_error", "refined_norm",
               "refined_norm_error", "predicted_angular_update", "measured_angular_update", "angle_error",
               "measured_angle_rms", "angle_rms_error", "refined_angular_update", "refined_angle_error",
               "relaxation_times", "note"]
    notes = ["", f"relaxation_times: steps / τ, τ the theory's relaxation time of ‖ω‖²; measured = mean over the last "
             f"{WINDOW:.0%} of steps. 'not at equilibrium yet': fewer than {harness.MIN_RELAXATION_TIMES:g} τ, a norm "
             f"still moving > {harness.MAX_WINDOW_DRIFT:.0%} across that window, or d = ηλ outside the theory's "
             "assumption d ≪ 1 − β; such errors measure the transient, not the theory."]
    notes += [f"control, {c['optimizer']} {c['layer']}: RMS neuron norm {c['norm_at_window_start']:.4g} → "
              f"{c['norm_final']:.4g} over the last {WINDOW:.0%} of steps (×{c['growth']:.3f}: {_trend(c['growth'])})"
              for c in control]
    return run.finish(summary, rows, columns, weights=weights, notes=notes, verdict=verdict,
                      plots=lambda out: _plots(out, curves, rows, runs, steps))


def _trend(growth: float) -> str:
    """Words for a norm ratio: "still growing" only where the norm grew."""
    if growth > 1.01:
        return "still growing"
    if growth < 0.99:
        return "shrinking"
    return "about flat"


def verdict_sentences(rows: list[dict], control: list[dict]) -> list[str]:
    """The table in words: per optimizer, whether its scale-invariant layers reached equilibrium
    and how close to the prediction they are; the classifier; the λ = 0 control."""
    out = []
    for name in dict.fromkeys(r["optimizer"] for r in rows):
        mine = [r for r in rows if r["optimizer"] == name and r["scale_invariant"]]
        settled = [r for r in mine if r["at_equilibrium"]]
        unsettled = [r for r in mine if not r["at_equilibrium"]]
        if settled:
            layers = "scale-invariant layers" if not unsettled else ", ".join(r["layer"] for r in settled)
            out.append(f"{name}: {layers}: norm {harness.within([r['norm_error'] for r in settled])}, angle "
                       f"{harness.within([r['angle_error'] for r in settled])} of the prediction "
                       f"(at equilibrium: ≥ {min(r['relaxation_times'] for r in settled):.2g} relaxation times)")
            refined = [r for r in settled if r.get("refined_norm_error") is not None
                       and not math.isnan(r["refined_norm_error"])]
            if refined and name != "lion":
                out.append(f"{name}: refined prediction (docs/theory.md section 2.4): norm "
                           f"{harness.within([r['refined_norm_error'] for r in refined])}, RMS angle "
                           f"{harness.within([r['refined_angle_error'] for r in refined])} (the paper's: RMS angle "
                           f"{harness.within([r['angle_rms_error'] for r in refined])})")
        if unsettled:
            reasons = []
            spans = [r["relaxation_times"] for r in unsettled if r["relaxation_times"] < harness.MIN_RELAXATION_TIMES]
            if spans:
                reasons.append(f"the run spans {min(spans):.2g} relaxation times (< {harness.MIN_RELAXATION_TIMES:g})")
            drifts = [r["norm_drift"] for r in unsettled if abs(r["norm_drift"]) > harness.MAX_WINDOW_DRIFT]
            if drifts:
                reasons.append(f"norms still move {harness.percent_range(drifts)} across the window")
            reasons += list(dict.fromkeys(reason for r in unsettled for reason in r["not_at_equilibrium_because"]
                                          if reason.startswith("d = ")))
            layers = "scale-invariant layers" if not settled else ", ".join(r["layer"] for r in unsettled)
            out.append(f"{name}: {layers}: not at equilibrium yet ({'; '.join(reasons)}): their norm errors "
                       f"{harness.percent_range([r['norm_error'] for r in unsettled])} and angle errors "
                       f"{harness.percent_range([r['angle_error'] for r in unsettled])} are not a test of the theory")
    others = sorted({r["layer"] for r in rows if not r["scale_invariant"]})
    if others:
        errors = [r["norm_error"] for r in rows if not r["scale_invariant"]]
        out.append(f"{', '.join(others)} {'is' if len(others) == 1 else 'are'} not scale-invariant and not expected "
                   f"to match (norm errors {harness.percent_range(errors)})")
    if control:
        conv = [c for c in control if c["layer"] in ConvNet.scale_invariant]
        growths = [c["growth"] for c in conv]
        lo, hi = min(growths), max(growths)
        if lo > 1.01:
            out.append(f"control (AdamW, λ = 0): conv norms still growing at the end (×{lo:.3f}–{hi:.3f} over the "
                       f"last {WINDOW:.0%} of steps): without weight decay there is no equilibrium")
        else:
            out.append(f"control (AdamW, λ = 0): conv norms changed ×{lo:.3f}–{hi:.3f} over the last {WINDOW:.0%} "
                       f"of steps ({', '.join(c['layer'] + ' ' + _trend(c['growth']) for c in conv)})")
    return out


def _spike(log: list[dict], key: str, steps: int):
    """The largest isolated jump of ``key`` in the second half of a run, as (step, ratio to the
    median of the preceding 20 records), or None below 2×: the λ = 0 control's angle spike."""
    best = None
    for i, r in enumerate(log):
        if r["step"] <= steps / 2 or i < 20:
            continue
        previous = sorted(x[key] for x in log[i - 20:i])[10]
        ratio = r[key] / previous if previous > 0 else 0.0
        if best is None or ratio > best[1]:
            best = (r["step"], ratio)
    return best if best is not None and best[1] >= 2 else None


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2] if values else math.nan


def _plots(out, curves, rows, runs, steps) -> list[str]:
    plt = harness.pyplot()
    layers = (*ConvNet.scale_invariant, "fc.weight")  # every row of the table
    labels = list(curves)
    window_start = steps * (1 - WINDOW)
    written = []
    for quantity, key, title in (("angle", "predicted_angular_update", "angular update per step (rad)"),
                                 ("norm", "predicted_norm", "RMS neuron norm")):
        # One y range for all panels (sharey): they are meant to be compared.
        fig, axes = plt.subplots(1, len(labels), figsize=(3.8 * max(2, len(labels)), 4.6), squeeze=False, sharey=True)
        handles = {}
        for ax, label in zip(axes[0], labels):
            log = curves[label]
            xs = [r["step"] for r in log]
            shade = ax.axvspan(window_start, steps, color="0.9", zorder=0)
            handles.setdefault(f"window the table averages (last {WINDOW:.0%})", shade)
            for i, layer in enumerate(layers):
                color = f"C{i}"
                lw = 0.7 if layer == "fc.weight" else 1
                (line,) = ax.plot(xs, [r[f"{layer}:{quantity}"] for r in log], color=color, lw=lw)
                handles.setdefault(layer + ("" if layer != "fc.weight" else " (not scale-invariant)"), line)
            mine = [r for r in rows if r["optimizer"] == runs[label]["optimizer"] and runs[label]["weight_decay"] > 0]
            if quantity == "angle":
                # The predicted angle is the same for every layer: one neutral line, not a layer's colour.
                for value in sorted({round(r[key], 12) for r in mine}):
                    line = ax.axhline(value, color="black", ls="--", lw=1)
                    handles.setdefault("predicted (same for every layer)", line)
            else:
                for i, layer in enumerate(layers):
                    pred = next((r[key] for r in mine if r["layer"] == layer), None)
                    if pred is not None:
                        ax.axhline(pred, color=f"C{i}", ls="--", lw=0.8)
                        handles.setdefault("dashed: predicted norm of the layer of that colour",
                                           plt.Line2D([], [], color="black", ls="--", lw=0.8))
            tau = runs[label]["time_constant"]
            if math.isfinite(tau):
                for k in (1, 5):
                    if k * tau < steps:
                        line = ax.axvline(k * tau, color="gray", ls=":", lw=1)
                        ax.annotate(f"{k}τ" if k > 1 else "τ", (k * tau, 1), xycoords=("data", "axes fraction"),
                                    ha="left", va="top", color="gray", fontsize=8)
                        handles.setdefault("τ, 5τ: relaxation time of ‖ω‖² (theory); equilibrium after ~5τ", line)
            title_run = label if runs[label]["weight_decay"] > 0 else f"{label} (control: no equilibrium)"
            ax.set_title(title_run, fontsize=9)
            ax.set_xlabel("step")
            ax.set_yscale("log")
        axes[0][0].set_ylabel(title)
        # The legend goes below the panels, off the data.
        caption = textwrap.fill(_caption(quantity, curves, runs, steps), width=int(max(2, len(labels)) * 50))
        lines = caption.count("\n") + 1 if caption else 0
        bottom = 0.03 + 0.035 * lines  # room for the caption, then the legend above it
        fig.legend(list(handles.values()), list(handles), loc="lower center", bbox_to_anchor=(0.5, bottom), ncol=3 if len(labels) > 2 else 2,
                   fontsize=7, frameon=False)
        fig.suptitle(f"{title}: measured (solid) and predicted (dashed)", fontsize=10)
        fig.tight_layout(rect=(0, bottom + 0.14, 1, 1))
        if caption:
            fig.text(0.01, 0.01, caption, fontsize=7, va="bottom", ha="left")
        fig.savefig(out / f"{quantity}s.png", dpi=110)
        plt.close(fig)
        written.append(f"{quantity}s.png")
    return written


def _caption(quantity: str, curves, runs, steps) -> str:
    """Words for what the plot shows that the table does not: τ, and the λ = 0 control's spike."""
    parts = []
    if quantity == "norm":
        parts.append("τ = the theory's relaxation time of ‖ω‖² (AdamW, Lion: 1/(2ηλ); SGD: (1−μ)/(4ηλ)); the offset "
                     "from equilibrium decays as e^(−t/τ); runs shorter than 5τ are reported as not at equilibrium yet.")
    decayed = next((log for label, log in curves.items() if runs[label]["weight_decay"] > 0
                    and runs[label]["optimizer"] == "adamw"), None)
    for label, log in curves.items():
        if runs[label]["weight_decay"] == 0 and quantity == "angle":
            # Numbers, not adjectives: the control's loss against the decayed run's, in the window.
            loss = _median([r["loss"] for r in log if r["step"] > steps * (1 - WINDOW)])
            text = "λ = 0 (control): the norm keeps growing, so the effective lr η/‖ω‖² and the angle keep falling"
            if decayed is not None:
                decayed_loss = _median([r["loss"] for r in decayed if r["step"] > steps * (1 - WINDOW)])
                text += (f"; the network fits the noisy labels (median training loss in the window {loss:.3g}, "
                         f"{decayed_loss:.3g} with decay), so its gradients nearly vanish")
            spike = _spike(log, "conv1.weight:angle", steps)
            if spike:
                i = next(i for i, r in enumerate(log) if r["step"] == spike[0])
                before = _median([r["loss"] for r in log[max(0, i - 20):i]])
                peak = max(r["loss"] for r in log[i:i + 5])
                text += (f". The spike at step {spike[0]} (angle ×{spike[1]:.1f}) comes with the loss rising from "
                         f"{before:.2g} to {peak:.2g}: a burst of large steps. Such bursts carry much of the control's "
                         "norm growth, so that growth depends on whether one falls in the window (EXPERIMENTS.md: "
                         "spread over seeds)")
            parts.append(text + ".")
    return " ".join(parts)
