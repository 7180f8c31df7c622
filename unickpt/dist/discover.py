"""Which coordinator a manager uses when none is given.

``torch.distributed`` initialized with more than one process: the torch coordinator (on a
dedicated gloo group).  Otherwise: :class:`~unickpt.dist.SingleProcess`.  The check looks at
``sys.modules`` only, so a process that never imported torch never imports it here.

>>> detect()
SingleProcess()
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from ..errors import ConfigError
from .coordinator import Coordinator, SingleProcess

__all__ = ["detect"]


def detect(coordinator: Any = None, process_group: Any = None,
           timeout: float | None = None) -> Coordinator:
    """The coordinator for ``coordinator=`` / ``process_group=`` (or the detected one)."""
    if coordinator is not None:
        if process_group is not None:
            raise ConfigError("give coordinator= or process_group=, not both")
        if not isinstance(coordinator, Coordinator):
            raise ConfigError(f"coordinator={coordinator!r} does not implement "
                              "unickpt.dist.Coordinator (rank, world_size, barrier, "
                              "broadcast, all_gather)")
        return coordinator
    tdist = sys.modules.get("torch.distributed")
    if process_group is not None or (
            tdist is not None and tdist.is_available() and tdist.is_initialized()
            and tdist.get_world_size() > 1):
        mod = importlib.import_module("unickpt_torch.dist")
        return mod.TorchCoordinator(process_group, timeout=timeout)
    return SingleProcess()
