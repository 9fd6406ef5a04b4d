"""The optimizer classes: torch.optim.Optimizer subclasses that dispatch to a backend."""

from .adamw import FusedAdamW
from .lion import FusedLion
from .sgd import FusedSGD

__all__ = ["FusedAdamW", "FusedLion", "FusedSGD"]
