"""``wdopt precision``: what bf16 storage does to the rotational equilibrium (docs/theory.md section 6).

At AdamW's equilibrium a neuron turns by η_r = sqrt(2d·(1−β1)/(1+β1)) per step (d = ηλ), and a
typical element's update is of order η_r of the element (docs/theory.md section 2). bf16 keeps 8
significant bits: round-to-nearest (RTN) returns the old value for a change below half an ulp,
2^-9…2^-8 of it, and the decay d·|ω| is below that wherever d < 2^-9 (η_r ≤ 2^-7 here).
Stochastic rounding (SR) is unbiased but adds rounding noise. This experiment sweeps η_r over
octaves (2^-5…2^-10 by default, λ = d/η at a fixed lr) and trains the equilibrium experiment's
ConvNet with BatchNorm on the digits (20% of the training labels randomised, batches of 32) with
FusedAdamW, betas (0.9, 0.999), once per *arm*:

    fp32             float32 parameters and states
    bf16-nearest     the model and the optimizer state in bfloat16, rounded to nearest
    bf16-stochastic  the same, stored with stochastic rounding (``stochastic_rounding=True``)

(the forward and backward pass in the arm's dtype, BatchNorm included, the logits cast to float32
for the loss). Every run starts from the same initialisation with each conv filter scaled to the
predicted equilibrium norm (free: the filters are scale-invariant), so that a point whose
relaxation time τ = 1/(2d) is too long for the budget still measures the angle at the norm the
theory predicts; only runs spanning ≥ 5τ test the norm itself (the table says which).

Measured over the last 20% of steps, per conv layer and then averaged over the three: the RMS
neuron norm against ``theory.adamw_equilibrium``; the angular update (RMS over the layer's
neurons and the window) against η_r; the update the kernel *computed* before rounding, ‖u‖/‖ω‖,
from the monitor's direction statistics (Adam's step without the decay,
u = η/(1−β1^t)·(β1·s + (1−β1)·n), docs/theory.md section 5.3); the *rounding factor*: the stored
relative update ‖Δω‖/‖ω‖ over the computed one, divided by fp32's at the same d (1 when storing
changes nothing), beside the element model's (one store of Gaussian updates, on Gaussian elements
and on the run's own conv weights; docs/theory.md section 6); E[ĝ²/v̂] (1 when Adam's second
moment tracks the gradient's); the training loss (mean of the last 10% of steps); and the
fraction of conv elements that did not change in the last step (from weights saved before and
after it, in weights.pt).

Arms are a list (``ARMS``): compensated bf16 parameters (``master_weight_bits``) and 8-bit states
(``state_bits``) slot in as further entries.

Part *quality* (``--part quality``; ``--part sweep`` is the above; both run by default) is issue
#11's training-quality target: with fixed runs — why-wd's TinyGPT configuration (``why_wd``'s
preset: one pass over the standard library's sources, warm-up then cosine, betas (0.9, 0.95)) at
its default steps with λ = 0.1, and the equilibrium experiment's ConvNet (its digits, width,
batches, steps, AdamW lr and λ) — over 3 seeds, the final training loss (mean of the last 10% of
steps) of compensated bf16 + 8-bit states within 1% of fp32 AdamW's, mean over seeds, with the
seed spread. Arms (``QUALITY_ARMS``): fp32; bf16 rounded to nearest; a 24-bit master weight with
8-bit states and stochastic rounding (5.03 bytes a parameter, the target's); the same with a
32-bit master (6.03). Reported per model and arm: the mean final loss and its min…max over
seeds, the mean's relative difference to fp32's and the per-seed paired ones, and the verdict
against the 1% target, whatever it is.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass, field

import torch

from .. import theory
from ..telemetry import RotationMonitor
from . import data, equilibrium, harness, why_wd
from .equilibrium import LABEL_NOISE, WINDOW, equilibrium_status
from .models import ConvNet

NAME = "precision"
HELP = ("bf16 storage at the rotational equilibrium (round-to-nearest, stochastic rounding, compensated, 8-bit "
        "states vs fp32, AdamW) and issue #11's 3-seed training-quality target")

BETAS = (0.9, 0.999)
CONV = ConvNet.scale_invariant
#: bf16 has 8 significant bits: half an ulp is 2^-9…2^-8 of a value, depending on its place in the binade.
HALF_ULP = (2.0 ** -9, 2.0 ** -8)
#: The departure the verdict calls a departure from a prediction.
DEPARTURE = 0.10
#: The element model's SR coefficient for |u| ≪ ulp, Gaussian ω and u: (2/π)·1/(2 ln 2) = 1/(π ln 2).
SR_KAPPA = 1 / (math.pi * math.log(2))


@dataclass(frozen=True)
class Arm:
    """One way of storing the model: its dtype, the extra FusedAdamW options, and the backend
    capability it needs (a function of ``wdopt.backends``: "rounds_stochastically",
    "compensates", "quantizes"), checked before any training."""
    label: str
    dtype: torch.dtype
    options: dict = field(default_factory=dict)
    requires: str | None = None
    rounding: str | None = None  # the element model's rounding: None (exact), "nearest", "stochastic"
    about: str = ""


ARMS = [
    Arm("fp32", torch.float32, {}, None, None, "float32 parameters and states"),
    Arm("bf16-nearest", torch.bfloat16, {"stochastic_rounding": False}, None, "nearest",
        "bfloat16 parameters and states, rounded to nearest"),
    Arm("bf16-stochastic", torch.bfloat16, {"stochastic_rounding": True}, "rounds_stochastically", "stochastic",
        "bfloat16 parameters and states, stochastic rounding"),
    # A 24-bit master weight's half ulp is 2^-17…2^-16: at these η_r its own rounding is exact for
    # the element model; the states stay bf16 (to nearest, then stochastically), which separates
    # the parameter's storage from the second moment's ratchet.
    Arm("bf16-master24", torch.bfloat16, {"master_weight_bits": 24}, "compensates", None,
        "bfloat16 parameters with a 24-bit master weight (int8 correction), bf16 states rounded to nearest"),
    Arm("bf16-master24-stochastic", torch.bfloat16, {"master_weight_bits": 24, "stochastic_rounding": True},
        "compensates", None, "the same with stochastic rounding of the states and the master"),
    # The memory-lean configuration: 24-bit master, 8-bit states (one byte each and a scale per
    # 256; resident 5.03 bytes a parameter instead of fp32's 12), stochastic rounding throughout.
    Arm("bf16-master24-states8", torch.bfloat16,
        {"master_weight_bits": 24, "state_bits": 8, "stochastic_rounding": True}, "quantizes", None,
        "bfloat16 parameters with a 24-bit master weight and 8-bit states, stochastic rounding"),
]

_BY_LABEL = {a.label: a for a in ARMS}
#: Part quality's arms: fp32, bf16 to nearest, and compensated bf16 with 8-bit states (24- and
#: 32-bit master weights, stochastic rounding throughout, as ``state_bits=8`` wants).
QUALITY_ARMS = [
    _BY_LABEL["fp32"], _BY_LABEL["bf16-nearest"], _BY_LABEL["bf16-master24-states8"],
    Arm("bf16-master32-states8", torch.bfloat16,
        {"master_weight_bits": 32, "state_bits": 8, "stochastic_rounding": True}, "quantizes", None,
        "bfloat16 parameters with a 32-bit master weight and 8-bit states, stochastic rounding"),
]
#: Issue #11's target: this arm's mean final training loss within QUALITY_TARGET of fp32's.
QUALITY_SUBJECT = "bf16-master24-states8"
QUALITY_TARGET = 0.01
QUALITY_MODELS = {"tinygpt": "TinyGPT", "convnet": "ConvNet"}


def quality_config(preset: str, seeds: int = 3, steps: int | None = None, width: int | None = None) -> dict:
    """Part quality's fixed runs at ``preset``: why-wd's TinyGPT (model, steps, lr; λ = 0.1) and the
    equilibrium experiment's ConvNet (width, batch, steps, telemetry interval, AdamW's lr and λ),
    read from those experiments' presets; ``steps``/``width`` shrink them (--quick only)."""
    lm, conv = why_wd.PRESETS[preset], equilibrium.PRESETS[preset]
    return {"seeds": seeds,
            "tinygpt": {"lm": dict(lm["lm"]), "steps": steps or lm["steps"], "lr": lm["lr"], "weight_decay": 0.1,
                        "betas": why_wd.BETAS, "schedule": f"warm-up over {why_wd.WARMUP:.0%}, cosine to 0"},
            "convnet": {"width": width or conv["width"], "batch": conv["batch"], "steps": steps or conv["steps"],
                        "every": min(conv["every"], steps or conv["every"]), "lr": conv["adamw"][0],
                        "weight_decay": conv["adamw"][1], "betas": (0.9, 0.999), "label_noise": LABEL_NOISE,
                        "schedule": "constant"}}


def bytes_per_parameter(arm: Arm) -> float:
    """AdamW's resident bytes a parameter in the arm (the parameter, its correction, exp_avg and
    exp_avg_sq; not the gradient): an 8-bit state is a byte and a float32 scale per 256 elements."""
    size = torch.finfo(arm.dtype).bits / 8
    correction = {24: 1, 32: 2}.get(arm.options.get("master_weight_bits"), 0)
    state = 1 + 4 / 256 if arm.options.get("state_bits") == 8 else size
    return size + correction + 2 * state


# η_r = 2^-k for k in "exponents"; λ = d/lr. Steps per point: the smallest multiple of "every" that
# spans "relax" relaxation times (at least "min_steps"), or, where that exceeds "max_steps",
# "held_steps" (the run starts at the predicted norm and measures the angle there).
# "quality": part quality's runs (quality_config).
PRESETS = {
    "default": {"width": 8, "batch": 32, "every": 10, "lr": 3e-3, "exponents": (5, 6, 7, 8, 9, 10),
                "relax": 5.2, "min_steps": 800, "max_steps": 4500, "held_steps": 1500, "model_samples": 1 << 18,
                "quality": quality_config("default")},
    "quick": {"width": 4, "batch": 32, "every": 5, "lr": 3e-3, "exponents": (5, 10),
              "relax": 5.2, "min_steps": 150, "max_steps": 250, "held_steps": 150, "model_samples": 1 << 16,
              "quality": quality_config("quick", seeds=2, steps=6, width=4)},
    "gpu": {"width": 64, "batch": 128, "every": 10, "lr": 1e-3, "exponents": (5, 6, 7, 8, 9, 10, 11),
            "relax": 5.2, "min_steps": 1000, "max_steps": 18000, "held_steps": 3000, "model_samples": 1 << 20,
            "quality": quality_config("gpu")},
}


def add_arguments(parser) -> None:
    harness.add_common_arguments(parser, optimizers=("adamw",))
    parser.add_argument("--part", choices=("sweep", "quality", "all"), default="all",
                        help="sweep: the η_r sweep; quality: issue #11's 3-seed training-quality target (why-wd's "
                        "TinyGPT and the equilibrium ConvNet); all: both (default)")
    parser.add_argument("--arms", nargs="+", choices=[a.label for a in ARMS], default=None,
                        help="the sweep: run only these arms (default: all: " + ", ".join(a.label for a in ARMS) + ")")
    parser.add_argument("--exponents", type=float, nargs="+", default=None, metavar="K",
                        help="the sweep: η_r = 2^-K for each K (default: the preset's; --weight-decay replaces it)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="part quality: seeds per run, from --seed on (default: the preset's, 3)")


# ---------------------------------------------------------------------- theory beside the data


def rotation_factor() -> float:
    return theory.adamw_rotation_factor(BETAS)


def decay_for(eta_r: float) -> float:
    """d = ηλ whose AdamW equilibrium angle is η_r: η_r²(1+β1)/(2(1−β1))."""
    return eta_r ** 2 / rotation_factor()


def element_model(relative_update: float, rounding: str | None, samples: int = 1 << 18, seed: int = 0,
                  weights: list[torch.Tensor] | None = None) -> float:
    """The stored relative update over the computed one, sqrt(E(R(ω+u) − ω)²/E u²), for elements
    ω held in bf16, updates u computed in fp32 (Gaussian, RMS ``relative_update`` times the RMS of
    ω's neuron) and one store R: "nearest" (RTN), "stochastic" (SR, in expectation:
    (x−ω)² + (b−x)(x−a) for x = ω+u between its bf16 neighbours a, b), None (exact: 1).
    ω ~ N(0, 1) by default (docs/theory.md section 6); with ``weights`` (tensors whose rows are
    neurons) the elements of those tensors, repeated to ``samples``, each neuron weighted by
    1/‖ω‖² as the angle weights it."""
    if rounding is None:
        return 1.0
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"unknown rounding {rounding!r}")
    g = torch.Generator().manual_seed(seed)
    if weights is None:
        weights = [torch.randn(1, samples, generator=g)]
    num = den = 0.0
    for w in weights:
        w = w.detach().cpu().to(torch.bfloat16).float().flatten(1)
        w = w.repeat(max(1, samples // w.numel()), 1)
        norm2 = w.double().pow(2).sum(1, keepdim=True)
        rms = (norm2 / w.shape[1]).sqrt()
        u = (relative_update * rms * torch.randn(w.shape, generator=g, dtype=torch.float64)).float()
        x = w + u  # the fp32 value the kernel stores
        wd, xd = w.double(), x.double()
        if rounding == "nearest":
            err = (x.to(torch.bfloat16).float().double() - wd).pow(2)
        else:
            low = x.view(torch.int32) & ~0xFFFF  # toward zero: the upper 16 bits (sign and magnitude)
            a = low.view(torch.float32).double()
            b = (low + 0x10000).view(torch.float32).double()  # the next bf16 away from zero
            err = (xd - wd).pow(2) + (b - xd) * (xd - a)
        num += (err / norm2).sum().item()
        den += (u.double().pow(2) / norm2).sum().item()
    return math.sqrt(num / den)


def model_threshold(rounding: str, level: float, samples: int, lo: float = 6.0, hi: float = 13.0) -> float | None:
    """The exponent k (η_r = 2^-k) at which the element model's factor crosses ``level`` (RTN
    falling below it, SR rising above it), by bisection; None if it does not cross in [lo, hi]."""
    def beyond(k):
        f = element_model(2.0 ** -k, rounding, samples)
        return f < level if rounding == "nearest" else f > level
    if beyond(lo) or not beyond(hi):
        return None
    for _ in range(14):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if beyond(mid) else (mid, hi)
    return (lo + hi) / 2


def sr_norm_inflation(eta_r: float, kappa: float = SR_KAPPA) -> float:
    """SR's equilibrium norm over the fp32 one: sqrt(1+ε²) + ε, ε = κ·2^-7·(1−β1)/(2(1+β1)η_r)
    (docs/theory.md section 6)."""
    eps = kappa * 2.0 ** -7 * (1 - BETAS[0]) / (2 * (1 + BETAS[0]) * eta_r)
    return math.sqrt(1 + eps * eps) + eps


# ---------------------------------------------------------------------- runs


class _ConvNet(ConvNet):
    """The ConvNet with float32 logits (the loss in fp32 whatever the arm's dtype), same names."""

    def forward(self, x):
        return super().forward(x).float()


def plan_points(run: harness.Run) -> list[dict]:
    """The sweep: per point η_r, d, λ, steps, τ."""
    args, lr, every = run.args, run["lr"], run["every"]
    if args.weight_decay is not None:
        if args.weight_decay <= 0:
            harness.fail(NAME, "--weight-decay must be positive (the equilibrium needs decay)")
        ds = [lr * args.weight_decay]
    else:
        exponents = args.exponents if args.exponents is not None else run["exponents"]
        ds = [decay_for(2.0 ** -k) for k in exponents]
    points = []
    for d in ds:
        eta_r = math.sqrt(d * rotation_factor())
        tau = 1 / (2 * d)
        if args.steps is not None:
            steps = args.steps
        else:
            needed = max(run["min_steps"], math.ceil(run["relax"] * tau))
            steps = needed if needed <= run["max_steps"] else run["held_steps"]
            steps = math.ceil(steps / every) * every
        if steps % every or steps < every / WINDOW:
            harness.fail(NAME, f"--steps must be a multiple of the telemetry interval {every} and at least "
                         f"{int(every / WINDOW)} (the last {WINDOW:.0%} must hold a record)")
        points.append({"eta_r": eta_r, "exponent": -math.log2(eta_r), "d": d, "lr": lr, "weight_decay": d / lr,
                       "steps": steps, "time_constant": tau})
    return points


def check_arms(run: harness.Run, arms: list[Arm], explicit: bool, name: str = NAME) -> list[Arm]:
    """The arms the backend can run, checked before training: one it cannot (e.g. 8-bit states on
    a GPU backend that does not have them yet) fails the run when asked for by name (``explicit``,
    --arms), else is left out with a note on stderr (``name``: the experiment that says so)."""
    from .. import backends

    needs = {a.requires for a in arms if a.requires}
    if not needs:
        return arms
    try:
        backend = backends.resolve(run.args.backend, run.device)
        module = backends.load(backend)
    except (ValueError, RuntimeError, OSError) as error:
        harness.fail(name, f"backend {run.args.backend!r}: {error}")
    runnable = []
    for arm in arms:
        if arm.requires and not getattr(backends, arm.requires)(module, run.device):
            why = (f"arm {arm.label} needs {arm.requires.replace('_', ' ')}, which backend {backend!r} does not do on "
                   f"{run.device.type} yet")
            if explicit:
                harness.fail(name, why + "; use --backend reference or leave the arm out (--arms)")
            print(f"wdopt {name}: {why}: left out", file=sys.stderr)
            continue
        runnable.append(arm)
    return runnable


def train(run: harness.Run, arm: Arm, point: dict, bar, label: str):
    """One run; returns the per-record log, the per-step losses, the model, the conv weights before
    the last step and the test accuracy."""
    seed = run.args.seed
    x, y, x_test, y_test = harness.digits(run, LABEL_NOISE, seed)
    torch.manual_seed(seed)
    model = _ConvNet(run["width"])
    lr, d = point["lr"], point["d"]
    with torch.no_grad():  # each filter at the predicted equilibrium norm (scale-invariant: free)
        for name, p in model.named_parameters():
            if name in CONV:
                target = theory.adamw_equilibrium(lr, d, p[0].numel(), BETAS).norm
                p.mul_(target / p.flatten(1).norm(dim=1).view(-1, *([1] * (p.dim() - 1))))
    model = model.to(device=run.device, dtype=arm.dtype)
    names = dict(model.named_parameters())
    options = dict(arm.options)
    if options.get("stochastic_rounding"):
        options.setdefault("rounding_seed", seed)
    opt = harness.make_optimizer("adamw", harness.param_groups(model, point["weight_decay"]), lr,
                                 point["weight_decay"], run.args.backend, betas=BETAS, **options)
    monitor = RotationMonitor(opt, every=run["every"], names=names, statistics=True)
    batches = data.Batches(x.to(arm.dtype), y, run["batch"], seed=seed + 1)
    before_last = {}
    beta1 = BETAS[0]

    def snapshot(step):
        if step == point["steps"]:
            before_last.update({n: names[n].detach().clone() for n in CONV})

    def measure(record):
        row = {}
        lr_t = lr / (1 - beta1 ** record.step)
        for layer in CONV:
            sums = record.sums[layer].double().cpu()
            stats = record.statistics[layer].double().cpu()
            w2, d2 = sums[:, 0], sums[:, 2]
            n2, ns, s2 = stats[:, 0], stats[:, 1], stats[:, 3]
            c = names[layer][0].numel()
            # The step's normalised update, β1·s + (1−β1)·n, has power β1²S2 + 2β1(1−β1)NS + (1−β1)²N2.
            power = beta1 ** 2 * s2 + 2 * beta1 * (1 - beta1) * ns + (1 - beta1) ** 2 * n2
            per = record.neurons(layer)
            row[f"{layer}:norm"] = float(per["weight_norm"].pow(2).mean().sqrt())
            row[f"{layer}:angle"] = float(per["angular_update"].pow(2).mean().sqrt())
            row[f"{layer}:stored"] = float((d2 / w2).mean().sqrt())
            row[f"{layer}:computed"] = float((lr_t ** 2 * power / w2).mean().sqrt())
            row[f"{layer}:grad_power"] = float((n2 / c).mean())
        return row

    with _steps(run, point["steps"]):
        losses, _ = harness.train_classifier(run, model, opt, monitor, batches, label, bar, measure,
                                             before_step=snapshot)
    _, test_acc = harness.accuracy(model, x_test.to(arm.dtype), y_test)
    log = [r for r in run.metrics if r["run"] == label]
    return log, losses, model, before_last, test_acc


@contextlib.contextmanager
def _steps(run: harness.Run, steps: int):
    """``run["steps"]`` (harness.train_classifier's step count) set to ``steps`` for one run."""
    given = run.config.get("steps")
    run.config["steps"] = steps
    try:
        yield
    finally:
        run.config.pop("steps")
        if given is not None:
            run.config["steps"] = given


def point_rows(arm: Arm, point: dict, log: list[dict], losses: list[float], model, before_last: dict,
               test_acc: float) -> tuple[dict, list[dict]]:
    """The table row of one (arm, point) — conv layers averaged — and its per-layer rows."""
    steps, lr, d, eta_r = point["steps"], point["lr"], point["d"], point["eta_r"]
    params = dict(model.named_parameters())
    layers = []
    for layer in CONV:
        p = params[layer]
        c = p[0].numel()
        pred = theory.adamw_equilibrium(lr, d, c, BETAS)
        measured_norm = harness.window_mean(log, steps, f"{layer}:norm", WINDOW)
        unchanged = (p.detach() == before_last[layer]).sum().item()
        layers.append({
            "arm": arm.label, "exponent": point["exponent"], "layer": layer, "neuron_size": c,
            "predicted_norm": pred.norm, "measured_norm": measured_norm,
            "norm_error": harness.relative_error(measured_norm, pred.norm),
            "norm_drift": harness.window_drift(log, steps, f"{layer}:norm", WINDOW),
            "predicted_angular_update": pred.angular_update,
            "measured_angular_update": math.sqrt(harness.window_mean(log, steps, f"{layer}:angle", WINDOW,
                                                                     square=True)),
            "stored_update": math.sqrt(harness.window_mean(log, steps, f"{layer}:stored", WINDOW, square=True)),
            "computed_update": math.sqrt(harness.window_mean(log, steps, f"{layer}:computed", WINDOW, square=True)),
            "grad_power": harness.window_mean(log, steps, f"{layer}:grad_power", WINDOW),
            "unchanged": unchanged, "elements": p.numel(),
        })

    def mean(key):
        return sum(r[key] for r in layers) / len(layers)

    angle = mean("measured_angular_update")
    drift = max((r["norm_drift"] for r in layers), key=abs)
    reasons = equilibrium_status("adamw", lr, point["weight_decay"], steps, point["time_constant"], drift)
    span = harness.steps_in_relaxation_times(steps, point["time_constant"])
    row = {
        "arm": arm.label, "dtype": str(arm.dtype).removeprefix("torch."), "exponent": point["exponent"],
        "eta_r": eta_r, "eta_r_label": _power(point["exponent"]), "d": d, "lr": lr,
        "weight_decay": point["weight_decay"],
        "steps": steps, "time_constant": point["time_constant"], "relaxation_times": span,
        "predicted_angular_update": eta_r, "measured_angular_update": angle,
        "angle_ratio": angle / eta_r, "angle_error": harness.relative_error(angle, eta_r),
        "computed_update": mean("computed_update"), "update_ratio": mean("computed_update") / eta_r,
        "stored_update": mean("stored_update"),
        "stored_over_computed": mean("stored_update") / mean("computed_update"),
        "rounding_factor": None, "model_rounding_factor": None,  # filled in against the fp32 arm
        "model_own_weights": None,
        "norm_ratio": 1 + mean("norm_error"), "norm_error": mean("norm_error"), "norm_drift": drift,
        "at_equilibrium": not reasons, "not_at_equilibrium_because": reasons,
        "unchanged_fraction": sum(r["unchanged"] for r in layers) / sum(r["elements"] for r in layers),
        "grad_power": mean("grad_power"),
        "final_loss": harness.tail_mean(losses, 0.1), "test_accuracy": test_acc,
        "note": "" if not reasons else ("held at the predicted norm (< 5τ)" if span < harness.MIN_RELAXATION_TIMES
                                        else "not at equilibrium yet"),
    }
    return row, layers


def _power(exponent: float) -> str:
    return f"2^-{exponent:.3g}"


def run(args) -> dict:
    run = harness.Run(NAME, args, PRESETS)
    parts = ("sweep", "quality") if args.part == "all" else (args.part,)
    if args.seeds is not None and args.seeds < 1:
        harness.fail(NAME, f"--seeds must be at least 1, got {args.seeds}")
    arms, points, quality_arms, seeds = [], [], [], []
    if "sweep" in parts:
        arms = check_arms(run, [a for a in ARMS if args.arms is None or a.label in args.arms],
                          explicit=args.arms is not None)
        points = plan_points(run)
    cfg = run["quality"]
    if "quality" in parts:
        quality_arms = check_arms(run, QUALITY_ARMS, explicit=False)
        seeds = [args.seed + i for i in range(args.seeds if args.seeds is not None else cfg["seeds"])]
    total = (sum(p["steps"] for p in points) * len(arms)
             + len(seeds) * len(quality_arms) * sum(cfg[m]["steps"] for m in QUALITY_MODELS))
    bar = run.progress(total, NAME)
    summary, table, columns, notes, verdict, weights, plotters = {}, [], [], [], [], {}, []
    if "sweep" in parts:
        summary, table, columns, notes, verdict, plot = _sweep(run, arms, points, bar, weights)
        plotters.append(plot)
    if "quality" in parts:
        quality = run_quality(run, quality_arms, seeds, bar, weights)
        q_table, q_columns, q_notes, q_verdict = quality_report(quality)
        summary["quality"] = quality
        if table:  # after the sweep's table
            notes += ["", "quality (issue #11's target):", harness.format_table(q_table, q_columns), *q_notes]
        else:
            table, columns, notes = q_table, q_columns, q_notes
            summary["rows"] = []
        verdict += q_verdict
        plotters.append(lambda out: [_quality_plot(out, quality)])
    bar.close()
    summary["parts"] = list(parts)
    return run.finish(summary, table, columns, weights=weights, notes=notes, verdict=verdict,
                      plots=lambda out: [png for plot in plotters for png in plot(out)])


def _sweep(run: harness.Run, arms: list[Arm], points: list[dict], bar, weights: dict):
    """Part sweep: every arm at every η_r; returns the summary, its table, columns, notes, verdict
    and plot (``weights`` gains each run's conv weights)."""
    rows, layers, runs = [], [], {}
    for point in points:
        for arm in arms:
            label = f"{arm.label} {_power(point['exponent'])}"
            bar.set_postfix_str(label)
            log, losses, model, before_last, test_acc = train(run, arm, point, bar, label)
            row, per_layer = point_rows(arm, point, log, losses, model, before_last, test_acc)
            row["model_own_weights"] = element_model(row["computed_update"], arm.rounding, run["model_samples"],
                                                     weights=[before_last[n] for n in CONV])
            rows.append(row)
            layers += per_layer
            weights[label] = {"final": {n: p.detach().cpu() for n, p in model.named_parameters() if n in CONV},
                              "before_last_step": {n: t.cpu() for n, t in before_last.items()}}
            runs[label] = {"arm": arm.label, "exponent": point["exponent"], "steps": point["steps"]}
    fill_rounding_factors(rows, arms, run["model_samples"])
    thresholds = {"nearest": model_threshold("nearest", 1 - DEPARTURE, run["model_samples"]),
                  "stochastic": model_threshold("stochastic", 1 + DEPARTURE, run["model_samples"])}
    verdict = verdict_sentences(rows, thresholds)
    summary = {"rows": rows, "layers": layers, "runs": runs, "window": WINDOW, "label_noise": LABEL_NOISE,
               "betas": list(BETAS), "half_ulp": list(HALF_ULP), "departure": DEPARTURE, "sr_kappa": SR_KAPPA,
               "model_thresholds": thresholds,
               "arms": [{"label": a.label, "dtype": str(a.dtype).removeprefix("torch."), "options": a.options,
                         "about": a.about} for a in arms],
               "min_relaxation_times": harness.MIN_RELAXATION_TIMES, "max_window_drift": harness.MAX_WINDOW_DRIFT}
    columns = ["arm", "eta_r_label", "d", "steps", "relaxation_times", "angle_ratio", "update_ratio",
               "rounding_factor", "model_rounding_factor", "model_own_weights", "norm_ratio", "unchanged_fraction",
               "grad_power", "final_loss", "note"]
    notes = [
        "",
        (f"η_r = sqrt(2d(1−β1)/(1+β1)), the predicted angle; d = ηλ, η = {points[0]['lr']:g}; measured over "
         f"the last {WINDOW:.0%} of steps, conv layers averaged."),
        ("angle_ratio: measured angle / η_r. update_ratio: the update the kernel computed before rounding, "
         "‖u‖/‖ω‖, / η_r. rounding_factor: stored ‖Δω‖ / computed ‖u‖, relative to fp32's at the same d."),
        ("model_rounding_factor: the element model's at the arm's computed update (Gaussian elements; "
         "docs/theory.md section 6); model_own_weights: the same on the run's own conv weights."),
        ("norm_ratio: RMS neuron norm / predicted. unchanged_fraction: conv elements the last step left "
         "unchanged. grad_power: E[ĝ²/v̂]. final_loss: training loss, mean of the last 10% of steps."),
        (f"Every run starts at the predicted norm. 'held at the predicted norm': the run spans < "
         f"{harness.MIN_RELAXATION_TIMES:g} relaxation times τ = 1/(2d), so its norm_ratio is not a test of the "
         "theory; its angle still is, measured at the predicted norm."),
    ]
    return summary, rows, columns, notes, verdict, lambda out: _plots(out, rows, arms, run["model_samples"])


def fill_rounding_factors(rows: list[dict], arms: list[Arm], samples: int) -> None:
    """Each row's stored/computed ratio over fp32's at the same d (what storing in the arm's format
    adds), and the element model's factor at the arm's computed update."""
    by_arm = {a.label: a for a in arms}
    for row in rows:
        base = next((r for r in rows if r["arm"] == "fp32" and r["exponent"] == row["exponent"]), None)
        if base is not None:
            row["rounding_factor"] = row["stored_over_computed"] / base["stored_over_computed"]
        row["model_rounding_factor"] = element_model(row["computed_update"], by_arm[row["arm"]].rounding, samples)


# ---------------------------------------------------------------------- verdict


def _span(values, fmt="{:+.0%}") -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "—"
    lo, hi = min(values), max(values)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}…{fmt.format(hi)}"


_ROUNDING = {a.label: a.rounding for a in ARMS}


def _relation(lo: float, hi: float) -> str:
    """Where the interval [lo, hi] of η_r lies against the bf16 half-ulp band 2^-9…2^-8."""
    band_lo, band_hi = HALF_ULP
    if hi < band_lo * (1 - 1e-9):
        return "below the half-ulp band 2^-9…2^-8"
    if lo > band_hi * (1 + 1e-9):
        return "above the half-ulp band 2^-9…2^-8"
    if hi <= band_lo * (1 + 1e-9):
        return "at or below the lower edge of the half-ulp band 2^-9…2^-8"
    if lo >= band_hi * (1 - 1e-9):
        return "at or above the upper edge of the half-ulp band 2^-9…2^-8"
    return "overlapping the half-ulp band 2^-9…2^-8"


def _labels(rows) -> str:
    return ", ".join(r["eta_r_label"] for r in rows) or "none"


def verdict_sentences(rows: list[dict], thresholds: dict) -> list[str]:
    """The table in words: fp32 against the theory, then per bf16 arm where its angle departs from
    η_r (against the half-ulp band and the element model), what storing does to the update, its
    norm against fp32's, and the training loss; numbers only from the rows."""
    out = []
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    by = {arm: sorted((r for r in rows if r["arm"] == arm), key=lambda r: -r["eta_r"]) for arm in arms}
    fp32 = by.get("fp32", [])
    if fp32:
        settled = [r for r in fp32 if r["at_equilibrium"]]
        held = [r for r in fp32 if not r["at_equilibrium"]]
        out.append(f"fp32: angle {harness.within([r['angle_error'] for r in fp32])} of η_r at every η_r "
                   f"({fp32[0]['eta_r_label']}…{fp32[-1]['eta_r_label']}: {_span([r['angle_error'] for r in fp32])}); "
                   + (f"norm {_span([r['norm_error'] for r in settled])} of the prediction where the run reached "
                      f"equilibrium (η_r = {_labels(settled)})" if settled else "no run reached equilibrium")
                   + (f"; held at the predicted norm (< 5τ: not a test of the norm) at η_r = {_labels(held)}"
                      if held else ""))
        out.append(f"fp32: the update the kernel computed is ×{_span([r['update_ratio'] for r in fp32], '{:.2f}')} "
                   f"of η_r and E[ĝ²/v̂] = {_span([r['grad_power'] for r in fp32], '{:.2f}')} (the theory assumes 1): "
                   "the angle's deviations from η_r are the update's")
    for arm in arms:
        if arm == "fp32":
            continue
        out += _arm_sentences(arm, by[arm], fp32, thresholds.get(_ROUNDING.get(arm)))
    if fp32:
        parts = []
        for arm in arms:
            if arm != "fp32":
                diffs = [r["final_loss"] - _base(fp32, r)["final_loss"] for r in by[arm]]
                parts.append(f"{arm} {_span(diffs, '{:+.3f}')}")
        if parts:
            out.append("final training loss minus fp32's at the same η_r: " + "; ".join(parts))
    unchanged = {arm: [r["unchanged_fraction"] for r in by[arm]] for arm in arms if arm != "fp32"}
    if unchanged:
        out.append("conv elements the last step left unchanged: " + "; ".join(
            f"{arm} {_span(v, '{:.0%}')}" for arm, v in unchanged.items())
            + (f" (fp32 {_span([r['unchanged_fraction'] for r in fp32], '{:.1%}')})" if fp32 else "")
            + ", rising as η_r falls: a frozen element alone does not tell the roundings apart — stochastic rounding "
              "also leaves most elements unchanged, but moves each by whole ulps with the right probability")
    nearest = [r for arm in arms if _ROUNDING.get(arm) == "nearest" for r in by[arm]]
    stochastic = [r for arm in arms if _ROUNDING.get(arm) == "stochastic" for r in by[arm]]
    if fp32 and nearest:
        worse = [r["final_loss"] - _base(fp32, r)["final_loss"] for r in nearest]
        below = sorted((r for r in nearest if r["d"] < HALF_ULP[0]), key=lambda r: -r["eta_r"])
        text = ("D'Angelo et al. (NeurIPS 2024) find weight decay matters for bf16 training of LLMs. Here, on a "
                "small ConvNet without divergences, the decay step d·|ω| is below half an ulp of every element "
                + (f"at η_r ≤ {below[0]['eta_r_label']} (d ≤ {below[0]['d']:.1e} < 2^-9)" if below
                   else "at no η_r tested")
                + ", where round-to-nearest storage lets it reach the weights only riding on updates")
        if stochastic:
            sr = [r["final_loss"] - _base(fp32, r)["final_loss"] for r in stochastic]
            text += (f"; round-to-nearest trained to a loss {_span(worse, '{:+.3f}')} against fp32, stochastic "
                     f"rounding {_span(sr, '{:+.3f}')}")
        out.append(text + ". Whether decay acts at all in bf16 depends on the storage (stochastic rounding or "
                   "higher-precision master weights): a precondition for their effect, not a test of it")
    return out


def _base(fp32: list[dict], row: dict) -> dict:
    return next(b for b in fp32 if b["exponent"] == row["exponent"])


def _arm_sentences(arm: str, mine: list[dict], fp32: list[dict], model_k: float | None) -> list[str]:
    out = []
    rounding = _ROUNDING.get(arm)
    departs = [r for r in mine if abs(r["angle_error"]) > DEPARTURE]
    if departs:
        first = max(departs, key=lambda r: r["eta_r"])
        smaller = [r for r in mine if r["eta_r"] <= first["eta_r"]]
        where = (f"at η_r ≤ {first['eta_r_label']}" if len(smaller) == len(departs)
                 else f"at η_r = {_labels(sorted(departs, key=lambda r: -r['eta_r']))}")
        signs = {r["angle_error"] > 0 for r in departs}
        word = "above" if signs == {True} else "below" if signs == {False} else "away from"
        larger = [r for r in mine if r["eta_r"] > first["eta_r"]]
        sentence = (f"{arm}: the angle departs more than {DEPARTURE:.0%} {word} η_r {where} (angle/η_r "
                    f"{_span([r['angle_ratio'] for r in departs], '{:.2f}')})")
        if larger:
            bracket = min(larger, key=lambda r: r["eta_r"])
            sentence += (f" and stays within {DEPARTURE:.0%} at larger η_r: the crossing lies between "
                         f"{first['eta_r_label']} and {bracket['eta_r_label']}, "
                         f"{_relation(first['eta_r'], bracket['eta_r'])}")
            if model_k is not None:
                inside = first["eta_r"] <= 2.0 ** -model_k <= bracket["eta_r"]
                sentence += (f"; the element model (Gaussian elements, the ideal update) puts it at 2^-{model_k:.2f}"
                             + (", inside that interval" if inside else ", outside that interval"))
        else:
            sentence += f": at every η_r tested (the crossing lies above {first['eta_r_label']})"
    else:
        sentence = (f"{arm}: the angle stays within {DEPARTURE:.0%} of η_r at every η_r tested "
                    f"(angle/η_r {_span([r['angle_ratio'] for r in mine], '{:.2f}')})")
        if model_k is not None:
            sentence += f"; the element model puts the {DEPARTURE:.0%} crossing at 2^-{model_k:.2f}"
    out.append(sentence)
    factors = [r for r in mine if r["rounding_factor"] is not None]
    if factors:
        out.append(f"{arm}: stored over computed update, relative to fp32 (element model: Gaussian elements; the "
                   "run's own weights): " + ", ".join(
                       f"{r['eta_r_label']} ×{r['rounding_factor']:.2f} ({r['model_rounding_factor']:.2f}; "
                       f"{r['model_own_weights']:.2f})" for r in factors))
    if rounding == "stochastic" and factors:
        noisy = [r for r in factors if r["rounding_factor"] ** 2 - 1 >= 1]
        out.append(f"{arm}: rounding noise over signal in ‖Δω‖² (factor² − 1): " + ", ".join(
            f"{r['eta_r_label']} {r['rounding_factor'] ** 2 - 1:.2f}" for r in factors)
            + (": the stored rotation is noise-dominated at η_r ≤ "
               f"{max(noisy, key=lambda r: r['eta_r'])['eta_r_label']}"
               if noisy else ": the noise never dominates in this range"))
    if not fp32:
        return out
    pairs = [(r, _base(fp32, r)) for r in mine]
    updates = [r["update_ratio"] / b["update_ratio"] for r, b in pairs]
    powers = [r["grad_power"] / b["grad_power"] for r, b in pairs]
    if rounding == "nearest":
        lower = sum(p < 0.97 for p in powers)
        out.append(f"{arm}: the update the kernel computed is ×{_span(updates, '{:.2f}')} fp32's and E[ĝ²/v̂] "
                   f"×{_span(powers, '{:.2f}')} fp32's"
                   + (": exp_avg_sq moves by (1−β2)(g² − v), at most 1e-3 of v downwards, below half an ulp, so "
                      "round-to-nearest lets v grow but never decay and Adam's steps shrink (an η_r-independent "
                      "departure)" if lower > len(powers) / 2 else ""))
    long = [(r, b) for r, b in pairs if r["relaxation_times"] >= harness.MIN_RELAXATION_TIMES]
    if long:
        parts = []
        for r, b in long:
            part = f"{r['eta_r_label']} ×{r['norm_ratio'] / b['norm_ratio']:.3f}"
            if rounding == "stochastic":
                part += f" (predicted ×{sr_norm_inflation(r['eta_r']):.3f})"
            elif rounding == "nearest":
                part += f" (computed update ×{r['update_ratio'] / b['update_ratio']:.3f})"
            if not r["at_equilibrium"]:
                part += f", still moving {r['norm_drift']:+.0%} across the window"
            parts.append(part)
        text = f"{arm}: norm over fp32's where the runs span ≥ {harness.MIN_RELAXATION_TIMES:g}τ: " + "; ".join(parts)
        if rounding == "nearest":
            text += " — at equilibrium the norm scales with the update, and the ratchet keeps moving it"
        if rounding == "stochastic":
            gap = max(abs(r["norm_ratio"] / b["norm_ratio"] / sr_norm_inflation(r["eta_r"]) - 1) for r, b in long)
            predicted = max(sr_norm_inflation(r["eta_r"]) - 1 for r, _ in long)
            text += (f": measured within {100 * gap:.1f}% of the prediction, whose inflation (≤ {100 * predicted:.1f}% "
                     "here) these runs do not resolve" if gap > predicted else
                     f": measured within {100 * gap:.1f}% of the prediction")
        out.append(text)
    short = [r for r, _ in pairs if r["relaxation_times"] < harness.MIN_RELAXATION_TIMES]
    if short and rounding == "stochastic":
        out.append(f"{arm}: at η_r = {_labels(short)} the runs span < 5τ (held at the predicted norm), so SR's norm "
                   "inflation, predicted ×" + ", ".join(f"{sr_norm_inflation(r['eta_r']):.3f}" for r in short)
                   + " at equilibrium, is not tested")
    return out


# ---------------------------------------------------------------------- plot


def _plots(out, rows, arms, samples) -> list[str]:
    plt = harness.pyplot()
    from matplotlib.ticker import FixedLocator, NullLocator

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.6))
    exps = sorted({r["exponent"] for r in rows})
    grid = [min(exps) - 0.5 + i * (max(exps) - min(exps) + 1) / 24 for i in range(25)]
    xs_grid = [2.0 ** -k for k in grid]
    colors = {a.label: f"C{i}" for i, a in enumerate(arms)}
    # (axis, row key, title, scale): "log" for ratios on a log axis (the angle: log-log), "ratio" linear around 1.
    panels = [
        (axes[0][0], "angle_ratio", "measured angle / η_r (log-log)", "log"),
        (axes[0][1], "norm_ratio", "RMS neuron norm / predicted", "ratio"),
        (axes[0][2], "rounding_factor", "stored / computed update, relative to fp32", "log"),
        (axes[1][0], "update_ratio", "update the kernel computed, ‖u‖/‖ω‖ / η_r", "ratio"),
        (axes[1][1], "unchanged_fraction", "fraction of conv elements the last step left unchanged", None),
        (axes[1][2], "final_loss", "training loss (mean of the last 10% of steps)", None),
    ]
    for ax, key, title, scale in panels:
        ax.axvspan(*HALF_ULP, color="gold", alpha=0.25, lw=0, zorder=0, label="bf16 half ulp: 2^-9…2^-8")
        if scale:
            ax.axhline(1.0, color="black", lw=0.8, ls="--")
            for level in (1 - DEPARTURE, 1 + DEPARTURE):
                ax.axhline(level, color="0.6", lw=0.7, ls=":")
        for arm in arms:
            mine = sorted((r for r in rows if r["arm"] == arm.label and r[key] is not None), key=lambda r: r["eta_r"])
            if not mine:
                continue
            ax.plot([r["eta_r"] for r in mine], [r[key] for r in mine], color=colors[arm.label], lw=1, label=arm.label)
            for r in mine:
                filled = r["at_equilibrium"] or key != "norm_ratio"
                ax.plot(r["eta_r"], r[key], "o", color=colors[arm.label],
                        mfc=colors[arm.label] if filled else "white", ms=5)
        if key == "rounding_factor":
            label = "element model on the run's own weights"
            for arm in arms:
                own = [r for r in rows if r["arm"] == arm.label and arm.rounding is not None]
                if own:
                    ax.plot([r["eta_r"] for r in own], [r["model_own_weights"] for r in own], "x",
                            color=colors[arm.label], ms=7, label=label)
                    label = None
        if key in ("angle_ratio", "rounding_factor"):
            for arm in arms:
                if arm.rounding is not None:
                    model = [element_model(x, arm.rounding, samples) for x in xs_grid]
                    ax.plot(xs_grid, model, color=colors[arm.label], ls=":", lw=1.2,
                            label=f"element model, {arm.label} (Gaussian)")
        ax.set_xscale("log", base=2)
        if scale == "log":
            ax.set_yscale("log", base=2)
            lo, hi = ax.get_ylim()
            ticks = [t for t in (0.5, 0.6, 0.7, 0.8, 0.9, 1, 1.1, 1.25, 1.5, 2, 2.5, 3, 4) if lo <= t <= hi]
            ax.yaxis.set_major_locator(FixedLocator(ticks))
            ax.yaxis.set_minor_locator(NullLocator())
            ax.set_yticklabels([f"{t:g}" for t in ticks])
        ax.set_xlabel("η_r = sqrt(2d(1−β1)/(1+β1)), d = ηλ")
        ax.set_title(title, fontsize=9)
    axes[0][0].legend(fontsize=7, loc="upper right")
    axes[0][2].legend(fontsize=7, loc="upper right")
    axes[0][1].text(0.02, 0.02, "open: not at equilibrium (run < 5τ, held at the predicted norm; or norm still moving > 3%)",
                    transform=axes[0][1].transAxes, fontsize=7)
    fig.suptitle("AdamW, bf16 storage: measured over predicted (dashed: 1; dotted: ±10%); element model dotted "
                 "in the arm's colour", fontsize=10)
    return [harness.savefig(fig, out / "precision.png")]


# ---------------------------------------------------------------------- quality (issue #11's target)


def train_convnet(run: harness.Run, arm: Arm, seed: int, cfg: dict, label: str, bar):
    """The equilibrium experiment's ConvNet run (``equilibrium.train``: the digits split,
    initialisation and batches of ``seed``, AdamW at its lr and λ) with the model stored as the
    arm says; returns the per-step losses, the model and the test accuracy."""
    x, y, x_test, y_test = harness.digits(run, LABEL_NOISE, seed)
    torch.manual_seed(seed)
    model = _ConvNet(cfg["width"]).to(device=run.device, dtype=arm.dtype)
    options = dict(arm.options)
    if options.get("stochastic_rounding"):
        options.setdefault("rounding_seed", seed)
    opt = harness.make_optimizer("adamw", harness.param_groups(model, cfg["weight_decay"]), cfg["lr"],
                                 cfg["weight_decay"], run.args.backend, **options)
    monitor = RotationMonitor(opt, every=cfg["every"], names=dict(model.named_parameters()))  # the loss curve
    batches = data.Batches(x.to(arm.dtype), y, cfg["batch"], seed=seed + 1)
    with _steps(run, cfg["steps"]):
        losses, _ = harness.train_classifier(run, model, opt, monitor, batches, label, bar, lambda record: {})
    _, test_acc = harness.accuracy(model, x_test.to(arm.dtype), y_test)
    return losses, model, test_acc


def run_quality(run: harness.Run, arms: list[Arm], seeds: list[int], bar, weights: dict) -> dict:
    """Part quality: every arm, model and seed; returns summary["quality"]: the runs, the table
    (one row per model and arm) and the configuration (``weights`` gains the first seed's models)."""
    cfg = run["quality"]
    runs = []
    for seed in seeds:
        for model_name in QUALITY_MODELS:
            c = cfg[model_name]
            for arm in arms:
                label = f"quality {model_name} {arm.label} seed={seed}"
                bar.set_postfix_str(label)
                if model_name == "tinygpt":
                    model, result = why_wd.train_lm(run, seed, c["weight_decay"], c["lr"], c["steps"], arm.dtype,
                                                    label, bar, options=arm.options, lm=c["lm"])
                    row = {"final_loss": result["final_loss"], "diverged_at": result["diverged_at"],
                           "spikes": result["spikes"]}
                else:
                    losses, model, test_acc = train_convnet(run, arm, seed, c, label, bar)
                    finite = all(math.isfinite(v) for v in losses)
                    row = {"final_loss": harness.tail_mean(losses, 0.1), "test_accuracy": test_acc,
                           "diverged_at": None if finite else next(i + 1 for i, v in enumerate(losses)
                                                                   if not math.isfinite(v))}
                runs.append({"model": model_name, "arm": arm.label, "seed": seed, "run": label,
                             "steps": c["steps"], "lr": c["lr"], "weight_decay": c["weight_decay"], **row})
                if seed == seeds[0]:
                    weights[label] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    lm = cfg["tinygpt"]
    return {"runs": runs, "table": quality_table(runs, arms), "seeds": seeds, "target": QUALITY_TARGET,
            "subject": QUALITY_SUBJECT, "config": cfg,
            "tinygpt_decays": lm["weight_decay"] * lm["lr"] * why_wd.schedule_sum(lm["steps"]),
            "arms": [{"label": a.label, "dtype": str(a.dtype).removeprefix("torch."), "options": a.options,
                      "about": a.about, "bytes_per_parameter": bytes_per_parameter(a)} for a in arms]}


def _value(run: dict) -> float:
    """A run's final loss, a diverged run's infinite (its loss before diverging is not comparable)."""
    return math.inf if run.get("diverged_at") else run["final_loss"]


def quality_table(runs: list[dict], arms: list[Arm]) -> list[dict]:
    """Per model and arm: the final loss over seeds (mean, min, max), the mean's relative
    difference to fp32's mean and the per-seed paired ones, and the target's verdict."""
    out = []
    for model_name, title in QUALITY_MODELS.items():
        fp32 = {r["seed"]: _value(r) for r in runs if r["model"] == model_name and r["arm"] == "fp32"}
        base = sum(fp32.values()) / len(fp32) if fp32 else None
        for arm in arms:
            mine = [r for r in runs if r["model"] == model_name and r["arm"] == arm.label]
            if not mine:
                continue
            values = [_value(r) for r in mine]
            mean = sum(values) / len(values)
            paired = [v / fp32[r["seed"]] - 1 for r, v in zip(mine, values) if r["seed"] in fp32] \
                if arm.label != "fp32" else []
            relative = mean / base - 1 if base is not None and arm.label != "fp32" else None
            within = None if relative is None else bool(abs(relative) <= QUALITY_TARGET)
            out.append({
                "model": title, "arm": arm.label, "bytes_per_param": bytes_per_parameter(arm),
                "seeds": [r["seed"] for r in mine], "losses": values, "final_loss": mean,
                "loss_min": min(values), "loss_max": max(values),
                "loss": f"{mean:.4f} [{min(values):.4f}…{max(values):.4f}]",
                "diverged": sum(1 for r in mine if r.get("diverged_at")),
                "relative_to_fp32": relative, "paired_relative": paired,
                "vs_fp32": "—" if relative is None else _percent(relative),
                "per_seed": "—" if not paired else _span(paired, "{:+.2%}"),
                "target": "—" if within is None else f"{'within' if within else 'outside'} {QUALITY_TARGET:.0%}",
                "within_target": within,
            })
    return out


def _percent(x: float) -> str:
    return f"{x:+.2%}" if math.isfinite(x) else "diverged"


def quality_report(quality: dict) -> tuple[list[dict], list[str], list[str], list[str]]:
    """Part quality's table, columns, notes and verdict."""
    table, cfg, seeds = quality["table"], quality["config"], quality["seeds"]
    lm, conv = cfg["tinygpt"], cfg["convnet"]
    columns = ["model", "arm", "bytes_per_param", "loss", "vs_fp32", "per_seed", "target"]
    notes = [
        "",
        (f"{len(seeds)} seeds ({', '.join(map(str, seeds))}), the same data, initialisation and batches in every "
         "arm. TinyGPT: why-wd's (d {d}, {layers} layer(s), context {context}, batch {batch}; one pass over the "
         "standard library's sources), AdamW β = {betas}, lr {lr:g} with {schedule}, {steps} steps, λ = {wd:g} "
         "(D = Σ_t η_t·λ = {D:.3g}). ConvNet: the equilibrium experiment's (width {width}, batch {cbatch}, "
         "{label_noise:.0%} label noise), AdamW β = {cbetas}, lr {clr:g} constant, λ = {cwd:g}, {csteps} steps."
         ).format(**lm["lm"], betas=tuple(lm["betas"]), lr=lm["lr"], schedule=lm["schedule"], steps=lm["steps"],
                  wd=lm["weight_decay"], D=quality["tinygpt_decays"], width=conv["width"], cbatch=conv["batch"],
                  label_noise=conv["label_noise"], cbetas=tuple(conv["betas"]), clr=conv["lr"],
                  cwd=conv["weight_decay"], csteps=conv["steps"]),
        ("loss: final training loss (mean of the last 10% of steps), mean [min…max] over seeds. vs_fp32: the mean's "
         "relative difference to fp32's mean; per_seed: each seed's against fp32's of the same seed, min…max. "
         f"target: |vs_fp32| ≤ {QUALITY_TARGET:.0%} (issue #11). bytes_per_param: AdamW's resident bytes a "
         "parameter (parameter, correction, states; not the gradient)."),
    ]
    return table, columns, notes, quality_verdict(quality)


def quality_verdict(quality: dict) -> list[str]:
    """The target in words, per model, then what bf16 to nearest and the 32-bit master did in the
    same runs; numbers only from the table."""
    table, target, subject = quality["table"], quality["target"], quality["subject"]
    n = len(quality["seeds"])
    out = []
    models = list(dict.fromkeys(r["model"] for r in table))
    for model in models:
        rows = {r["arm"]: r for r in table if r["model"] == model}
        fp32 = rows.get("fp32")
        if fp32 is None:
            continue
        spread = (fp32["loss_max"] - fp32["loss_min"]) / fp32["final_loss"]
        parts = []
        for arm, r in rows.items():
            if arm == "fp32":
                continue
            text = f"{arm} {r['final_loss']:.4f} ({r['vs_fp32']}; per seed {r['per_seed']}"
            signs = {p > 0 for p in r["paired_relative"] if p != 0}
            if len(r["paired_relative"]) > 1 and len(signs) == 1:
                text += f", {'higher' if signs == {True} else 'lower'} than fp32's for every seed"
            parts.append(text + ")")
        out.append(f"quality, {model}, {n} seeds: fp32 final loss {fp32['final_loss']:.4f} "
                   f"[{fp32['loss_min']:.4f}…{fp32['loss_max']:.4f}] (its seed spread {spread:.1%} of the mean); "
                   + "; ".join(parts))
    judged = [r for r in table if r["arm"] == subject and r["within_target"] is not None]
    if judged:
        met = [r for r in judged if r["within_target"]]
        missed = [r for r in judged if not r["within_target"]]
        words = []
        if met:
            words.append("met on " + " and ".join(f"{r['model']} ({r['vs_fp32']})" for r in met))
        if missed:
            words.append("missed on " + " and ".join(f"{r['model']} ({r['vs_fp32']})" for r in missed))
        out.append(f"quality: issue #11's target — compensated bf16 + 8-bit states ({subject}, "
                   f"{judged[0]['bytes_per_param']:.2f} bytes a parameter against fp32's 12) within {target:.0%} of "
                   f"fp32's final training loss, mean over {n} seeds — " + "; ".join(words))
        wider = [r for r in judged if r["within_target"] and max(map(abs, r["paired_relative"] or [0])) > target]
        if wider:
            out.append("quality: single seeds of " + ", ".join(r["model"] for r in wider) + f" differ by more than "
                       f"{target:.0%} (per seed " + "; ".join(r["per_seed"] for r in wider) + "): the target holds "
                       "for the mean only")
    for arm in dict.fromkeys(r["arm"] for r in table):
        if arm in ("fp32", subject):
            continue
        rows = [r for r in table if r["arm"] == arm and r["within_target"] is not None]
        if rows:
            out.append(f"quality: {arm} in the same runs: " + "; ".join(
                f"{r['model']} {r['vs_fp32']} ({r['target']} of fp32's)" for r in rows))
    return out


def _quality_plot(out, quality: dict) -> str:
    """Per model: each seed's final loss relative to fp32's of the same seed (dots), the mean's
    relative to fp32's mean (bar), and the ±target band."""
    plt = harness.pyplot()
    models = list(dict.fromkeys(r["model"] for r in quality["table"]))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.8), squeeze=False)
    colors = {a["label"]: f"C{i}" for i, a in enumerate(quality["arms"])}
    target = quality["target"]
    for ax, model in zip(axes[0], models):
        rows = [r for r in quality["table"] if r["model"] == model and r["arm"] != "fp32"]
        ax.axhspan(-100 * target, 100 * target, color="0.9", zorder=0, label=f"±{target:.0%}: the target")
        ax.axhline(0, color="black", lw=0.8)
        for i, r in enumerate(rows):
            if r["relative_to_fp32"] is not None and math.isfinite(r["relative_to_fp32"]):
                ax.bar(i, 100 * r["relative_to_fp32"], width=0.5, color=colors[r["arm"]], alpha=0.5)
            finite = [100 * p for p in r["paired_relative"] if math.isfinite(p)]
            ax.plot([i] * len(finite), finite, "o", color=colors[r["arm"]], ms=5)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r["arm"] for r in rows], fontsize=7)
        ax.set_ylabel("final training loss vs fp32's (%)")
        ax.set_title(f"{model}: mean (bar), each seed (dots)", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"Issue #11: final training loss relative to fp32 AdamW's, {len(quality['seeds'])} seeds",
                 fontsize=10)
    return harness.savefig(fig, out / "quality.png")
