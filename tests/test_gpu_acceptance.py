"""benchmarks/gpu_acceptance.py is run once per lent GPU, where a crash costs minutes of a
15-minute lease: its logic runs here first (--smoke: CPU backends, tiny sizes), and its
comparisons must be able to fail."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

import wdopt

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    """A script of benchmarks/ imported as a module."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def acceptance():
    return _script("gpu_acceptance")


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


@pytest.fixture(scope="module")
def sanitizer():
    return _script("sanitizer_check")


@pytest.mark.skipif("cpu" not in wdopt.available_backends("cpu"), reason="the C++ CPU backend is not built")
def test_sanitizer_steps_run_every_engine_on_cpu(sanitizer):
    """The steps compute-sanitizer watches on the GPU (benchmarks/sanitizer_check.py), here on the
    CPU backend: every engine's step must at least run before a lent GPU runs it under the tool."""
    ran = sanitizer.run_steps("cpu", "cpu")
    for name in ("FusedAdamW", "FusedSGD", "FusedLion", "monitored", "monitored with statistics", "RotationalAdamW",
                 "RotationalSGD", "RotationalLion"):
        assert name in ran
    assert "no fast path" not in ran  # the second step of each element-wise optimizer took the fast path


def test_sanitizer_driver_classifies_runs(sanitizer, tmp_path, monkeypatch):
    """Without a GPU the driver records why it did not run; with one, a tool's exit status 99 is an
    error found, words of refusal are a refusal (not a failure) and anything else fails."""
    out = tmp_path / "sanitizer.json"
    if not torch.cuda.is_available():
        assert sanitizer.main([str(out)]) == 0
        assert json.loads(out.read_text())["skipped"] == "no CUDA device"

    class Process:  # subprocess.Popen as the driver uses it
        def __init__(self, rc, text):
            self.returncode, self.text, self.pid = rc, text, -1

        def communicate(self, timeout=None):
            return self.text, None

    for rc, output, status in ((0, "RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)", "clean"),
                               (99, "RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)", "errors found"),
                               (1, "========= Error: Device not supported", "refused"),
                               (1, "Traceback: something else", "failed")):
        monkeypatch.setattr(sanitizer.subprocess, "Popen", lambda *a, _rc=rc, _out=output, **k: Process(_rc, _out))
        result = sanitizer.sanitize("compute-sanitizer", "racecheck", "cuda", deadline=1e18)
        assert result["status"] == status, (output, result)
        assert result["tail"] == [output]


def test_sanitizer_timeout_kills_the_whole_process_group(sanitizer, tmp_path, monkeypatch):
    """A run past its limit is killed with the application the tool started (a session of its
    own), and counts as not clean."""
    import sys
    import time

    child_pid = tmp_path / "child.pid"
    tool = tmp_path / "slow-tool"
    tool.write_text("#!/bin/sh\n" + f'{sys.executable} -c "import os, time; open({str(child_pid)!r}, \'w\')'
                    '.write(str(os.getpid())); time.sleep(60)" &\nwait\n')
    tool.chmod(0o755)
    monkeypatch.setattr(sanitizer, "RUN_S", 2)
    result = sanitizer.sanitize(str(tool), "racecheck", "triton", deadline=time.monotonic() + 10)
    assert result["status"].startswith("timed out")
    pid = int(child_pid.read_text())
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the tool's child process survived the timeout")
