"""What to keep: retention rules over committed checkpoints.

A checkpoint survives when at least one rule keeps it; the result names every rule that does
(shown by ``unickpt ls``):

* ``"newest"``: the newest committed checkpoint is always kept.
* ``"resumed"``: the checkpoint this run resumed from is always kept.
* ``"last"``: ``keep_last=N`` keeps the N newest.
* ``"every"``: ``keep_every=K`` keeps steps that are multiples of K, forever.
* ``"best"``: ``keep_best=N`` keeps the N best by ``best_metric`` (``best_mode`` "min" or
  "max"); ties go to the newer step.  **Missing-metric rule:** a checkpoint whose metrics
  lack ``best_metric``, or hold a non-number or NaN for it, is never a candidate for
  ``keep_best`` (it cannot be ranked); it survives only if another rule keeps it.
* ``"all"``: when no rule is configured (no ``keep_last``/``keep_every``/``keep_best``),
  everything is kept.

Deleting happens only after a new checkpoint committed (the manager's job).

>>> kept = retain([1, 2, 3, 4, 5], {2: {"loss": 0.1}, 5: {"loss": 0.9}}, keep_last=1,
...               keep_best=1, best_metric="loss")
>>> {s: r for s, r in kept.items() if r}
{2: ('best',), 5: ('newest', 'last')}
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

__all__ = ["retain", "to_delete", "metric_value"]


def metric_value(metrics: Mapping[str, Any] | None, name: str) -> float | None:
    """The rankable value of metric ``name``: a finite-or-infinite float, or None if absent/NaN."""
    if not metrics or name not in metrics:
        return None
    v = metrics[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return None if math.isnan(v) else v


def retain(steps: Sequence[int], metrics: Mapping[int, Mapping[str, Any]] | None = None, *,
           keep_last: int | None = None, keep_every: int | None = None,
           keep_best: int | None = None, best_metric: str | None = None,
           best_mode: str = "min", protected: Collection[int] = ()) -> dict[int, tuple[str, ...]]:
    """For every step, the rules keeping it (an empty tuple means: delete it)."""
    steps = sorted(set(steps))
    metrics = metrics or {}
    reasons: dict[int, list[str]] = {s: [] for s in steps}
    if not steps:
        return {}
    reasons[steps[-1]].append("newest")
    for s in protected:
        if s in reasons:
            reasons[s].append("resumed")
    if keep_last is None and keep_every is None and keep_best is None:
        for s in steps:
            reasons[s].append("all")
    if keep_last:
        for s in steps[-keep_last:]:
            reasons[s].append("last")
    if keep_every:
        for s in steps:
            if s % keep_every == 0:
                reasons[s].append("every")
    if keep_best and best_metric is not None:
        values = [(metric_value(metrics.get(s), best_metric), s) for s in steps]
        ranked = [(v, s) for v, s in values if v is not None]
        sign = 1.0 if best_mode == "min" else -1.0
        ranked.sort(key=lambda vs: (sign * vs[0], -vs[1]))
        for _, s in ranked[:keep_best]:
            reasons[s].append("best")
    return {s: tuple(r) for s, r in reasons.items()}


def to_delete(kept: Mapping[int, tuple[str, ...]]) -> list[int]:
    """Steps no rule keeps, ascending."""
    return sorted(s for s, r in kept.items() if not r)
