"""Save on a scheduler's stop signal: flag, agreement across ranks, grace budget.

``CheckpointManager(root, preemption=True)`` installs handlers for SIGTERM and SIGUSR1 (or
``preemption_signals``) that only set a flag.  The next ``save()`` agrees on the flag with
the other ranks (:class:`Agreement`), saves regardless of the schedule, waits for the commit
and sets ``mgr.preempted``, so the loop can ``break`` and the process exit 0.
See docs/preemption.md.

>>> import os, signal, tempfile, numpy as np, unickpt
>>> with unickpt.CheckpointManager(tempfile.mkdtemp(), preemption=True, save_every=100) as mgr:
...     mgr.save(1, {"w": np.zeros(2)})          # not due: the schedule says step 100
...     os.kill(os.getpid(), signal.SIGTERM)     # the scheduler says stop
...     mgr.save(2, {"w": np.ones(2)}), mgr.preempted
False
(True, True)
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from ..errors import ConfigError, UnickptError

__all__ = ["SignalFlag", "Agreement", "Preemption", "GatherCoordinator", "AGREE_TIMEOUT"]

log = logging.getLogger("unickpt")

AGREE_TIMEOUT = 300.0  # seconds one agreement collective may wait for the slowest rank


class GatherCoordinator(Protocol):
    """The one coordinator method the agreement needs (the rest of the protocol is not used).

    ``all_gather(obj, timeout)`` returns every rank's ``obj`` (a small dict of plain
    values), in rank order, identical on every rank; it raises when a rank is missing after
    ``timeout`` seconds.  ``world_size`` (optional) of 1 skips the collective.
    """

    def all_gather(self, obj: Any, timeout: float) -> list[Any]: ...


class SignalFlag:
    """Handlers that only record the signal (async-signal-safe: no I/O, no locks).

    Installed from the main thread only (Python runs handlers there, and only the main
    thread may install them); each chains to the Python handler it replaced.  ``restore()``
    puts the previous handlers back.

    >>> import os, signal
    >>> f = SignalFlag([signal.SIGUSR1], "demo")
    >>> os.kill(os.getpid(), signal.SIGUSR1)
    >>> f.count, f.signum == signal.SIGUSR1
    (1, True)
    >>> f.restore(), signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    (True, True)
    """

    def __init__(self, signals: Iterable[int], what: str):
        if threading.current_thread() is not threading.main_thread():
            raise ConfigError(
                f"CheckpointManager({what!r}, preemption=True) was created in thread "
                f"{threading.current_thread().name!r}: signal handlers can only be installed "
                "from the main thread; create the manager there (or set preemption=False)")
        self.count = 0
        self.signum: int | None = None
        self.first_time: float | None = None
        self._previous: dict[int, Any] = {}
        try:
            for s in signals:
                self._previous[s] = signal.getsignal(s)
                signal.signal(s, self._handle)
        except BaseException:
            self.restore()
            raise

    def _handle(self, signum: int, frame: Any) -> None:
        # Python runs this in the main thread between bytecodes, possibly in the middle of a
        # save: record and return, never save or raise from here.
        self.count += 1
        self.signum = signum
        if self.first_time is None:
            self.first_time = time.monotonic()
        prev = self._previous.get(signum)
        # Chain to a handler some Python code installed; not to Python's own SIGINT default,
        # whose KeyboardInterrupt would abort the very save the signal asks for.
        if callable(prev) and prev is not signal.default_int_handler:
            prev(signum, frame)

    def restore(self) -> bool:
        """Reinstall the previous handlers (where ours is still the installed one).

        Returns False (handlers left in place: they only count, and chain) when called from
        a thread other than the main one."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("unickpt: preemption signal handlers not restored: close() ran in "
                        "thread %r, and only the main thread may install handlers",
                        threading.current_thread().name)
            return False
        for s, prev in list(self._previous.items()):
            if signal.getsignal(s) == self._handle:
                # None: the previous handler was not set from Python; the default is closest.
                signal.signal(s, signal.SIG_DFL if prev is None else prev)
                del self._previous[s]
            # else a handler installed after ours may chain to ours: keep chaining to the
            # one we replaced, so the chain stays whole
        return True


class Agreement:
    """Any rank's flag becomes every rank's, at ``save()`` calls, through one small collective.

    ``agree(flag, step)`` is called by every rank at the same steps.  With no coordinator
    (or a world of one) it returns ``flag``.  Otherwise it gathers ``flag`` from every rank
    at most every ``every_steps`` steps or ``every_seconds`` seconds (whichever comes first;
    on every call when neither is set); between checks it returns False, on every rank
    alike, so all ranks save the same step.  The seconds become a number of steps, from the
    step times every rank reports at each check, so every rank computes the same next check
    step without a clock of its own deciding.  Once True, it stays True.

    >>> Agreement().agree(True, 7)
    True
    """

    def __init__(self, coordinator: GatherCoordinator | None = None, *,
                 every_steps: int | None = None, every_seconds: float | None = None,
                 timeout: float = AGREE_TIMEOUT, clock: Callable[[], float] = time.monotonic):
        self.coordinator = coordinator
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.timeout = timeout
        self.checks = 0  # collectives run (for tests and logs)
        self._clock = clock
        self._agreed = False
        self._next: int | None = None  # first step at which the next collective runs
        self._last: tuple[int, float] | None = None  # (step, time) of the last collective

    def agree(self, flag: bool, step: int) -> bool:
        if self._agreed:
            return True
        coord = self.coordinator
        if coord is None or getattr(coord, "world_size", 2) == 1:
            self._agreed = bool(flag)
            return self._agreed
        if self._next is not None and step < self._next:
            return False
        now = self._clock()
        pace = None  # this rank's seconds per step since the last check
        if self._last is not None and step > self._last[0]:
            pace = (now - self._last[1]) / (step - self._last[0])
        got = coord.all_gather({"flag": bool(flag), "step": int(step), "pace": pace},
                               self.timeout)
        self.checks += 1
        self._last = (step, now)
        steps = {g["step"] for g in got}
        if len(steps) > 1:
            raise UnickptError(
                f"preemption agreement at save(step={step}): the ranks called save() with "
                f"different steps {sorted(steps)}; every rank must call save() at the same "
                "steps (a rank seeing a preemption signal must still reach the same step)")
        self._agreed = any(g["flag"] for g in got)
        self._next = step + self._gap([g["pace"] for g in got])
        return self._agreed

    def _gap(self, paces: list[float | None]) -> int:
        gaps = []
        if self.every_steps is not None:
            gaps.append(self.every_steps)
        if self.every_seconds is not None:
            known = [p for p in paces if p is not None]
            if not known or len(known) < len(paces):
                gaps.append(1)  # no pace yet: measure it at the next call
            else:
                fastest = min(known)
                # (the epsilon: 1.0 / 0.1 measured as 9.9999... is still 10 steps)
                gaps.append(max(1, math.floor(self.every_seconds / fastest + 1e-9))
                            if fastest > 0 else 1)
        return min(gaps) if gaps else 1


class Preemption:
    """The manager's side: the signal flag, the agreement, the grace budget.

    The manager calls :meth:`due` at each ``save()`` (True: save this step regardless of the
    schedule), :meth:`finish` once that save is committed, and :meth:`record_save` after
    every commit with its duration.
    """

    def __init__(self, signals: Iterable[int], grace: float, what: str, *,
                 coordinator: GatherCoordinator | None = None,
                 every_steps: int | None = None, every_seconds: float | None = None):
        self.what = what
        self.grace = grace
        self.agreement = Agreement(coordinator, every_steps=every_steps,
                                   every_seconds=every_seconds)
        self.preempted = False
        self.saved_step: int | None = None
        self._durations: deque[float] = deque(maxlen=5)
        self.flag = SignalFlag(signals, what)

    def due(self, step: int) -> bool:
        """True when this ``save()`` is the preemption save (every rank alike)."""
        if self.preempted:
            return False  # one preemption save; later saves follow the schedule again
        due = self.agreement.agree(self.flag.count > 0, step)
        if due:
            self.check_budget(f"preemption save of step {step}")
        return due

    def finish(self, wait: Callable[[], None], step: int) -> None:
        """After the preemption save of ``step``: wait for its commit, then set the flag."""
        wait()
        self.preempted = True
        self.saved_step = step
        t = self.flag.first_time
        took = time.monotonic() - t if t is not None else None
        log.warning("unickpt: preemption: %s is committed%s; stop the loop "
                    "(`if mgr.preempted: break`)", f"{self.what}/step_{step}",
                    "" if took is None else f", {took:.2f}s after the signal "
                    f"(grace {self.grace:g}s)")

    def record_save(self, seconds: float) -> None:
        """Remember how long a save took (from the ``save()`` call to its commit)."""
        self._durations.append(seconds)

    def check_budget(self, when: str) -> bool:
        """Log a warning when a recent save took longer than the grace period."""
        if not self._durations:
            return True
        worst = max(self._durations)
        if worst <= self.grace:
            return True
        log.warning("unickpt: %s: %s: recent saves took up to %.2fs (last %s), more than "
                    "preemption_grace_seconds=%gs: a SIGKILL at the end of the grace period "
                    "would stop the preemption save, leaving the previous checkpoint as the "
                    "resume point; make saves faster or raise the scheduler's grace period",
                    self.what, when, worst,
                    ", ".join(f"{d:.2f}s" for d in self._durations), self.grace)
        return False

    def close(self) -> None:
        self.flag.restore()
