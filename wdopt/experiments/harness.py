"""What every experiment shares: options and presets, the output folder (summary.json,
metrics.csv, weights, plots), determinism, the progress bar, optimizers by name, a training loop
that records rotation telemetry, and the result table."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

OPTIMIZERS = ("adamw", "sgd", "lion", "rotational-adamw", "rotational-sgd", "rotational-lion")


def add_common_arguments(parser: argparse.ArgumentParser, optimizers=OPTIMIZERS, text_data: bool = False) -> None:
    """Options every experiment takes. Unset options come from the preset (default, --quick, gpu)."""
    parser.add_argument("--optimizer", choices=optimizers, default=None,
                        help="run only this optimizer (default: the experiment's set)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the preset's)")
    parser.add_argument("--weight-decay", type=float, default=None, help="weight decay λ (default: the preset's)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--backend", default="auto", help="wdopt backend (default: auto)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: runs/<experiment>-<UTC time>/)")
    parser.add_argument("--quick", action="store_true", help="a small run (under a minute on 2 CPU cores; for tests)")
    parser.add_argument("--preset", choices=("default", "gpu"), default="default",
                        help="'gpu': sized for one H100-class GPU")
    if text_data:
        parser.add_argument("--data", default=None, help="a text file for the language-model runs (default: "
                            "the standard library's sources)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: the models are tiny, more threads only contend, "
                        "and a fixed count keeps CPU results bitwise equal across machines)")


class Run:
    """One experiment invocation: resolved options, the output folder and its writers."""

    def __init__(self, name: str, args: argparse.Namespace, presets: dict[str, dict]):
        self.name, self.args = name, args
        preset = "quick" if args.quick else args.preset
        self.preset = preset
        self.config = dict(presets[preset])
        for key in ("lr", "weight_decay", "steps"):
            if getattr(args, key, None) is not None:
                self.config[key] = getattr(args, key)
        every = self.config.get("every")
        if every and self.config.get("steps", every * 5) < every * 5:
            # Results average the last 20% of steps: it must hold a telemetry record.
            fail(name, f"--steps must be at least {every * 5} (5 × the telemetry interval {every})")
        # Everything that can make the run fail at its end is checked here, before any training:
        # a run of minutes that dies writing its results (or on its first CUDA call) wastes them.
        self.device = check_device(name, args.device)
        check_backend(name, args.backend, self.device)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        self.out = Path(args.out) if args.out is not None else Path("runs") / f"{name}-{stamp}"
        check_writable(name, self.out)
        self.metrics: list[dict[str, Any]] = []
        self.started = time.time()
        self._bar = None
        threads = getattr(args, "threads", None)
        if threads:
            torch.set_num_threads(threads)
        seed_everything(args.seed)

    # ------------------------------------------------------------------ options

    def __getitem__(self, key: str):
        return self.config[key]

    def optimizers(self, default: tuple[str, ...]) -> tuple[str, ...]:
        return (self.args.optimizer,) if self.args.optimizer else default

    # ------------------------------------------------------------------ progress

    def progress(self, total: int, description: str):
        """A progress bar over ``total`` steps (tqdm when installed and wanted), else nothing."""
        if self.args.no_progress:
            return _NoBar()
        try:
            from tqdm import tqdm
        except ImportError:
            return _NoBar()
        return tqdm(total=total, desc=description, leave=False, file=sys.stderr, dynamic_ncols=True)

    # ------------------------------------------------------------------ outputs

    def log(self, **row) -> None:
        """One row of metrics.csv (long format: run, step, and whatever the experiment records)."""
        self.metrics.append(row)

    def finish(self, summary: dict, table: list[dict], columns: list[str], weights: dict | None = None,
               plots: Callable[[Path], list[str]] | None = None, notes: list[str] = (),
               verdict: list[str] = ()) -> dict:
        """Write summary.json, metrics.csv, weights.pt and the plots; print the table, the notes
        and the verdict (sentences in words, derived from the table's own numbers; also stored
        in summary.json as "verdict")."""
        summary = {"experiment": self.name, **summary, "verdict": list(verdict)}
        summary.setdefault("config", {**self.config, "seed": self.args.seed, "device": str(self.device),
                                      "preset": self.preset, "backend": self.args.backend})
        summary["seconds"] = round(time.time() - self.started, 1)
        summary["environment"] = environment()
        write_csv(self.metrics, self.out / "metrics.csv")
        if weights is not None:
            torch.save(weights, self.out / "weights.pt")
        written = []
        if plots is not None:
            written = plots(self.out)
        summary["plots"] = written
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
        print()
        print(format_table(table, columns))
        for note in notes:
            print(note)
        if verdict:
            print("\nverdict:")
            for sentence in verdict:
                print(f"  - {sentence}")
        print(f"\nwrote {self.out}/: summary.json, metrics.csv" + (", weights.pt" if weights is not None else "")
              + "".join(f", {p}" for p in written) + f"  ({summary['seconds']} s)")
        return summary


def fail(name: str, message: str) -> None:
    """Stop before training with one line on stderr and exit status 2 (argparse's status for bad
    options): a user error is not a crash, so no traceback."""
    print(f"wdopt {name}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_device(name: str, device: str) -> torch.device:
    """The run's device, or fail: torch raises "Found no NVIDIA driver" only on the first CUDA
    call, inside training."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        fail(name, f"--device {device}: torch {torch.__version__} sees no CUDA device here; use --device cpu")
    return torch.device(device)


def check_backend(name: str, backend: str, device: torch.device) -> None:
    """Fail on a backend that is unknown or cannot run on ``device`` (the optimizer would raise
    at construction, after the data is loaded, or at the first step)."""
    from .. import backends

    if backend not in backends.BACKEND_CHOICES:
        fail(name, f"--backend {backend!r} is unknown; choose one of {', '.join(backends.BACKEND_CHOICES)}")
    if backend != "auto":
        reason = backends.unavailable_reason(backend, device)
        if reason is not None:
            fail(name, f"--backend {backend} cannot run on {device.type}: {reason}")


def check_writable(name: str, out: Path) -> None:
    """Create ``out`` and write a probe file in it, or fail: the results are written only at the
    end of the run."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".wdopt-write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        fail(name, f"--out {out}: cannot write there ({error.strerror or error})")


def steps_in_relaxation_times(steps: int, time_constant: float) -> float:
    """How many relaxation times (wdopt.theory's time_constant) a run of ``steps`` spans."""
    return steps / time_constant if time_constant > 0 else math.inf


#: A run spanning fewer relaxation times than this is reported as "not at equilibrium yet":
#: its initial offset from equilibrium has decayed only to e^-span of itself (< 1% at 5).
MIN_RELAXATION_TIMES = 5.0
#: ... and so is a layer whose norm still moves by more than this between the first and the
#: second half of the averaging window (the theory's relaxation time is a first-order estimate;
#: where its assumptions are strained the measured relaxation is slower).
MAX_WINDOW_DRIFT = 0.03


def window_drift(series: list[dict], steps: int, key: str, fraction: float = 0.2) -> float:
    """Relative change of ``key``'s mean from the first to the second half of the window (the
    last ``fraction`` of steps): near 0 at equilibrium, the trend where the norm still moves."""
    values = [r[key] for r in series if r["step"] > steps * (1 - fraction)]
    half = len(values) // 2
    if half == 0:
        return 0.0
    first, second = sum(values[:half]) / half, sum(values[half:]) / (len(values) - half)
    return second / first - 1 if first else math.nan


def percent_range(values, signed: bool = True) -> str:
    """"−5…+8%" (signed) or "within 8%" style text for a list of relative errors."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "—"
    lo, hi = min(values), max(values)
    if not signed:
        return f"{100 * max(abs(lo), abs(hi)):.0f}%"
    if f"{100 * lo:+.0f}" == f"{100 * hi:+.0f}":
        return f"{100 * lo:+.0f}%"
    return f"{100 * lo:+.0f}…{100 * hi:+.0f}%"


def within(values) -> str:
    """"within 9%" for relative errors: the largest magnitude, rounded up to a whole percent."""
    values = [abs(v) for v in values if v is not None and math.isfinite(v)]
    return f"within {math.ceil(100 * max(values) - 1e-9):.0f}%" if values else "—"


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


def seed_everything(seed: int) -> None:
    """Bitwise-reproducible CPU runs for a seed: seeded generators and deterministic kernels."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def environment() -> dict:
    import platform

    import wdopt
    from wdopt.env import cpu_model

    return {"python": platform.python_version(), "torch": torch.__version__, "wdopt": wdopt.__version__,
            "machine": platform.machine(), "cpu": cpu_model(), "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _json_default(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def write_csv(rows: list[dict], path: Path) -> None:
    """Rows with the union of their keys as columns (first-seen order); floats written with repr,
    so two bitwise-equal runs give byte-equal files."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else repr(row[c]) if isinstance(row[c], float) else row[c]
                             for c in columns])


def fmt(x) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if x == 0 or 1e-3 <= abs(x) < 1e5:
            return f"{x:.4g}"
        return f"{x:.3e}"
    return str(x)


def format_table(rows: list[dict], columns: list[str]) -> str:
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))) for row in cells]
    return "\n".join(out)


def relative_error(measured, predicted):
    if measured is None or predicted is None or predicted == 0:
        return None
    return (measured - predicted) / predicted


def warmup_schedule(steps: int, warmup: int = 0, decay: str = "constant") -> Callable[[int], float]:
    """The lr factor for torch.optim.lr_scheduler.LambdaLR: linear warm-up over ``warmup`` steps
    (from 1/warmup, so no step has lr 0), then constant or cosine to 0 at ``steps``."""
    def factor(i: int) -> float:  # i = optimizer steps taken so far
        if i < warmup:
            return (i + 1) / warmup
        if decay == "cosine":
            progress = (i - warmup) / max(1, steps - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return factor


def tail_mean(values: list[float], fraction: float = 0.1) -> float:
    """Mean of the last ``fraction`` of ``values`` (at least one)."""
    n = max(1, int(round(len(values) * fraction)))
    tail = values[-n:]
    return sum(tail) / len(tail)


def coefficient_of_variation(values) -> float:
    """std/mean (population std) of a sequence or tensor."""
    t = torch.as_tensor(values, dtype=torch.float64).flatten()
    mean = t.mean()
    return float(t.std(unbiased=False) / mean) if mean != 0 else math.nan


# ---------------------------------------------------------------------- optimizers


def make_optimizer(name: str, params, lr: float, weight_decay: float, backend: str = "auto", **extra):
    """A wdopt optimizer by name: "adamw", "sgd" (momentum 0.9 unless given), "lion", and their
    "rotational-" variants."""
    import wdopt

    base = name.removeprefix("rotational-")
    rotational = name.startswith("rotational-")
    classes = {"adamw": (wdopt.FusedAdamW, wdopt.RotationalAdamW), "sgd": (wdopt.FusedSGD, wdopt.RotationalSGD),
               "lion": (wdopt.FusedLion, wdopt.RotationalLion)}
    if base not in classes:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
    cls = classes[base][rotational]
    if base == "sgd":
        extra.setdefault("momentum", 0.9)
    return cls(params, lr=lr, weight_decay=weight_decay, backend=backend, **extra)


def param_groups(model: torch.nn.Module, weight_decay: float, rotate_only: tuple[str, ...] | None = None) -> list[dict]:
    """Weight decay on matrices and filters (dim ≥ 2), none on biases and norm gains.

    ``rotate_only`` (for a rotational optimizer): the names of the parameters it may put on a
    sphere — the scale-invariant ones; the other matrices (a classifier) keep their weight decay
    and take the base optimizer's step (``rotational=False``), so that base and rotational runs
    differ only where the theory applies."""
    named = list(model.named_parameters())
    others = [p for _, p in named if p.dim() < 2]
    if rotate_only is None:
        matrices = [p for _, p in named if p.dim() >= 2]
        return [{"params": matrices, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}]
    rotated = [p for n, p in named if p.dim() >= 2 and n in rotate_only]
    plain = [p for n, p in named if p.dim() >= 2 and n not in rotate_only]
    groups = [{"params": rotated, "weight_decay": weight_decay},
              {"params": others, "weight_decay": 0.0}]
    if plain:
        groups.append({"params": plain, "weight_decay": weight_decay, "rotational": False})
    return groups


def digits(run: "Run", label_noise: float, seed: int | None = None):
    """The digits split of ``seed`` (default ``run``'s; ``data.digits``), on its device."""
    from . import data

    seed = run.args.seed if seed is None else seed
    return tuple(t.to(run.device) for t in data.digits(seed, label_noise=label_noise))


def train_classifier(run: "Run", model, opt, monitor, batches, label: str, bar, measure: Callable[[Any], dict],
                     scheduler=None, before_step: Callable[[int], None] | None = None) -> tuple[list, list]:
    """The loop the digits experiments share: ``run["steps"]`` cross-entropy steps on ``batches``.
    On every step ``monitor`` records, a metrics row {"run", "step", "lr", "loss"} plus
    ``measure(record)`` is logged to metrics.csv and kept. Returns (losses per step, rows)."""
    losses, series = [], []
    for step in range(1, run["steps"] + 1):
        xb, yb = batches.next()
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if before_step is not None:
            before_step(step)
        lr = float(opt.param_groups[0]["lr"])  # the lr this step uses
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
        record = monitor.last
        if record is not None and record.step == step:
            row = {"run": label, "step": step, "lr": lr, "loss": losses[-1], **measure(record)}
            run.log(**row)
            series.append(row)
        bar.update()
    return losses, series


def window_mean(series: list[dict], steps: int, key: str, fraction: float = 0.2, square: bool = False) -> float:
    """Mean of ``key`` (of its square with ``square``) over the rows of the last ``fraction`` of the steps."""
    values = [r[key] ** 2 if square else r[key] for r in series if r["step"] > steps * (1 - fraction)]
    return sum(values) / len(values)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` in eval mode."""
    was_training = model.training
    model.eval()
    losses, correct = 0.0, 0
    for i in range(0, x.shape[0], batch):
        out = model(x[i:i + batch])
        losses += torch.nn.functional.cross_entropy(out, y[i:i + batch], reduction="sum").item()
        correct += (out.argmax(1) == y[i:i + batch]).sum().item()
    model.train(was_training)
    return losses / x.shape[0], correct / x.shape[0]


def savefig(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
