"""When to save.

A call ``save(step, ...)`` writes a checkpoint when any of these holds:

* ``force=True`` (end of training, end of an epoch),
* no schedule is configured (neither ``save_every`` nor ``save_every_seconds``): every call,
* ``save_every`` is set and ``step % save_every == 0``,
* ``save_every_seconds`` is set and at least that long passed since the last save (or since
  the manager started, for the first one).

Whatever the schedule says, a step that is already committed (or was the last one saved)
is never written again: saving the same step twice is a no-op, even with ``force``.

>>> should_save(10, save_every=5).save, should_save(11, save_every=5).save
(True, False)
>>> should_save(10, save_every=5, force=True, existing=(10,)).reason
'step 10 is already saved'
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

__all__ = ["SaveDecision", "should_save"]


@dataclass(frozen=True)
class SaveDecision:
    """Whether to save, and why (for logs)."""

    save: bool
    reason: str


def should_save(step: int, *, save_every: int | None = None,
                save_every_seconds: float | None = None, force: bool = False,
                now: float = 0.0, last_save_time: float = 0.0,
                last_saved_step: int | None = None,
                existing: Collection[int] = ()) -> SaveDecision:
    """Apply the save schedule to ``step`` (times in seconds on any one clock)."""
    if step == last_saved_step or step in existing:
        return SaveDecision(False, f"step {step} is already saved")
    if force:
        return SaveDecision(True, "forced")
    if save_every is None and save_every_seconds is None:
        return SaveDecision(True, "no schedule: every call saves")
    if save_every is not None and step % save_every == 0:
        return SaveDecision(True, f"step is a multiple of save_every={save_every}")
    if save_every_seconds is not None and now - last_save_time >= save_every_seconds:
        return SaveDecision(True, f"{now - last_save_time:.1f}s since the last save "
                                  f">= save_every_seconds={save_every_seconds}")
    return SaveDecision(False, "not due")
