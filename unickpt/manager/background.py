"""The background writer of async saves: one save in flight, errors kept for the next call.

``CheckpointManager(async_save=True).save()`` takes a host snapshot of the state (a copy of
every array: as much host memory as the state's size) and hands the write + commit to a
:class:`BackgroundSaver`.  A second ``save()`` first waits for the previous one to finish,
so at most one snapshot besides the live state exists at any time.

At interpreter exit pending saves are flushed.  The flush runs from ``threading``'s exit
hooks, registered after ``concurrent.futures``' own (hooks run in reverse order), so it
completes before thread pools stop accepting work; a save that fails then is reported with
a ``RuntimeWarning`` (the checkpoint is not committed).
"""

from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401  (its exit hook must be registered before ours)
import threading
import warnings
import weakref
from collections.abc import Callable

from ..errors import BackgroundSaveError

__all__ = ["BackgroundSaver"]

_live: weakref.WeakSet[BackgroundSaver] = weakref.WeakSet()


class BackgroundSaver:
    """Runs one job at a time in a (non-daemon) thread; remembers its failure.

    >>> b = BackgroundSaver("demo")
    >>> b.submit(lambda: None); b.wait()
    """

    def __init__(self, what: str):
        self.what = what
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._label = ""
        _live.add(self)

    def submit(self, job: Callable[[], None], label: str = "") -> None:
        """Start ``job`` after the previous one finished (raising its error, if any)."""
        self.wait()
        self._label = label
        t = threading.Thread(target=self._run, args=(job,), name=f"unickpt-save {label}")
        self._thread = t
        t.start()

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as e:  # kept for the caller's next save()/wait()/close()
            self._error = e

    def poll(self) -> None:
        """Raise the error of a finished job (without waiting for a running one)."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()

    def wait(self) -> None:
        """Wait for the job in flight; raise :class:`BackgroundSaveError` if it failed."""
        t = self._thread
        if t is not None:
            t.join()
            self._thread = None
        if self._error is not None:
            e, self._error = self._error, None
            if getattr(e, "committed", ""):  # failed after the publish: say so, not "lost"
                raise BackgroundSaveError(
                    f"background save {self._label} into {self.what}: {e}") from e
            raise BackgroundSaveError(
                f"background save {self._label} into {self.what} failed: {e!r}; that "
                "checkpoint was not committed (earlier checkpoints are intact)") from e


def _flush_all() -> None:
    for saver in list(_live):
        try:
            saver.wait()
        except BackgroundSaveError as e:
            warnings.warn(f"unickpt: at exit, {e}", RuntimeWarning, stacklevel=1)


_register = getattr(threading, "_register_atexit", None)
try:
    if _register is None:
        raise RuntimeError
    _register(_flush_all)
except RuntimeError:  # no threading exit hooks (other Pythons), or already shutting down
    atexit.register(_flush_all)
