"""wdopt: fused optimizers with decoupled weight decay for PyTorch.

    import wdopt
    opt = wdopt.FusedAdamW(model.parameters(), lr=1e-3, weight_decay=0.1)   # as torch.optim.AdamW

Importing wdopt loads no kernels: a backend (Triton, C++) is imported by the first step that uses it.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "FusedAdamW": "wdopt.optim",
    "FusedSGD": "wdopt.optim",
    "FusedLion": "wdopt.optim",
    "RotationalAdamW": "wdopt.optim",
    "RotationalSGD": "wdopt.optim",
    "RotationalLion": "wdopt.optim",
    "RotationMonitor": "wdopt.telemetry",
    "available_backends": "wdopt.backends",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'wdopt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
