"""Readable reference implementations: the specification every backend is tested against.

One module per optimizer. Each holds a per-tensor ``*_step`` function written in plain torch
(no torch.optim, no ``_foreach_``/``_fused_`` ops) and a list-level wrapper with the signature
every backend implements, so the reference is also the ``"reference"`` backend.

Math is done in fp32 for fp16/bf16/fp32 tensors and in fp64 for fp64 tensors, exactly as the fused
kernels do; scalars are computed in Python (double) and rounded once to the compute dtype.

Reading a scalar in Python means reading it on the host: a tensor lr, step counts, GradScaler's
found_inf and SGD's first-step flags are read with ``.item()``, so the reference backend syncs
with the device even with ``capturable=True`` (and cannot be captured in a CUDA graph); the fused
backends read them on the device.
"""

from .adamw import adamw, adamw_step
from .lion import lion, lion_step
from .sgd import sgd, sgd_step

__all__ = ["adamw", "adamw_step", "lion", "lion_step", "sgd", "sgd_step"]
