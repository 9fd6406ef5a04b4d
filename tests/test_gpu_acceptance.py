"""benchmarks/gpu_acceptance.py is run once per lent GPU, where a crash costs minutes of a
15-minute lease: its logic runs here first (--smoke: CPU backends, tiny sizes), and its
comparisons must be able to fail."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import wdopt

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_acceptance.py"


@pytest.fixture(scope="module")
def acceptance():
    spec = importlib.util.spec_from_file_location("gpu_acceptance", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_passes_and_writes_every_check(acceptance, tmp_path):
    out = tmp_path / "acceptance.json"
    assert acceptance.main([str(out), "--smoke"]) == 0
    summary = json.loads(out.read_text())
    assert set(summary["checks"]) == {name for name, _ in acceptance.CHECKS}
    assert all(c["ok"] for c in summary["checks"].values()), summary


def test_comparisons_catch_one_ulp_and_nan(acceptance):
    a = torch.tensor([1.0, 2.0, float("nan")], dtype=torch.bfloat16)
    b = a.clone()
    acceptance._close("same", a, b, exact=True)
    b[1] = 2.0 + 2.0**-6  # one bf16 ulp above 2 (8 significand bits)
    assert b[1] != a[1]
    with pytest.raises(acceptance.Failed):
        acceptance._close("ulp", a, b, exact=True)
    with pytest.raises(acceptance.Failed):
        acceptance._close("nan", torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 1.0]), exact=True)


def test_backend_comparison_fails_on_different_results(acceptance):
    calls = []

    def make():  # the second trajectory gets other gradients: its parameters must differ
        calls.append(1)
        gen = torch.Generator().manual_seed(len(calls))
        params = [torch.nn.Parameter(torch.randn(9, generator=gen))]
        params[0].data.copy_(torch.ones(9))
        return params, [[torch.randn(9, generator=gen)]]

    with pytest.raises(acceptance.Failed):
        acceptance._compare_backends(wdopt.FusedSGD, dict(momentum=0.9), make, ["reference"])
