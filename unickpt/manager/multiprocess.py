"""The manager's steps when several processes share one run (docs/distributed.md).

Kept apart from :mod:`.core` so the one-process manager reads as before; ``core`` calls
these only when its coordinator has more than one rank.

* the start decision is taken by rank 0 alone (it holds the root's lock, scans, archives)
  and broadcast, so ranks never disagree even when directory listings lag;
* a save is written by every rank and committed once by rank 0
  (:func:`unickpt.dist.save.commit_distributed`); the latest pointer and retention run on
  rank 0 after the commit, and every rank learns the resulting list of checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..dist.coordinator import CoordinationError
from ..dist.save import commit_distributed, fail_plan
from ..policy import format_step
from .records import StartDecision

__all__ = ["resolve_start", "write", "abort_save"]


def resolve_start(mgr: Any, local: Callable[[], StartDecision]) -> StartDecision:
    """Rank 0 runs ``local`` (scan, decide, archive); every rank gets its decision."""
    coord = mgr.coordinator
    err: BaseException | None = None
    msg: dict = {}
    if coord.rank == 0:
        try:
            d = local()
            msg = {"d": [d.resume, d.step, d.path, d.reason, d.archived_to, list(d.archived)],
                   "steps": sorted(mgr._steps), "resumed": mgr._resumed_step}
        except Exception as e:  # every rank must learn that there is no decision
            err = e
            msg = {"error": f"{type(e).__name__}: {e}"}
    msg = coord.broadcast(f"resolve_start {mgr.root}", msg)
    if err is not None:
        raise err
    if "error" in msg:
        raise CoordinationError(f"unickpt: rank 0 could not decide where the run in "
                                f"{mgr.root} starts: {msg['error']}",
                                phase=f"resolve_start {mgr.root}")
    if coord.rank != 0:
        resume, step, path, reason, archived_to, archived = msg["d"]
        mgr._steps = set(msg["steps"])
        mgr._resumed_step = mgr._last_saved_step = msg["resumed"]
        return StartDecision(resume, step, path, reason, archived_to, tuple(archived))
    return d


def write(mgr: Any, step: int, final: str, prepared: Any, metrics: dict, metadata: dict,
          info: Callable, after_commit: Callable[[], None]) -> dict:
    """Write this rank's part of ``step``; rank 0 commits, then runs ``after_commit``
    (pointer, retention) under the manager's mutex.  Returns what was recorded."""
    def rank0_after() -> list[int]:
        with mgr._mutex:
            after_commit()
            return sorted(mgr._steps)

    recorded: dict = {}

    def info_of(stats: Any) -> dict:
        recorded.update(info(stats))
        return recorded

    _stats, steps = commit_distributed(mgr.coordinator, mgr.storage, final, prepared,
                                       metadata=metadata, info=info_of,
                                       publish_guard=lambda: mgr._mutex,
                                       after_commit=rank0_after)
    if mgr.coordinator.rank != 0:
        with mgr._mutex:
            mgr._steps = set(steps or ()) | {step}
            mgr._metrics[step] = metrics
    return recorded


def abort_save(mgr: Any, step: int, error: BaseException) -> None:
    """This rank cannot save ``step`` (a bad leaf): tell the others in the plan step, so they
    raise at once instead of waiting for this rank until the timeout."""
    fail_plan(mgr.coordinator, format_step(step), error)
