"""What the manager reports and records: start decisions, restore results, listings, and
the ``info`` map stored in every checkpoint's manifest.

>>> from unickpt.format.writer import WriteStats
>>> info = checkpoint_info(3, {"loss": 0.5}, 2.0, WriteStats(4_000_000, 2, 1.5))
>>> info["step"], info["nbytes"], info["written_bytes"], info["bandwidth"]
(3, 4000000, 4000000, 2000000.0)
"""

from __future__ import annotations

import os
import platform
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import __version__
from ..errors import UnsupportedLeafError
from ..format.writer import WriteStats

__all__ = ["StartDecision", "Restored", "CheckpointInfo", "checkpoint_info",
           "plain_metrics", "framework_versions"]

_FRAMEWORKS = ("torch", "jax", "jaxlib", "flax", "optax", "orbax.checkpoint")


@dataclass(frozen=True)
class StartDecision:
    """The single startup decision of a run (see :meth:`CheckpointManager.resolve_start`).

    Attributes:
        resume: whether a checkpoint is loaded.
        step: its step; 0 on a cold start.
        path: the checkpoint directory, or None.
        reason: why (for logs).
        archived_to: the ``run_<K>`` directory old checkpoints were moved into, or None.
        archived: the names of the moved checkpoints.
    """

    resume: bool
    step: int
    path: str | None
    reason: str
    archived_to: str | None = None
    archived: tuple[str, ...] = ()


@dataclass(frozen=True)
class Restored:
    """What :meth:`CheckpointManager.restore` did.

    ``state`` is the restored state: the same objects for mutable framework objects loaded
    in place (modules, optimizers, Stateful objects), new values for immutable ones (numpy
    arrays in a dict, Python scalars, JAX arrays).  On a cold start it is the given state,
    untouched, and ``step`` is 0.
    """

    step: int
    state: Any
    resumed: bool
    path: str | None
    metadata: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointInfo:
    """One committed checkpoint as listed by :meth:`CheckpointManager.checkpoints`."""

    step: int
    path: str
    time: float
    size: int
    metrics: dict = field(default_factory=dict)


def framework_versions() -> dict[str, str]:
    # Only frameworks the process already imported: recording must never import one.
    out = {}
    for name in _FRAMEWORKS:
        mod = sys.modules.get(name)
        if mod is not None:
            out[name] = str(getattr(mod, "__version__", "unknown"))
    return out


def plain_metrics(metrics: Mapping[str, Any] | None, step: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (metrics or {}).items():
        if not isinstance(k, str):
            raise UnsupportedLeafError(f"save(step={step}): metric name {k!r} must be a str")
        if hasattr(v, "item") and getattr(v, "size", 1) == 1:
            v = v.item()  # numpy / framework scalars
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise UnsupportedLeafError(
                f"save(step={step}): metric {k!r} is {type(v).__name__}, not a number; put "
                "other data in metadata=")
        out[k] = v
    return out


def checkpoint_info(step: int, metrics: dict, seconds: float, stats: WriteStats, *,
                    async_save: bool = False, resumed_from: int | None = None,
                    retention: dict | None = None) -> dict:
    """The manifest ``info`` of a manager save (user metadata is stored separately)."""
    return {
        "step": step,
        "time": time.time(),
        "metrics": metrics,
        "unickpt_version": __version__,
        "frameworks": framework_versions(),
        "python": platform.python_version(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "save_seconds": seconds,
        "nbytes": stats.nbytes,
        "written_bytes": stats.written,
        "files": stats.files,
        "shared_files": stats.shared_files,
        "narrays": stats.narrays,
        "bandwidth": stats.nbytes / seconds if seconds > 0 else 0.0,
        "async": async_save,
        "resumed_from": resumed_from,
        "retention": retention or {},
    }
