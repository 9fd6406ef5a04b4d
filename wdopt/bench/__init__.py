"""Kernel benchmark: one optimizer step of wdopt's backends against torch.optim, on model-sized tensor lists.

    python -m wdopt.bench                                  # AdamW, every shape set, fp32, fastest device
    python -m wdopt.bench --optimizer all --shapes many-small
    python -m wdopt.bench --device cuda --dtype bfloat16 --compile

An optimizer step is memory-bound, so each result is reported three ways (docs/performance.md):
the step time (median, p10, p90), the effective bandwidth from an explicit bytes-per-parameter model,
and that bandwidth as a fraction of a ceiling measured in the same run on the same device (a large
in-place axpy). Every competitor is also divided by torch's fused step measured in the same run,
since ratios survive a noisy machine better than absolute times. See benchmarks/README.md.

Fairness rules: every competitor starts from the same parameter values and the same gradients
(set once, before timing), with fresh optimizer state; memory is freed between shape sets.
"""

from .competitors import TorchOpsLion, competitors
from .machine import environment
from .report import Row, Skip, format_table, plot_ratios, write_csv, write_json
from .run import bench_shape_set, main, parse_args
from .shapes import (
    DTYPES, HYPER, OPTIMIZERS, PUBLIC_SHAPE_SETS, SHAPE_SETS, bytes_per_param, make_tensors, numel,
)
from .timing import axpy_ceiling_gbps, time_steps

__all__ = [
    "DTYPES", "HYPER", "OPTIMIZERS", "PUBLIC_SHAPE_SETS", "SHAPE_SETS", "Row", "Skip", "TorchOpsLion",
    "axpy_ceiling_gbps", "bench_shape_set", "bytes_per_param", "competitors", "environment", "format_table",
    "main", "make_tensors", "numel", "parse_args", "plot_ratios", "time_steps", "write_csv", "write_json",
]
