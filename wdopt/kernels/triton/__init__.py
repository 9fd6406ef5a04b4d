"""Triton backend: multi-tensor kernels that run natively on CUDA tensors, and on CPU tensors
under the Triton interpreter (``TRITON_INTERPRET=1``, set before this package is imported).

``multi_tensor`` moves memory (tensor tables, work items, launches); ``adamw``, ``sgd`` and
``lion`` each hold one optimizer's math and the kernel that applies it; ``rotational`` is the row
engine of the rotational variants, on those optimizers' direction functions. Every step can also
fill rotation telemetry (``telemetry=``, wdopt/reference/telemetry.py) as it updates the elements.
"""

import os

#: Triton decides at decoration time whether kernels are compiled or interpreted.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

from .adamw import adamw  # noqa: E402
from .lion import lion  # noqa: E402
from .rotational import rotational  # noqa: E402
from .sgd import sgd  # noqa: E402

#: The driver gathers rotation telemetry with these kernels (``telemetry=`` on every step function).
TELEMETRY = True
#: Device types whose kernels also gather the direction statistics ((K, 8) telemetry buffers).
STATISTICS = ("cpu", "cuda")
#: Device types whose kernels round bf16/fp16 stores stochastically when handed ``rng`` (rounding.py).
STOCHASTIC_ROUNDING = ("cpu", "cuda")
#: Device types whose kernels update compensated bf16 parameters when handed ``correction`` (rounding.py).
COMPENSATION = ("cpu", "cuda")
#: Device types whose kernels update 8-bit states when handed their block ``scales`` (quantization.py).
QUANTIZED_STATES = ("cpu", "cuda")
#: Device types whose rotational kernel takes ``rng`` and ``correction`` (elsewhere the driver
#: rotates such tensors with the reference).
ROTATIONAL_LOW_PRECISION = ("cpu", "cuda")
#: Device types whose rotational kernel takes 8-bit states (``scales``): the row kernels rotate with
#: the new states, decoded, and write none; a block-phase launch encodes them (rotational.py, as
#: csrc/cpu/rotational_cpu.cpp). The same tl operations compiled or interpreted.
ROTATIONAL_QUANTIZED_STATES = ("cpu", "cuda")

__all__ = ["COMPENSATION", "INTERPRETED", "QUANTIZED_STATES", "ROTATIONAL_LOW_PRECISION",
           "ROTATIONAL_QUANTIZED_STATES", "STATISTICS",
           "STOCHASTIC_ROUNDING", "TELEMETRY",
           "adamw", "lion",
           "rotational", "sgd"]
