"""Test setup: which backends run where.

Without a CUDA device the Triton kernels run on CPU tensors under the Triton interpreter, so
TRITON_INTERPRET=1 is set here, before any wdopt kernel is imported. With a GPU the Triton
backend is tested natively on CUDA tensors instead. In CI (CI=true) a missing triton is a failure.
"""

import importlib.util
import os

import pytest
import torch

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
