"""``wdopt why-wd``: why weight decay helps (D'Angelo et al., NeurIPS 2024), in three parts.

(a) One-pass language modelling. A pre-LayerNorm TinyGPT over bytes reads the text corpus (the
    standard library's own sources, or ``--data FILE``) once, in random order of non-overlapping
    windows — every batch is new, so the loss cannot collapse and gradients stay noise-dominated.
    AdamW, β = (0.9, 0.95), linear warm-up over 5% of steps then cosine to 0, λ ∈ {0, 0.1, 0.3}
    on matrices and embeddings (not on biases and LayerNorm gains). Reported: the training loss at
    the end of the schedule (mean over the last 10% of steps). Claim: weight decay gives a lower
    *training* loss at the end of the schedule — an optimisation effect, not regularisation.
(b) Test error against training-set size at a fixed iteration budget. An MLP with LayerNorm
    learns synthetic teacher–student data (``data.teacher_student``, logit noise 0.5, so the Bayes
    error is non-zero and the loss stays away from zero on the test set) for the same number of
    steps and batch size at every training-set size; the largest size is ≥ steps × batch, so that
    run is one pass, the small ones are many passes (epochs reported). SGD with momentum 0.9 and
    L2 λ against λ = 0 (``--optimizer`` picks another base optimizer). Claim: weight decay lowers
    the test error in both regimes.
(c) bfloat16 training. Part (a)'s model with its parameters and optimizer state in bfloat16
    (logits cast to float32 for the loss), one pass at a higher lr (3× part (a)'s), λ = 0 and 0.1.
    Counted: loss spikes (loss > 2× the median of the previous 50 steps) and divergences (a non-
    finite loss; the run stops there). Claim: weight decay prevents loss divergences in bf16.

Options: ``--lr`` and ``--steps`` set part (a)'s lr and steps (part (c): 3× that lr, and
``--steps`` when given); ``--weight-decay`` sets the non-zero λ of parts (b) and (c) (defaults: (b)
SGD lr 0.1, λ 5e-3; (c) λ 0.1); part (b) keeps its own step budget so that its largest set stays
one pass.

Every part reports what it measures; nothing is tuned towards the claim. The model sizes are
small-CPU sizes, far from the paper's, and the runs are short: ηλ summed over a run (the number of
"decay time constants" it spans) is printed next to each result, because the effect of weight
decay can only show when that is not small.
"""

from __future__ import annotations

import math

import torch

from . import data, harness
from .models import MLP, TinyGPT

NAME = "why-wd"
HELP = "why weight decay: one-pass LM training loss, test error vs data size, bf16 stability"

PRESETS = {
    "default": {"steps": 2000, "lr": 3e-3, "weight_decay": 0.1,
                "lm": {"context": 64, "d": 64, "layers": 2, "heads": 4, "batch": 16},
                "lm_wds": (0.0, 0.1, 0.3), "bf16_steps": 1000, "bf16_lr_factor": 3.0,
                "b": {"steps": 1500, "batch": 64, "dim": 32, "hidden": 128, "classes": 10, "lr": 0.1,
                      "weight_decay": 5e-3, "sizes": (250, 1000, 4000, 16000, 96000), "test": 8191}},
    "quick": {"steps": 60, "lr": 3e-3, "weight_decay": 0.1,
              "lm": {"context": 32, "d": 32, "layers": 1, "heads": 2, "batch": 8},
              "lm_wds": (0.0, 0.1, 0.3), "bf16_steps": 60, "bf16_lr_factor": 3.0,
              "b": {"steps": 150, "batch": 32, "dim": 16, "hidden": 32, "classes": 5, "lr": 0.1,
                    "weight_decay": 5e-3, "sizes": (100, 1000, 4800), "test": 2047}},
    "gpu": {"steps": 4000, "lr": 1e-3, "weight_decay": 0.1,
            "lm": {"context": 256, "d": 384, "layers": 6, "heads": 6, "batch": 32},
            "lm_wds": (0.0, 0.1, 0.3), "bf16_steps": 4000, "bf16_lr_factor": 3.0,
            "b": {"steps": 5000, "batch": 256, "dim": 64, "hidden": 512, "classes": 10, "lr": 0.1,
                  "weight_decay": 5e-3, "sizes": (500, 2000, 8000, 32000, 1280000), "test": 16383}},
}
BETAS = (0.9, 0.95)
WARMUP = 0.05
SPIKE_FACTOR, SPIKE_WINDOW = 2.0, 50


def add_arguments(parser) -> None:
    harness.add_common_arguments(parser, optimizers=("adamw", "sgd", "lion"), text_data=True)
    parser.add_argument("--part", choices=("a", "b", "c", "all"), default="all")


# ---------------------------------------------------------------------- language model (a, c)


def _corpus(run: harness.Run, steps: int) -> torch.Tensor:
    lm = run["lm"]
    need = (steps * lm["batch"] + 1) * lm["context"] + 1
    corpus = data.stdlib_corpus(need, run.args.data)
    if corpus.shape[0] < need:
        raise ValueError(f"the corpus has {corpus.shape[0]} bytes; {steps} one-pass steps need {need}")
    return corpus


def train_lm(run: harness.Run, wd: float, lr: float, steps: int, dtype, label: str, bar):
    lm = run["lm"]
    corpus = _corpus(run, steps)
    torch.manual_seed(run.args.seed)
    model = TinyGPT(lm["context"], lm["d"], lm["layers"], lm["heads"]).to(device=run.device, dtype=dtype)
    name = run.args.optimizer or "adamw"  # "sgd" is refused for parts a and c in run()
    extra = {"betas": BETAS} if name == "adamw" else {}
    opt = harness.make_optimizer(name, harness.param_groups(model, wd), lr, wd, run.args.backend, **extra)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, harness.warmup_schedule(steps, int(WARMUP * steps), "cosine"))
    batches = data.text_batches(corpus, lm["context"], lm["batch"], seed=run.args.seed + 1)
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
    norm = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in model.parameters() if p.dim() >= 2))
    return model, {"final_loss": harness.tail_mean(losses, 0.1) if losses else math.nan, "spikes": spikes,
                   "diverged_at": diverged_at, "decay_sum": decay_sum, "weight_norm": norm,
                   "steps_done": len(losses)}


# ---------------------------------------------------------------------- data-size sweep (b)


def train_sizes(run: harness.Run, n: int, wd: float, label: str, bar):
    cfg = run["b"]
    x, y = data.teacher_student(n, cfg["dim"], cfg["classes"], run.args.seed)
    x_test, y_test = data.teacher_student(cfg["test"], cfg["dim"], cfg["classes"], run.args.seed)
    x, y, x_test, y_test = (t.to(run.device) for t in (x, y, x_test, y_test))
    torch.manual_seed(run.args.seed)
    model = MLP(cfg["dim"], cfg["hidden"], cfg["classes"]).to(run.device)
    name = run.args.optimizer or "sgd"
    lr = cfg["lr"] if name == "sgd" else {"adamw": 1e-3, "lion": 1e-4}[name]
    opt = harness.make_optimizer(name, harness.param_groups(model, wd), lr, wd, run.args.backend)
    batches = data.Batches(x, y, cfg["batch"], seed=run.args.seed + 1)
    losses = []
    for step in range(1, cfg["steps"] + 1):
        xb, yb = batches.next()
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            run.log(run=label, step=step, loss=losses[-1])
        bar.update()
    train_loss, train_acc = harness.accuracy(model, x, y)
    test_loss, test_acc = harness.accuracy(model, x_test, y_test)
    epochs = cfg["steps"] * min(cfg["batch"], n) / n
    return model, {"train_size": n, "epochs": epochs, "one_pass": epochs <= 1.0, "optimizer": name, "lr": lr,
                   "train_error": 1 - train_acc, "test_error": 1 - test_acc, "test_loss": test_loss,
                   "final_loss": harness.tail_mean(losses, 0.1)}


# ---------------------------------------------------------------------- driver


def run(args) -> dict:
    parts = ("a", "b", "c") if args.part == "all" else (args.part,)
    if args.optimizer == "sgd" and ("a" in parts or "c" in parts):
        harness.fail(NAME, "parts a and c train the language model with AdamW (or --optimizer lion); "
                     "--optimizer sgd applies to part b only (--part b)")
    run = harness.Run(NAME, args, PRESETS)
    steps, lr = run["steps"], run["lr"]
    wd_on = run["weight_decay"]
    cfg_b = run["b"]
    sizes = list(cfg_b["sizes"])
    total = (steps * len(run["lm_wds"]) if "a" in parts else 0) \
        + (cfg_b["steps"] * len(sizes) * 2 if "b" in parts else 0) + ((args.steps or run["bf16_steps"]) * 2 if "c" in parts else 0)
    bar = run.progress(total, NAME)
    rows, weights = [], {}
    if "a" in parts:
        for wd in run["lm_wds"]:
            label = f"a λ={wd:g}"
            bar.set_postfix_str(label)
            model, result = train_lm(run, wd, lr, steps, torch.float32, label, bar)
            weights[label] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            rows.append({"part": "a", "run": label, "weight_decay": wd, "lr": lr, "steps": steps, "dtype": "float32",
                         **result})
    if "b" in parts:
        if sizes[-1] < cfg_b["steps"] * cfg_b["batch"]:
            raise ValueError("the largest training set must be one pass (≥ steps × batch)")
        for wd in (0.0, cfg_b["weight_decay"] if args.weight_decay is None else args.weight_decay):
            for n in sizes:
                label = f"b n={n} λ={wd:g}"
                bar.set_postfix_str(label)
                model, result = train_sizes(run, n, wd, label, bar)
                weights[label] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
                rows.append({"part": "b", "run": label, "weight_decay": wd, "steps": cfg_b["steps"], **result})
    if "c" in parts:
        lr_c = lr * run["bf16_lr_factor"]
        steps_c = args.steps if args.steps is not None else run["bf16_steps"]
        for wd in (0.0, wd_on):
            label = f"c bf16 λ={wd:g}"
            bar.set_postfix_str(label)
            model, result = train_lm(run, wd, lr_c, steps_c, torch.bfloat16, label, bar)
            weights[label] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            rows.append({"part": "c", "run": label, "weight_decay": wd, "lr": lr_c, "steps": steps_c,
                         "dtype": "bfloat16", **result})
    bar.close()
    table = []
    for r in rows:
        t = dict(r)
        if r["part"] == "b":
            t["result"] = f"test err {r['test_error']:.4f} (train err {r['train_error']:.4f})"
            t["detail"] = f"n={r['train_size']}, {r['epochs']:.3g} epochs{' (one pass)' if r['one_pass'] else ''}"
        else:
            t["result"] = f"loss {harness.fmt(r['final_loss'])}"
            t["detail"] = (f"spikes {r['spikes']}, diverged at {r['diverged_at'] or '—'}, Σηλ {r['decay_sum']:.3g}, "
                           f"‖W‖ {r['weight_norm']:.4g}")
        table.append(t)
    columns = ["part", "run", "weight_decay", "result", "detail"]
    lm_optimizer = "Lion" if args.optimizer == "lion" else "AdamW β=(0.9, 0.95)"
    notes = ["", f"a: one-pass LM, {lm_optimizer}, cosine; loss = mean training loss over the last 10% of steps. "
             "b: test error at a fixed budget of steps × batch samples. c: bf16 parameters and state; spike = loss > "
             f"{SPIKE_FACTOR:g}× the median of the previous {SPIKE_WINDOW} steps. Σηλ: total decay over the run; "
             "‖W‖: Frobenius norm of all matrices at the end."]
    summary = {"rows": rows, "parts": list(parts), "betas": BETAS, "spike_factor": SPIKE_FACTOR,
               "spike_window": SPIKE_WINDOW}
    return run.finish(summary, table, columns, weights=weights, notes=notes, verdict=verdict_sentences(rows),
                      plots=lambda out: _plots(out, run.metrics, rows))


def verdict_sentences(rows: list[dict]) -> list[str]:
    """Each part's claim against what its rows show (differences, not significance: one seed)."""
    out = []
    a = [r for r in rows if r["part"] == "a"]
    a0 = next((r for r in a if r["weight_decay"] == 0), None)
    if a0 is not None and len(a) > 1:
        diffs = [(r["weight_decay"], r["final_loss"] - a0["final_loss"]) for r in a if r["weight_decay"] > 0]
        lower = [wd for wd, d in diffs if d < 0]
        result = ("weight decay lowered the final training loss" if len(lower) == len(diffs) else
                  "weight decay did not lower the final training loss" if not lower else
                  "weight decay lowered the final training loss only at λ = " + ", ".join(f"{wd:g}" for wd in lower))
        out.append(f"a: {result} (vs λ = 0: " + ", ".join(f"λ = {wd:g} {d:+.3f}" for wd, d in diffs)
                   + f"; Σηλ up to {max(r['decay_sum'] for r in a):.2g})")
    b = [r for r in rows if r["part"] == "b"]
    if b:
        pairs = []
        for n in sorted({r["train_size"] for r in b}):
            off = next((r for r in b if r["train_size"] == n and r["weight_decay"] == 0), None)
            on = next((r for r in b if r["train_size"] == n and r["weight_decay"] > 0), None)
            if off is not None and on is not None:
                pairs.append((n, on["one_pass"], on["test_error"] - off["test_error"]))
        if pairs:
            lower = [n for n, _, d in pairs if d < 0]
            one_pass = [d for _, p, d in pairs if p]
            out.append(f"b: weight decay lowered the test error at {len(lower)} of {len(pairs)} training-set sizes "
                       f"(test-error change {min(d for *_, d in pairs):+.3f}…{max(d for *_, d in pairs):+.3f}"
                       + (f"; one pass {one_pass[0]:+.3f}" if one_pass else "") + ")")
    c = [r for r in rows if r["part"] == "c"]
    if c:
        events = "; ".join(f"λ = {r['weight_decay']:g}: {r['spikes']} spikes, "
                           + (f"diverged at step {r['diverged_at']}" if r["diverged_at"] else "no divergence")
                           for r in c)
        if not any(r["spikes"] or r["diverged_at"] for r in c):
            out.append(f"c: neither bf16 run spiked or diverged, so stability could not be compared ({events})")
        else:
            out.append(f"c: {events}")
    return out


def _plots(out, metrics, rows) -> list[str]:
    plt = harness.pyplot()
    written = []
    lm_runs = [r["run"] for r in rows if r["part"] in ("a", "c")]
    if lm_runs:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for i, label in enumerate(lm_runs):
            pts = [(m["step"], m["loss"]) for m in metrics if m["run"] == label and math.isfinite(m["loss"])]
            k = max(1, len(pts) // 100)  # smooth: mean of k consecutive steps
            xs = [pts[j][0] for j in range(k - 1, len(pts), k)]
            ys = [sum(p[1] for p in pts[j - k + 1:j + 1]) / k for j in range(k - 1, len(pts), k)]
            ax.plot(xs, ys, lw=1, color=f"C{i}", ls="-" if label.startswith("a") else "--", label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (smoothed)")
        ax.set_title("(a) one-pass LM, float32 (solid); (c) bfloat16 (dashed)", fontsize=9)
        ax.legend(fontsize=7)
        written.append(harness.savefig(fig, out / "lm_loss.png"))
    b = [r for r in rows if r["part"] == "b"]
    if b:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for i, wd in enumerate(sorted({r["weight_decay"] for r in b})):
            mine = [r for r in b if r["weight_decay"] == wd]
            ax.plot([r["train_size"] for r in mine], [r["test_error"] for r in mine], "o-", color=f"C{i}",
                    label=f"λ={wd:g}")
        ax.set_xscale("log")
        ax.set_xlabel("training-set size (fixed number of steps)")
        ax.set_ylabel("test error")
        ax.set_title("(b) test error vs data size", fontsize=9)
        ax.legend(fontsize=7)
        written.append(harness.savefig(fig, out / "data_size.png"))
    return written
