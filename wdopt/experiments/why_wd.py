"""``wdopt why-wd``: why weight decay helps (D'Angelo et al., NeurIPS 2024), where it has time to act.

Weight decay shrinks a weight by the factor (1 − η_t·λ) at step t, so a run spans D = Σ_t η_t·λ
*decay time constants*. Where D ≪ 1, decay has barely begun when the run ends and cannot explain
anything; the paper's runs have D of order 1–10. This experiment therefore sweeps D at a fixed
number of steps and a fixed lr schedule (linear warm-up over 5% of the steps, then cosine to 0,
as in the paper), choosing λ = D / Σ_t η_t for each point, and repeats every point over several
seeds (the same seeds at every D, so that each seed gives a paired difference against λ = 0).
Three claims:

(a) One-pass language modelling. A pre-LayerNorm TinyGPT over bytes reads the text corpus (the
    standard library's own sources, or ``--data FILE``) once, in random order of non-overlapping
    windows — every batch is new, so the loss cannot collapse and gradients stay noise-dominated.
    AdamW, β = (0.9, 0.95), decay on matrices and embeddings (not on biases and LayerNorm gains).
    Reported: the training loss at the end of the schedule (mean over the last 10% of steps).
    Claim: weight decay gives a lower *training* loss at the end — an optimisation effect.
(b) Test error against training-set size at a fixed iteration budget. An MLP with LayerNorm
    learns synthetic teacher–student data (``data.teacher_student``, logit noise 0.5) for the same
    number of steps at every training-set size; the largest set is one pass (≥ steps × batch),
    the smaller ones many passes. SGD with momentum μ = 0.9, L2 λ, the same schedule; with
    momentum the L2 term shrinks weights by about η·λ/(1 − μ) a step, so D counts that (λ =
    D·(1 − μ) / Σ_t η_t). Claim: weight decay lowers the test error in both regimes.
(c) bfloat16 training. Part (a)'s model with its parameters and optimizer state in bfloat16
    (logits cast to float32 for the loss), one pass at a high lr (30× part (a)'s: at 10× no run
    spiked). Counted: loss spikes (loss > 2× the median of the previous 50 steps) and divergences
    (a non-finite loss; the run stops there); the final loss is compared as in (a), a diverged
    run counting as infinitely worse. Claim: weight decay prevents divergences in bf16. Three
    ways of storing the model (``wdopt precision``'s arms): bf16 rounded to nearest (at every D),
    bf16 with stochastic rounding and compensated bf16 (a 24-bit master weight, 8-bit states,
    stochastic rounding: 5.03 bytes a parameter) at the preset's subset of D (``"arms"``), so that
    each precision has its λ = 0 run and the precisions meet at the same D and seed.

A claim *holds* at a point D when weight decay is better than λ = 0 for every seed (paired by
seed), is *reversed* when it is worse for every seed, and is *within seed noise* otherwise.
Beside each point the table gives the matrices' norm at the end relative to λ = 0: for a weight
whose loss ignores its scale (one followed by a normalisation) the effective learning rate is
η/‖w‖² (SGD) or, per element, η/‖w‖ (Adam-type updates), so a norm ratio r means an effective
step 1/r² (1/r) times that of the λ = 0 run — the mechanism the paper proposes for (a) and (c);
and the run's length in AdamW relaxation times of ‖w‖² (2D, ``wdopt.theory``: τ = 1/(2ηλ)), the
point from which the equilibrium, not the initialisation, sets the norm.

Options: ``--lr`` and ``--steps`` set part (a)'s lr and steps (part (c): its lr multiple, and
``--steps`` when given); ``--weight-decay λ`` replaces every part's sweep with λ ∈ {0, λ};
``--seeds N`` the number of seeds (from ``--seed`` on). Every part reports what it measures;
nothing is tuned towards the claims. Small-CPU sizes, far from the paper's; ``--preset gpu``
gives larger ones.
"""

from __future__ import annotations

import math

import torch

from . import data, harness
from .models import MLP, TinyGPT

NAME = "why-wd"
HELP = "why weight decay: LM training loss, test error vs data size, bf16 stability, across decay time constants"

PRESETS = {
    "default": {"steps": 500, "lr": 3e-3, "seeds": 3,
                "lm": {"context": 32, "d": 32, "layers": 1, "heads": 2, "batch": 16},
                "decay_sums": (0.0, 0.1, 0.3, 1.0, 3.0, 10.0),
                "c": {"steps": 500, "lr_factor": 30.0,
                      "arms": {"bf16-nearest": (0.0, 1.0, 10.0), "bf16-stochastic": (0.0, 10.0),
                               "bf16-master24-states8": (0.0, 10.0)}},
                "b": {"steps": 400, "batch": 32, "dim": 16, "hidden": 64, "classes": 5, "lr": 0.1,
                      "decay_sums": (0.0, 0.3, 3.0, 10.0), "sizes": (100, 1000, 12800), "test": 4095}},
    "quick": {"steps": 60, "lr": 3e-3, "seeds": 2,
              "lm": {"context": 16, "d": 16, "layers": 1, "heads": 2, "batch": 8},
              "decay_sums": (0.0, 1.0, 10.0),
              "c": {"steps": 30, "lr_factor": 30.0,  # the other precisions at D = 10 only: test time
                    "arms": {"bf16-nearest": (0.0, 10.0), "bf16-stochastic": (10.0,), "bf16-master24-states8": (10.0,)}},
              "b": {"steps": 100, "batch": 16, "dim": 8, "hidden": 16, "classes": 4, "lr": 0.1,
                    "decay_sums": (0.0, 10.0), "sizes": (50, 1600), "test": 1023}},
    "gpu": {"steps": 4000, "lr": 1e-3, "seeds": 3,
            "lm": {"context": 256, "d": 384, "layers": 6, "heads": 6, "batch": 32},
            "decay_sums": (0.0, 0.1, 0.3, 1.0, 3.0, 10.0),
            "c": {"steps": 4000, "lr_factor": 30.0,
                  "arms": {"bf16-nearest": (0.0, 1.0, 3.0, 10.0), "bf16-stochastic": (0.0, 1.0, 3.0, 10.0),
                           "bf16-master24-states8": (0.0, 1.0, 3.0, 10.0)}},
            "b": {"steps": 5000, "batch": 256, "dim": 64, "hidden": 512, "classes": 10, "lr": 0.1,
                  "decay_sums": (0.0, 0.3, 1.0, 3.0, 10.0), "sizes": (500, 5000, 50000, 1280000),
                  "test": 16383}},
}
BETAS = (0.9, 0.95)
MOMENTUM = 0.9
WARMUP = 0.05
SPIKE_FACTOR, SPIKE_WINDOW = 2.0, 50


def add_arguments(parser) -> None:
    harness.add_common_arguments(parser, optimizers=("adamw", "sgd", "lion"), text_data=True)
    parser.add_argument("--part", choices=("a", "b", "c", "all"), default="all")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per point, from --seed on (default: the preset's)")


def schedule_sum(steps: int) -> float:
    """Σ_t of the lr factor over a run (warm-up then cosine to 0): Σ_t η_t = lr · this."""
    factor = harness.warmup_schedule(steps, int(WARMUP * steps), "cosine")
    return sum(factor(i) for i in range(steps))


def sweep(decay_sums, lr: float, steps: int, weight_decay: float | None, per_step: float = 1.0) -> list[tuple]:
    """The (D, λ) points of one part: λ = D·per_step / (lr·Σ factors) (``per_step``: 1 − μ for SGD's
    L2 through momentum), or, with ``--weight-decay``, λ ∈ {0, that} and the D it gives."""
    total = lr * schedule_sum(steps)
    if weight_decay is not None:
        return [(0.0, 0.0), (weight_decay * total / per_step, weight_decay)]
    return [(d, d * per_step / total) for d in decay_sums]


# ---------------------------------------------------------------------- language model (a, c)


def _corpus(run: harness.Run, steps: int, lm: dict) -> torch.Tensor:
    need = (steps * lm["batch"] + 1) * lm["context"] + 1
    corpus = data.stdlib_corpus(need, getattr(run.args, "data", None))
    if corpus.shape[0] < need:
        raise ValueError(f"the corpus has {corpus.shape[0]} bytes; {steps} one-pass steps need {need}")
    return corpus


def matrix_norm(model: torch.nn.Module) -> float:
    """Frobenius norm of all matrices and embeddings (the parameters that take weight decay)."""
    return math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in model.parameters() if p.dim() >= 2))


def train_lm(run: harness.Run, seed: int, wd: float, lr: float, steps: int, dtype, label: str, bar,
             options: dict | None = None, lm: dict | None = None):
    """One one-pass TinyGPT run (``lm``: its size, default the preset's; ``options``: extra
    optimizer options, e.g. a ``wdopt precision`` arm's); returns the model and its results."""
    lm = run["lm"] if lm is None else lm
    corpus = _corpus(run, steps, lm)
    torch.manual_seed(seed)
    model = TinyGPT(lm["context"], lm["d"], lm["layers"], lm["heads"]).to(device=run.device, dtype=dtype)
    name = run.args.optimizer or "adamw"  # "sgd" is refused for parts a and c in run()
    extra = {"betas": BETAS} if name == "adamw" else {}
    extra.update(options or {})
    if extra.get("stochastic_rounding"):
        extra.setdefault("rounding_seed", seed)
    opt = harness.make_optimizer(name, harness.param_groups(model, wd), lr, wd, run.args.backend, **extra)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, harness.warmup_schedule(steps, int(WARMUP * steps), "cosine"))
    batches = data.text_batches(corpus, lm["context"], lm["batch"], seed=seed + 1)
    losses, spikes, diverged_at, decay_sum = [], 0, None, 0.0
    for step in range(1, steps + 1):
        x, y = next(batches)
        x, y = x.to(run.device), y.to(run.device)
        loss = torch.nn.functional.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
        value = loss.item()
        spike = False
        if not math.isfinite(value):
            diverged_at = step
        elif len(losses) >= SPIKE_WINDOW:
            median = sorted(losses[-SPIKE_WINDOW:])[SPIKE_WINDOW // 2]
            spike = value > SPIKE_FACTOR * median
            spikes += spike
        run.log(run=label, step=step, lr=opt.param_groups[0]["lr"], loss=value, spike=int(spike))
        bar.update()
        if diverged_at is not None:
            bar.update(steps - step)
            break
        losses.append(value)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        decay_sum += opt.param_groups[0]["lr"] * wd
        opt.step()
        sched.step()
    return model, {"final_loss": harness.tail_mean(losses, 0.1) if losses else math.nan, "spikes": spikes,
                   "diverged_at": diverged_at, "decay_sum": decay_sum, "weight_norm": matrix_norm(model),
                   "steps_done": len(losses)}


# ---------------------------------------------------------------------- data-size sweep (b)


def train_sizes(run: harness.Run, seed: int, n: int, wd: float, label: str, bar):
    cfg = run["b"]
    x, y = data.teacher_student(n, cfg["dim"], cfg["classes"], seed)
    x_test, y_test = data.teacher_student(cfg["test"], cfg["dim"], cfg["classes"], seed)
    x, y, x_test, y_test = (t.to(run.device) for t in (x, y, x_test, y_test))
    torch.manual_seed(seed)
    model = MLP(cfg["dim"], cfg["hidden"], cfg["classes"]).to(run.device)
    name = run.args.optimizer or "sgd"
    lr = b_lr(cfg, name)
    extra = {"momentum": MOMENTUM} if name == "sgd" else {}
    opt = harness.make_optimizer(name, harness.param_groups(model, wd), lr, wd, run.args.backend, **extra)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, harness.warmup_schedule(cfg["steps"], int(WARMUP * cfg["steps"]),
                                                                           "cosine"))
    batches = data.Batches(x, y, cfg["batch"], seed=seed + 1)
    losses = []
    for step in range(1, cfg["steps"] + 1):
        xb, yb = batches.next()
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 10 == 0:
            run.log(run=label, step=step, loss=losses[-1])
        bar.update()
    train_loss, train_acc = harness.accuracy(model, x, y)
    test_loss, test_acc = harness.accuracy(model, x_test, y_test)
    epochs = cfg["steps"] * min(cfg["batch"], n) / n
    return model, {"train_size": n, "epochs": epochs, "one_pass": epochs <= 1.0, "optimizer": name, "lr": lr,
                   "train_error": 1 - train_acc, "test_error": 1 - test_acc, "test_loss": test_loss,
                   "final_loss": harness.tail_mean(losses, 0.1), "weight_norm": matrix_norm(model)}


def b_lr(cfg: dict, name: str) -> float:
    return cfg["lr"] if name == "sgd" else {"adamw": 1e-3, "lion": 1e-4}[name]


# ---------------------------------------------------------------------- driver


def run(args) -> dict:
    parts = ("a", "b", "c") if args.part == "all" else (args.part,)
    if args.optimizer == "sgd" and ("a" in parts or "c" in parts):
        harness.fail(NAME, "parts a and c train the language model with AdamW (or --optimizer lion); "
                     "--optimizer sgd applies to part b only (--part b)")
    if args.seeds is not None and args.seeds < 1:
        harness.fail(NAME, f"--seeds must be at least 1, got {args.seeds}")
    run = harness.Run(NAME, args, PRESETS)
    seeds = [args.seed + i for i in range(args.seeds if args.seeds is not None else run["seeds"])]
    steps, lr, cfg_b, cfg_c = run["steps"], run["lr"], run["b"], run["c"]
    steps_c = args.steps if args.steps is not None else cfg_c["steps"]
    lr_c = lr * cfg_c["lr_factor"]
    sgd_b = (run.args.optimizer or "sgd") == "sgd"
    points = {
        "a": sweep(run["decay_sums"], lr, steps, args.weight_decay),
        "b": sweep(cfg_b["decay_sums"], b_lr(cfg_b, run.args.optimizer or "sgd"), cfg_b["steps"], args.weight_decay,
                   per_step=1 - MOMENTUM if sgd_b else 1.0),
    }
    # Part c: per precision (a ``wdopt precision`` arm the backend can run), its own D points.
    arms_c = c_arms(run, cfg_c["arms"]) if "c" in parts else []
    points_c = {arm.label: sweep(cfg_c["arms"][arm.label], lr_c, steps_c, args.weight_decay) for arm in arms_c}
    sizes = list(cfg_b["sizes"])
    if "b" in parts and sizes[-1] < cfg_b["steps"] * cfg_b["batch"]:
        raise ValueError("the largest training set must be one pass (≥ steps × batch)")
    total = len(seeds) * ((steps * len(points["a"]) if "a" in parts else 0)
                          + (cfg_b["steps"] * len(sizes) * len(points["b"]) if "b" in parts else 0)
                          + steps_c * sum(len(p) for p in points_c.values()))
    bar = run.progress(total, NAME)
    rows, weights = [], {}

    def keep(label, seed, model):
        if seed == seeds[0]:  # the first seed's final weights (all seeds' would be large)
            weights[label] = {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def language_model(part, seed, lr_part, steps_part, dtype, name, points_part, arm=None):  # a, c: a run per D
        for d, wd in points_part:
            label = f"{name}D={d:g} seed={seed}"
            bar.set_postfix_str(label)
            model, result = train_lm(run, seed, wd, lr_part, steps_part, dtype, label, bar,
                                     options=arm.options if arm is not None else None)
            keep(label, seed, model)
            rows.append({"part": part, "run": label, "decays": d, "weight_decay": wd, "seed": seed, "lr": lr_part,
                         "steps": steps_part, "dtype": str(dtype).removeprefix("torch."),
                         **({"precision": arm.label, "options": dict(arm.options)} if arm is not None else {}),
                         **result})

    for seed in seeds:
        if "a" in parts:
            language_model("a", seed, lr, steps, torch.float32, "a ", points["a"])
        if "b" in parts:
            for n in sizes:
                for d, wd in points["b"]:
                    label = f"b n={n} D={d:g} seed={seed}"
                    bar.set_postfix_str(label)
                    model, result = train_sizes(run, seed, n, wd, label, bar)
                    keep(label, seed, model)
                    rows.append({"part": "b", "run": label, "decays": d, "weight_decay": wd, "seed": seed,
                                 "steps": cfg_b["steps"], **result})
        for arm in arms_c:
            language_model("c", seed, lr_c, steps_c, arm.dtype, f"c {arm.label} ", points_c[arm.label], arm)
    bar.close()
    points_table = aggregate(rows)
    columns = ["part", "point", "decays", "weight_decay", "result", "vs_no_decay", "norm_ratio", "relaxation_times"]
    lm_optimizer = "Lion" if args.optimizer == "lion" else f"AdamW β={BETAS}"
    notes = ["", f"D = Σ_t η_t·λ, the run's length in decay time constants (b, SGD: Σ_t η_t·λ/(1−μ)); λ chosen for "
             f"each D; warm-up then cosine to 0; {len(seeds)} seeds per point, paired: vs_no_decay is the change "
             "against λ = 0 of the same seed, mean [min…max] over seeds. a: one-pass LM, "
             f"{lm_optimizer}, loss = mean training loss over the last 10% of steps. b: test error at a fixed budget "
             "of steps × batch samples. c: bf16 parameters, stored as the point says (bf16-nearest: parameters and "
             "states rounded to nearest; bf16-stochastic: stochastic rounding; bf16-master24-states8: a 24-bit master "
             "weight and 8-bit states, stochastic rounding), each against its own λ = 0; runs diverged (non-finite "
             f"loss) / spikes (loss > {SPIKE_FACTOR:g}× the median of the previous {SPIKE_WINDOW} steps), summed over "
             "seeds. norm_ratio: ‖W‖ of all matrices at the end over λ = 0's (mean over seeds). relaxation_times: 2D, "
             "the run in AdamW relaxation times of ‖w‖²."]
    summary = {"rows": rows, "points": points_table, "parts": list(parts), "seeds": seeds, "betas": BETAS,
               "momentum": MOMENTUM, "spike_factor": SPIKE_FACTOR, "spike_window": SPIKE_WINDOW,
               "precisions": [{"label": a.label, "dtype": str(a.dtype).removeprefix("torch."), "options": a.options,
                               "about": a.about, "decays": [d for d, _ in points_c[a.label]]} for a in arms_c]}
    return run.finish(summary, points_table, columns, weights=weights, notes=notes,
                      verdict=verdict_sentences(points_table),
                      plots=lambda out: _plots(out, run.metrics, rows, points_table))


def c_arms(run: harness.Run, labels) -> list:
    """Part c's precisions: ``wdopt precision``'s arms of these labels, those the backend cannot
    run left out with a note (imported here: precision imports this module)."""
    from . import precision

    by = {a.label: a for a in precision.ARMS}
    return precision.check_arms(run, [by[label] for label in labels], explicit=False, name=NAME)


# ---------------------------------------------------------------------- aggregation and verdicts


def _spread(values: list[float], fmt: str = "+.3f") -> str:
    mean = sum(values) / len(values)
    if len(values) == 1:
        return format(mean, fmt)
    return f"{mean:{fmt}} [{min(values):{fmt}}…{max(values):{fmt}}]"


def _group(row: dict) -> tuple:
    """What a row is compared within: its part, training-set size (b) and precision (c)."""
    return row["part"], row.get("train_size", 0), row.get("precision", "")


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per (part, training-set size or precision, D): the metric over seeds and its paired
    change against λ = 0 of the same seed and group (lower is better for every part's metric)."""
    out = []
    order = {p: i for i, p in enumerate(dict.fromkeys(r.get("precision", "") for r in rows))}  # as they ran
    keys = sorted({(*_group(r), r["decays"]) for r in rows}, key=lambda k: (k[0], k[1], order[k[2]], k[3]))
    for part, size, precision, d in keys:
        mine = [r for r in rows if (*_group(r), r["decays"]) == (part, size, precision, d)]
        base = {r["seed"]: r for r in rows if (*_group(r), r["decays"]) == (part, size, precision, 0.0)}
        point = {"part": part, "point": f"n={size}" if part == "b" else (precision or "bf16") if part == "c" else "LM",
                 "decays": d, "weight_decay": mine[0]["weight_decay"], "relaxation_times": 2 * d,
                 "seeds": [r["seed"] for r in mine]}
        if part == "c":
            point["precision"] = precision
        if part == "b":
            point.update(train_size=size, one_pass=mine[0]["one_pass"], epochs=mine[0]["epochs"])
        metric = "test_error" if part == "b" else "final_loss"
        values = [_outcome(r, metric) for r in mine]
        point.update(metric=metric, values=values, mean=sum(values) / len(values),
                     result=f"{'test err' if part == 'b' else 'loss'} {_spread(values, '.4f')}")
        if part == "c":
            diverged = sum(1 for r in mine if r["diverged_at"])
            spikes = sum(r["spikes"] for r in mine)
            point.update(diverged=diverged, spikes=spikes,
                         result=point["result"] + f", {diverged}/{len(mine)} diverged, {spikes} spikes")
        changes = [_outcome(r, metric) - _outcome(base[r["seed"]], metric) for r in mine if r["seed"] in base]
        point["changes"] = changes
        point["vs_no_decay"] = "—" if d == 0 or not changes else _spread(changes, "+.4f")
        ratios = [r["weight_norm"] / base[r["seed"]]["weight_norm"] for r in mine
                  if r["seed"] in base and base[r["seed"]]["weight_norm"] > 0 and math.isfinite(r["weight_norm"])]
        point["norm_ratio"] = round(sum(ratios) / len(ratios), 3) if ratios else math.nan
        out.append(point)
    return out


def _outcome(row: dict, metric: str) -> float:
    """The row's metric, a diverged run counting as infinitely bad (its loss before diverging is not
    comparable with a finished run's)."""
    return math.inf if row.get("diverged_at") else row[metric]


def _judge(changes: list[float]) -> str:
    """Lower is better: "holds" when decay helped for every seed, "reversed" when it hurt for every
    seed, else "noise"."""
    if changes and all(c < 0 for c in changes):
        return "holds"
    if changes and all(c > 0 for c in changes):
        return "reversed"
    return "noise"


def verdict_sentences(points: list[dict]) -> list[str]:
    """Each claim across the sweep: the D where it holds for every seed, where it is reversed for
    every seed, where seeds disagree; and what the norms say about the effective step."""
    out = []
    a = [p for p in points if p["part"] == "a" and p["decays"] > 0]
    if a:
        out.append(_loss_sentence(a, "a (one-pass LM, float32)"))
        ratios = ", ".join(f"×{p['norm_ratio']:.2f} at D = {p['decays']:g}" for p in a)
        out.append(f"a: matrix norms at the end relative to λ = 0: {ratios}; the per-element effective step "
                   "η/‖w‖ of weights whose scale the loss ignores grows by the inverse ratio")
    b = [p for p in points if p["part"] == "b" and p["decays"] > 0]
    if b:
        pieces = []
        for size in sorted({p["train_size"] for p in b}):
            mine = [p for p in b if p["train_size"] == size]
            tag = "one pass" if mine[0]["one_pass"] else f"{mine[0]['epochs']:.3g} epochs"
            held = [p["decays"] for p in mine if _judge(p["changes"]) == "holds"]
            rev = [p["decays"] for p in mine if _judge(p["changes"]) == "reversed"]
            pieces.append(f"n = {size} ({tag}): lower for every seed {_where(held)}, higher {_where(rev)}")
        out.append("b: test error with weight decay against λ = 0 — " + "; ".join(pieces))
    c = [p for p in points if p["part"] == "c"]
    if c:
        out += _c_sentences(c)
    return out


def _c_sentences(c: list[dict]) -> list[str]:
    """Part c per precision: divergences and spikes with and without decay, what decay did to the
    final loss; then each precision against bf16 rounded to nearest at the same D and seed."""
    out = []
    precisions = list(dict.fromkeys(p.get("precision", "bf16") for p in c))
    by = {name: [p for p in c if p.get("precision", "bf16") == name] for name in precisions}

    def events(mine):
        return "; ".join(f"D = {p['decays']:g}: {p['diverged']}/{len(p['seeds'])} diverged, {p['spikes']} spikes"
                         for p in mine)

    if not any(p["diverged"] or p["spikes"] for p in c):
        out.append("c: no bf16 run spiked or diverged at any D" + (" in any precision" if len(by) > 1 else "")
                   + ", so stability could not be compared ("
                   + " | ".join((f"{name}: " if len(by) > 1 else "") + events(mine) for name, mine in by.items()) + ")")
    for name, mine in by.items():
        tag = f"c, {name}" if len(by) > 1 else "c"
        if any(p["diverged"] or p["spikes"] for p in c):
            base = next((p for p in mine if p["decays"] == 0), None)
            fewer = [p["decays"] for p in mine if base is not None and p["decays"] > 0 and p["diverged"] < base["diverged"]]
            out.append(f"{tag}: {events(mine)}; weight decay reduced divergences {_where(fewer)}")
        decayed = [p for p in mine if p["decays"] > 0 and p["changes"]]  # those with a λ = 0 run to pair with
        if decayed:
            out.append(_loss_sentence(decayed, f"{tag} (bf16 at 30× the lr)"))
    norms = [f"{name} " + ", ".join(f"×{p['norm_ratio']:.2f} at D = {p['decays']:g}" for p in mine
                                    if p["decays"] > 0 and p["changes"])
             for name, mine in by.items() if any(p["decays"] > 0 and p["changes"] for p in mine)]
    if len(by) > 1 and norms:
        out.append("c: matrix norms at the end relative to the same precision's λ = 0: " + "; ".join(norms))
    reference = by.get("bf16-nearest")
    if reference:
        for name, mine in by.items():
            if name == "bf16-nearest":
                continue
            parts = []
            for p in mine:
                ref = next((q for q in reference if q["decays"] == p["decays"]), None)
                if ref is None:
                    continue
                own = dict(zip(p["seeds"], p["values"]))
                changes = [own[s] - v for s, v in zip(ref["seeds"], ref["values"]) if s in own]
                if changes:
                    verdict = _judge(changes)
                    word = {"holds": "lower for every seed", "reversed": "higher for every seed",
                            "noise": "seeds disagree"}[verdict]
                    parts.append(f"{_spread(changes, '+.4f')} at D = {p['decays']:g} ({word})")
            if parts:
                out.append(f"c, {name}: final loss minus bf16-nearest's at the same D and seed: " + "; ".join(parts))
    return out


def _loss_sentence(points: list[dict], label: str) -> str:
    by = {v: [p["decays"] for p in points if _judge(p["changes"]) == v] for v in ("holds", "reversed", "noise")}
    means = ", ".join(f"{p['vs_no_decay'].split(' ')[0]} at D = {p['decays']:g}" for p in points)
    return (f"{label}: weight decay lowered the final training loss for every seed {_where(by['holds'])}, raised it "
            f"for every seed {_where(by['reversed'])}, seeds disagreed {_where(by['noise'])} (mean change vs "
            f"λ = 0: {means})")


def _where(ds) -> str:
    return "at D ∈ {" + ", ".join(f"{d:g}" for d in ds) + "}" if ds else "at no D"


def _plots(out, metrics, rows, points) -> list[str]:
    plt = harness.pyplot()
    written = []
    first_seed = min(r["seed"] for r in rows)
    lm_runs = [r for r in rows if r["part"] in ("a", "c") and r["seed"] == first_seed]
    if lm_runs:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        # a solid; c by precision: nearest dashed, stochastic dotted, compensated dash-dotted; colour by D
        styles = dict(zip(dict.fromkeys(r.get("precision", "bf16") for r in lm_runs if r["part"] == "c"),
                          ("--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)))))
        colours = {d: f"C{i % 10}" for i, d in enumerate(sorted({r["decays"] for r in lm_runs}))}
        for r in lm_runs:
            label = r["run"]
            pts = [(m["step"], m["loss"]) for m in metrics if m["run"] == label and math.isfinite(m["loss"])]
            k = max(1, len(pts) // 100)  # smooth: mean of k consecutive steps
            xs = [pts[j][0] for j in range(k - 1, len(pts), k)]
            ys = [sum(p[1] for p in pts[j - k + 1:j + 1]) / k for j in range(k - 1, len(pts), k)]
            ax.plot(xs, ys, lw=1, color=colours[r["decays"]],
                    ls="-" if r["part"] == "a" else styles[r.get("precision", "bf16")],
                    label=label.removesuffix(f" seed={first_seed}"))
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (smoothed)")
        ax.set_title(f"(a) one-pass LM, float32 (solid); (c) bfloat16 at 30× the lr, by precision (broken "
                     f"lines); colour: D; seed {first_seed}", fontsize=8)
        ax.legend(fontsize=6, ncol=2)
        written.append(harness.savefig(fig, out / "lm_loss.png"))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, part, title in zip(axes, ("a", "b", "c"), ("(a) LM: final loss − λ=0's", "(b) test error − λ=0's",
                                                      "(c) bf16, 30× lr: final loss − λ=0's, per precision")):
        mine = [p for p in points if p["part"] == part]
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("D = Σ η·λ (decay time constants)")
        ax.set_xscale("symlog", linthresh=0.1)
        groups = list(dict.fromkeys(p.get("train_size", p.get("precision", 0)) for p in mine))
        for i, group in enumerate(groups):
            # mean and seed range; a diverged run (an infinite change) is left out of the plot
            pts = [p for p in mine if p.get("train_size", p.get("precision", 0)) == group and p["decays"] > 0
                   and p["changes"] and all(math.isfinite(c) for c in p["changes"])]
            if not pts:
                continue
            xs = [p["decays"] * (1 + 0.04 * i) for p in pts]  # side by side where groups share a D
            means = [sum(p["changes"]) / len(p["changes"]) for p in pts]
            lows = [m - min(p["changes"]) for m, p in zip(means, pts)]
            highs = [max(p["changes"]) - m for m, p in zip(means, pts)]
            ax.errorbar(xs, means, yerr=[lows, highs], fmt="o-", color=f"C{i}", capsize=3,
                        label=f"n={group}" if part == "b" else group if part == "c" else None)
        ax.axhline(0, color="black", lw=0.8)
        if part in ("b", "c") and len(groups) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(harness.savefig(fig, out / "sweep.png"))
    return written
