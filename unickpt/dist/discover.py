"""Which coordinator a manager uses when none is given.

``torch.distributed`` initialized with more than one process: the torch coordinator (on a
dedicated gloo group).  Else ``jax.distributed`` initialized with more than one process: the
JAX coordinator (on JAX's coordination service).  Otherwise:
:class:`~unickpt.dist.SingleProcess`.  The checks look at ``sys.modules`` only, so a process
that never imported torch or jax never imports them here.

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
    if _jax_multiprocess():
        return importlib.import_module("unickpt_jax.dist").JaxCoordinator(timeout=timeout)
    return SingleProcess()


def _jax_multiprocess() -> bool:
    """Whether this process is one of several of an initialized ``jax.distributed`` job."""
    jdist = sys.modules.get("jax._src.distributed")
    if jdist is None or getattr(jdist.global_state, "client", None) is None:
        return False
    return bool(sys.modules["jax"].process_count() > 1)
