"""Which backend runs a step: availability checks (cheap, no heavy imports) and loading.

Backends, fastest first where available:
    "cuda"       C++/CUDA multi-tensor kernels (csrc/cuda), in the C++ extension
    "cpu"        fused C++ CPU kernels (csrc/cpu), in the C++ extension; "auto" on CPU
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
import warnings
from types import ModuleType

import torch

BACKENDS = ("cuda", "cpu", "triton", "reference")
BACKEND_CHOICES = ("auto",) + BACKENDS



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


def _cpp_unavailable(backend: str, device_type: str) -> str | None:
    if backend != device_type:
        return f"the {backend!r} backend runs on {backend} tensors only"
    from .kernels import cpp

    reason = cpp.unavailable_reason()
    if reason is not None or backend == "cpu":
        return reason
    if not torch.cuda.is_available():
        return "torch has no usable CUDA device"
    if cpp.loaded():
        return None if cpp.has_cuda_kernels() else "the C++ extension was built without CUDA kernels"
    return None if cpp.prebuilt_available() else cpp.cuda_buildable()


def unavailable_reason(backend: str, device="cpu") -> str | None:
    """None when ``backend`` can run on ``device``, else a sentence saying why not."""
    device_type = _device_type(device)
    if backend == "reference":
        return None
    if backend == "triton":
        return _triton_unavailable(device_type)
    if backend in ("cpu", "cuda"):
        return _cpp_unavailable(backend, device_type)
    raise ValueError(f"Unknown backend {backend!r}; choose one of {BACKEND_CHOICES}")


def available_backends(device="cpu") -> list[str]:
    """The backends that can run on ``device``, fastest first."""
    return [b for b in BACKENDS if unavailable_reason(b, device) is None]


def auto_backend(device, build: bool = True) -> str:
    """The fastest available backend for ``device``; never the Triton interpreter, and never a
    multi-minute CUDA build on the first step: "cuda" only once its extension is there.
    ``build=False`` answers without compiling anything (for reports)."""
    from .kernels import cpp

    device_type = _device_type(device)
    if device_type == "cpu" and build:
        reason = unavailable_reason("cpu", "cpu")
        if reason is not None:
            _warn_once("cpu-kernels", f"wdopt: the fused C++ CPU kernels are unavailable ({reason}); "
                       "using the slower reference backend")
    for backend in available_backends(device):
        if backend == "triton" and device_type != "cuda":
            continue
        # A finished JIT build in the cache loads in a second: "auto" takes it (a fresh process
        # has loaded nothing yet; on the H200, 2026-11-28, every later process fell back to Triton).
        if backend == "cuda" and not (cpp.has_cuda_kernels() or cpp.prebuilt_available()
                                      or (build and cpp.load_if_built() and cpp.has_cuda_kernels())):
            if build:
                _warn_once("cuda-not-built", CUDA_NOT_BUILT)
            continue
        if backend in ("cpu", "cuda") and build:
            try:
                cpp.load()
            except RuntimeError as error:
                _warn_once(f"{backend}-kernels", f"wdopt: {error}; falling back to a slower backend")
                continue
        return backend
    return "reference"


#: Said once per process when "auto" passes over a CUDA backend that could be built: on an H200 it
#: ran AdamW 1.1-1.6x faster than Triton (benchmarks/RESULTS.md, 2026-11-27).
CUDA_NOT_BUILT = (
    "wdopt: backend='auto' uses Triton on this GPU because the faster C++/CUDA kernels are not built yet; "
    "build them once (about a minute, cached) with: python -c \"import wdopt.kernels.cpp as c; c.load()\"")

_warned: set[str] = set()


def _warn_once(cause: str, message: str) -> None:
    """One warning per cause, however many optimizers or steps meet it."""
    if cause not in _warned:
        _warned.add(cause)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


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
    """The module implementing ``backend`` (imported, or built, on first use)."""
    if backend == "reference":
        return importlib.import_module("wdopt.reference")
    if backend == "triton":
        return importlib.import_module("wdopt.kernels.triton")
    if backend in ("cpu", "cuda"):
        from .kernels import cpp

        cpp.load()
        return cpp
    raise ValueError(f"Unknown backend {backend!r}; choose one of {BACKEND_CHOICES}")


def rounds_stochastically(module: ModuleType, device) -> bool:
    """Whether a loaded backend's kernels round bf16/fp16 stores stochastically on ``device``
    (``STOCHASTIC_ROUNDING``: the device types that do; the reference does everywhere)."""
    return module.__name__ == "wdopt.reference" or _device_type(device) in getattr(module, "STOCHASTIC_ROUNDING", ())


def compensates(module: ModuleType, device) -> bool:
    """Whether a loaded backend's kernels update compensated bf16 parameters (master_weight_bits
    24 or 32) on ``device`` (``COMPENSATION``: the device types that do; the reference everywhere)."""
    return module.__name__ == "wdopt.reference" or _device_type(device) in getattr(module, "COMPENSATION", ())


def quantizes(module: ModuleType, device) -> bool:
    """Whether a loaded backend's kernels update 8-bit states (state_bits=8) on ``device``
    (``QUANTIZED_STATES``: the device types that do; the reference everywhere)."""
    return module.__name__ == "wdopt.reference" or _device_type(device) in getattr(module, "QUANTIZED_STATES", ())


def quantizes_rotational(module: ModuleType, device) -> bool:
    """Whether a loaded backend updates the 8-bit states of rotational tensors on ``device``
    (``ROTATIONAL_QUANTIZED_STATES``: the device types whose rotational kernel does; the reference
    everywhere)."""
    return module.__name__ == "wdopt.reference" or \
        _device_type(device) in getattr(module, "ROTATIONAL_QUANTIZED_STATES", ())


#: The backends whose rotational steps take 8-bit states, for error messages.
ROTATIONAL_QUANTIZED_BACKENDS = ("reference", "cpu", "cuda", "triton")


# Dtypes each backend's kernels handle (complex parameters are viewed as real pairs first).
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SUPPORTED_DTYPES = {"reference": _FLOATS, "triton": _FLOATS, "cpu": _FLOATS, "cuda": _FLOATS}
