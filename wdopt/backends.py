"""Which backend runs a step: availability checks (cheap, no heavy imports) and loading.

Backends, fastest first where available:
    "cuda"       C++/CUDA multi-tensor kernels (not part of this version)
    "cpu"        fused C++ CPU kernels (not part of this version)
    "triton"     Triton multi-tensor kernels: CUDA tensors natively; CPU tensors only under the
                 Triton interpreter (TRITON_INTERPRET=1), which is for testing and never chosen by "auto"
    "reference"  the readable per-tensor torch implementation in wdopt.reference (any device)
Every backend module provides ``adamw``, ``sgd`` and ``lion`` with the reference's signatures.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType

import torch

BACKENDS = ("cuda", "cpu", "triton", "reference")
BACKEND_CHOICES = ("auto",) + BACKENDS

_NOT_BUILT = "the C++ {} backend is not part of this version of wdopt; use backend='triton' or 'reference'"


def _device_type(device) -> str:
    return torch.device(device).type


def _triton_unavailable(device_type: str) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton; Linux only)"
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    loaded = sys.modules.get("wdopt.kernels.triton")
    if loaded is not None:
        interpreted = loaded.INTERPRETED  # decided when the kernels were first imported
    if device_type == "cuda":
        if interpreted:
            return "TRITON_INTERPRET=1 runs Triton on the CPU; it cannot run kernels on CUDA tensors"
        if not torch.cuda.is_available():
            return "torch has no usable CUDA device"
        return None
    if device_type == "cpu":
        if not interpreted:
            if loaded is not None and os.environ.get("TRITON_INTERPRET", "0") == "1":
                return ("TRITON_INTERPRET=1 was set after wdopt's Triton kernels were loaded; "
                        "set it before the first step")
            return "Triton runs CPU tensors only under its interpreter: set TRITON_INTERPRET=1 (for testing)"
        return None
    return f"Triton does not run on {device_type} tensors"


def unavailable_reason(backend: str, device="cpu") -> str | None:
    """None when ``backend`` can run on ``device``, else a sentence saying why not."""
    device_type = _device_type(device)
    if backend == "reference":
        return None
    if backend == "triton":
        return _triton_unavailable(device_type)
    if backend in ("cpu", "cuda"):
        return _NOT_BUILT.format(repr(backend))
    raise ValueError(f"Unknown backend {backend!r}; choose one of {BACKEND_CHOICES}")


def available_backends(device="cpu") -> list[str]:
    """The backends that can run on ``device``, fastest first."""
    return [b for b in BACKENDS if unavailable_reason(b, device) is None]


def auto_backend(device) -> str:
    """The fastest available backend for ``device``; never the Triton interpreter."""
    device_type = _device_type(device)
    for backend in available_backends(device):
        if backend == "triton" and device_type != "cuda":
            continue
        return backend
    return "reference"


def resolve(backend: str, device) -> str:
    """The concrete backend for a requested one, or a ValueError saying why it cannot run."""
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"Unknown backend {backend!r}; choose one of {BACKEND_CHOICES}")
    if backend == "auto":
        return auto_backend(device)
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise ValueError(f"backend={backend!r} cannot run on {torch.device(device).type} tensors: {reason}")
    return backend


def load(backend: str) -> ModuleType:
    """The module implementing ``backend`` (imported on first use)."""
    if backend == "reference":
        return importlib.import_module("wdopt.reference")
    if backend == "triton":
        return importlib.import_module("wdopt.kernels.triton")
    raise ValueError(_NOT_BUILT.format(repr(backend)))


# Dtypes each backend's kernels handle (complex parameters are viewed as real pairs first).
SUPPORTED_DTYPES = {
    "reference": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "triton": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}
