"""Test setup: which backends run where.

Without a CUDA device the Triton kernels run on CPU tensors under the Triton interpreter, so
TRITON_INTERPRET=1 is set here, before any wdopt kernel is imported. With a GPU the Triton
backend is tested natively on CUDA tensors instead. In CI (CI=true) a missing triton is a failure.
"""

import importlib.util
import os

import pytest
import torch

# One intra-op thread. On the 2-core machine, shared with other jobs, torch's thread pool made every
# CPU op over 32,768 elements wait for a descheduled second thread: the reference and torch.optim
# runs of tests/test_parity.py took 20–60x longer than with one thread (issue 12 §7). The C++
# backend's split of the work across threads is tested on purpose, with several thread counts, in
# tests/test_parity.py::test_cpu_kernels_split_across_threads_identically.
torch.set_num_threads(1)

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("CI", "").lower() == "true" and importlib.util.find_spec("triton") is None:
    raise pytest.UsageError("triton is not installed: CI must test the Triton backend")


import wdopt  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def backend_device_pairs():
    """Every (backend, device) that can run here; "reference" on every device."""
    return [(b, d) for d in DEVICES for b in wdopt.available_backends(d)]


def pytest_report_header(config):
    return [f"wdopt backends: {backend_device_pairs()}"]
