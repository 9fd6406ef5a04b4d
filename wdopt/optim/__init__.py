"""The optimizer classes: torch.optim.Optimizer subclasses that dispatch to a backend."""

from .adamw import FusedAdamW
from .lion import FusedLion
from .rotational import RotationalAdamW, RotationalLion, RotationalSGD
from .sgd import FusedSGD

__all__ = ["FusedAdamW", "FusedLion", "FusedSGD", "RotationalAdamW", "RotationalLion", "RotationalSGD"]
