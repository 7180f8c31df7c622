"""Names of things in a run root, and classifying a directory listing.

A run root holds committed checkpoints ``step_<N>`` (N a non-negative decimal integer without
leading zeros, so every step has exactly one name), archived runs ``run_<K>``, temporary
directories of saves in progress or crashed (``.unickpt-tmp.*``), retention trash
(``.unickpt-trash.*``), the writer lock ``.unickpt.lock`` and the ``latest`` pointer file.

>>> format_step(42), parse_step("step_42"), parse_step("step_042"), parse_step("ckpt")
('step_42', 42, None, None)
>>> listing = classify(["step_1", "step_5", "step_9", "run_2", ".unickpt-tmp.step_9.h.7.ab12cd34"],
...                    committed={"step_1", "step_5"})
>>> listing.steps, listing.uncommitted, listing.runs
((1, 5), ('step_9',), (2,))
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass

# The storage layer names its temporary and trash directories; policy only recognises them.
from ..storage import LOCK_NAME, TEMP_PREFIX, TRASH_PREFIX

__all__ = ["STEP_PREFIX", "RUN_PREFIX", "LATEST_NAME", "LOCK_NAME", "TEMP_PREFIX",
           "TRASH_PREFIX", "format_step", "parse_step", "format_run", "parse_run", "Listing",
           "classify"]

STEP_PREFIX = "step_"
RUN_PREFIX = "run_"
LATEST_NAME = "latest"

_STEP = re.compile(r"^step_(0|[1-9][0-9]*)$")
_RUN = re.compile(r"^run_(0|[1-9][0-9]*)$")


def format_step(step: int) -> str:
    """The directory name of the checkpoint of ``step``."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"a step is a non-negative int, got {step!r}")
    return f"{STEP_PREFIX}{step}"


def parse_step(name: str) -> int | None:
    """The step of a ``step_<N>`` name, or None for any other name."""
    m = _STEP.match(name)
    return int(m.group(1)) if m else None


def format_run(run: int) -> str:
    """The directory name of archived run ``run``."""
    return f"{RUN_PREFIX}{run}"


def parse_run(name: str) -> int | None:
    """The number of a ``run_<K>`` name, or None for any other name."""
    m = _RUN.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Listing:
    """A run root's entries, sorted into what they are.

    Attributes:
        steps: steps of committed checkpoints, ascending.
        uncommitted: ``step_<N>`` entries that are not committed checkpoints (never read,
            never deleted automatically).
        runs: numbers of archived ``run_<K>`` directories, ascending.
        temps: temporary directories of saves (running or crashed).
        trash: checkpoints being deleted by retention (always safe to remove).
        other: anything else (left alone).
    """

    steps: tuple[int, ...] = ()
    uncommitted: tuple[str, ...] = ()
    runs: tuple[int, ...] = ()
    temps: tuple[str, ...] = ()
    trash: tuple[str, ...] = ()
    other: tuple[str, ...] = ()

    @property
    def newest(self) -> int | None:
        """The newest committed step, or None when there is none."""
        return self.steps[-1] if self.steps else None


def classify(names: Iterable[str], committed: Collection[str]) -> Listing:
    """Sort the entry ``names`` of a root; ``committed`` says which ones are checkpoints."""
    steps: list[int] = []
    runs: list[int] = []
    unc: list[str] = []
    temps: list[str] = []
    trash: list[str] = []
    other: list[str] = []
    for n in names:
        s = parse_step(n)
        r = parse_run(n)
        if s is not None:
            (steps.append(s) if n in committed else unc.append(n))
        elif r is not None:
            runs.append(r)
        elif n.startswith(TEMP_PREFIX):
            temps.append(n)
        elif n.startswith(TRASH_PREFIX):
            trash.append(n)
        else:
            other.append(n)
    return Listing(tuple(sorted(steps)), tuple(sorted(unc, key=lambda n: parse_step(n) or 0)),
                   tuple(sorted(runs)), tuple(sorted(temps)), tuple(sorted(trash)),
                   tuple(sorted(other)))
