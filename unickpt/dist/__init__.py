"""Checkpoints written by many processes: the coordinator protocol and the save/restore steps.

See docs/distributed.md.  Nothing here imports a framework: the torch coordinator lives in
the torch adapter and is found by :func:`detect` when ``torch.distributed`` is initialized.
"""

from .coordinator import (
    DEFAULT_TIMEOUT,
    CoordinationError,
    Coordinator,
    SingleProcess,
)
from .discover import detect

__all__ = ["Coordinator", "SingleProcess", "CoordinationError", "DEFAULT_TIMEOUT", "detect"]
