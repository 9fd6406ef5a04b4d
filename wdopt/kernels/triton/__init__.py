"""Triton backend: multi-tensor kernels that run natively on CUDA tensors, and on CPU tensors
under the Triton interpreter (``TRITON_INTERPRET=1``, set before this package is imported).

``multi_tensor`` moves memory (tensor tables, work items, launches); ``adamw``, ``sgd`` and
``lion`` each hold one optimizer's math and the kernel that applies it.
"""

import os

#: Triton decides at decoration time whether kernels are compiled or interpreted.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

from .adamw import adamw  # noqa: E402
from .lion import lion  # noqa: E402
from .sgd import sgd  # noqa: E402

__all__ = ["INTERPRETED", "adamw", "lion", "sgd"]
