"""Results: one row per (shape set, competitor), ratios, and the table, CSV, JSON and plot."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .shapes import bytes_per_param

# ----------------------------------------------------------------------------- one shape set

@dataclass
class Row:
    optimizer: str
    dtype: str
    shape_set: str
    n_tensors: int
    n_params: int
    competitor: str
    warmup: int
    iters: int
    first_step_ms: float
    median_ms: float
    p10_ms: float
    p90_ms: float
    bytes_per_param: int
    gbps: float
    ceiling_gbps: float = float("nan")  # filled in at the end of the run: see run_ceiling()
    frac_ceiling: float = float("nan")
    baseline: str = ""
    ratio: float = float("nan")


CSV_FIELDS = [f for f in Row.__dataclass_fields__]


@dataclass
class Skip:
    optimizer: str
    dtype: str
    shape_set: str
    competitor: str
    reason: str


@dataclass
class ShapeSetResult:
    rows: list[Row] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)



def _add_ratios(rows: list[Row]) -> None:
    """Each row's median over the baseline's, the baseline being torch fused where it ran, else torch foreach."""
    by_name = {r.competitor: r for r in rows}
    base = by_name.get("torch fused") or by_name.get("torch foreach")
    for r in rows:
        if base is not None:
            r.baseline, r.ratio = base.competitor, r.median_ms / base.median_ms



def format_table(rows: list[Row], skipped: list[Skip], env: dict) -> str:
    samples = ", ".join(f"{c:.1f}" for c in env["axpy_ceiling_samples_gbps"])
    lines, key = [f"axpy ceiling {env['axpy_ceiling_gbps']:.1f} GB/s (best of {samples}); "
                  f"'ceiling' = GB/s as a fraction of it; '~' marks p90 > 1.5 × p10 (noisy)"], None
    for r in rows:
        if (r.optimizer, r.dtype, r.shape_set) != key:
            key = (r.optimizer, r.dtype, r.shape_set)
            lines += ["", f"{r.optimizer} {r.dtype} | {r.shape_set}: {r.n_tensors} tensors, "
                          f"{r.n_params / 1e6:.2f}M params, {r.bytes_per_param} B/param",
                      f"  {'competitor':<24}{'iters':>6}{'median ms':>12}{'p10–p90 ms':>22}"
                      f"{'GB/s':>9}{'ceiling':>9}{'× ' + (r.baseline or 'none'):>17}"]
        spread = f"{r.p10_ms:.2f}–{r.p90_ms:.2f}" + ("~" if r.p90_ms > 1.5 * r.p10_ms else " ")
        lines.append(f"  {r.competitor:<24}{r.iters:>6}{r.median_ms:>12.2f}{spread:>22}"
                     f"{r.gbps:>9.2f}{r.frac_ceiling:>9.1%}{r.ratio:>17.3g}")
    if skipped:
        lines += ["", "not timed:"] + [f"  {s.optimizer} {s.shape_set} {s.competitor}: {s.reason}" for s in skipped]
    return "\n".join(lines)


def write_csv(rows: list[Row], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))


def write_json(rows: list[Row], skipped: list[Skip], env: dict, path: Path) -> None:
    doc = {"environment": env, "bytes_model": bytes_per_param.__doc__.strip(),
           "rows": [asdict(r) for r in rows], "skipped": [asdict(s) for s in skipped]}
    path.write_text(json.dumps(doc, indent=2) + "\n")


def plot_ratios(rows: list[Row], path: Path) -> str:
    """Grouped bars of each competitor's time over torch fused, per shape set (one panel per
    optimizer and dtype). Returns a note on what was written; matplotlib is optional."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no results.png (pip install matplotlib)"
    panels = sorted({(r.optimizer, r.dtype) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (opt, dtype) in zip(axes[0], panels):
        sub = [r for r in rows if (r.optimizer, r.dtype) == (opt, dtype)]
        sets = list(dict.fromkeys(r.shape_set for r in sub))
        names = list(dict.fromkeys(r.competitor for r in sub))
        width = 0.8 / len(names)
        # A ratio is noisy when its own timing or its baseline's is (p90 > 1.5 × p10, the text
        # table's '~'): hatched and marked '~', so that a loaded machine's outlier (e.g. 0.019×)
        # does not read as a measurement.
        noisy_row = {(r.shape_set, r.competitor): r.p90_ms > 1.5 * r.p10_ms for r in sub}
        any_noisy = False
        for i, name in enumerate(names):
            ratio = {r.shape_set: r.ratio for r in sub if r.competitor == name}
            baseline = {r.shape_set: r.baseline for r in sub if r.competitor == name}
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(sets))]
            heights = [ratio.get(s, float("nan")) for s in sets]
            bars = ax.bar(xs, heights, width, label=name)
            for bar, s, h in zip(bars, sets, heights):
                if noisy_row.get((s, name)) or noisy_row.get((s, baseline.get(s))):
                    any_noisy = True
                    bar.set_hatch("///")
                    bar.set_alpha(0.5)
                    ax.annotate("~", (bar.get_x() + bar.get_width() / 2, h), ha="center", va="bottom", fontsize=12)
        if any_noisy:
            ax.bar([0], [float("nan")], color="white", edgecolor="gray", hatch="///",
                   label="~ hatched: noisy (p90 > 1.5 × p10)")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(sets)), sets)
        ax.set_yscale("log")
        ax.set_ylabel(f"step time / {sub[0].baseline} (lower is better)")
        ax.set_title(f"{opt} {dtype}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"
