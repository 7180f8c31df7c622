"""A run root and everything done to it: scan, describe, lock, cleanup, archive, delete.

:class:`RunRoot` owns the root path, its :class:`~unickpt.storage.Storage` and its writer
lock; it looks and acts, the decisions live in :mod:`unickpt.policy` and the manager.  Every
byte goes through the storage, so the same code runs on any backend.

>>> import tempfile, numpy as np, unickpt
>>> root = tempfile.mkdtemp()
>>> with unickpt.CheckpointManager(root) as m:
...     _ = m.save(7, {"w": np.zeros(2)}, metrics={"loss": 0.5})
>>> rr = RunRoot(root)
>>> rr.scan().steps, rr.describe(7).metrics, rr.read_pointer()
((7,), {'loss': 0.5}, 'step_7')

Stale temporary directories (rule documented in docs/manager.md): a ``.unickpt-tmp.*`` entry
is removed only by a manager that holds the root's writer lock, and only when

* its name carries this host and a pid that is not a running process here, or
* it is older than ``stale_temp_seconds`` (default one hour; covers other hosts, whose pids
  cannot be checked, and names that do not parse).

A save still running in another process is therefore never touched: the lock keeps other
managers out, and a live pid (or a recent mtime) protects a plain ``unickpt.save``.
Retention trash (``.unickpt-trash.*``) is removed by the lock holder unconditionally: it is
only ever created, under the lock, by a delete in progress.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import time
from collections.abc import Iterable
from typing import Any

from ..errors import CorruptCheckpointError, RunRootError
from ..format.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, read_manifest_bytes
from ..policy.naming import LATEST_NAME, Listing, classify, format_run, format_step, parse_step
from ..storage import (
    STALE_TEMP_SECONDS,
    Storage,
    WriterLock,
    host_tag,
    parse_temp_name,
    storage_for,
    trash_name,
)
from .records import CheckpointInfo

__all__ = ["RunRoot", "scan", "read_info", "read_manifest", "write_pointer", "read_pointer",
           "temp_is_stale", "pid_alive"]

log = logging.getLogger("unickpt")


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a process on this host (a permission error means it exists)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def scan(storage: Storage, root: str) -> Listing:
    """List ``root`` and classify it; a ``step_<N>`` is committed iff its manifest exists."""
    names = storage.list_dir(root)
    committed = {n for n in names if parse_step(n) is not None
                 and storage.is_file(posixpath.join(root, n, MANIFEST_NAME))}
    return classify(names, committed)


def read_manifest(storage: Storage, path: str) -> Any:
    """The decoded manifest of checkpoint ``path`` (raises CorruptCheckpointError)."""
    raw = storage.read_bytes(posixpath.join(path, MANIFEST_NAME))
    if len(raw) > MAX_MANIFEST_BYTES:
        raise CorruptCheckpointError(f"{path}: manifest too large", path=path)
    return read_manifest_bytes(raw, path)


def read_info(storage: Storage, path: str) -> dict | None:
    """The ``info`` map of checkpoint ``path``, or None when its manifest is unreadable."""
    try:
        return read_manifest(storage, path).info
    except (OSError, CorruptCheckpointError):
        return None


def write_pointer(storage: Storage, root: str, name: str | None) -> None:
    """Point ``ROOT/latest`` at ``name`` (atomically), or remove it when ``name`` is None."""
    p = posixpath.join(root, LATEST_NAME)
    if name is None:
        storage.remove_file(p)
    else:
        storage.write_atomic(p, f"{name}\n".encode())


def read_pointer(storage: Storage, root: str) -> str | None:
    """What ``ROOT/latest`` says (informational only: the scan is the truth)."""
    try:
        return storage.read_bytes(posixpath.join(root, LATEST_NAME)).decode().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def temp_is_stale(name: str, age: float, *, threshold: float = STALE_TEMP_SECONDS,
                  host: str | None = None, alive=pid_alive) -> bool:
    """The stale rule for a temporary entry (the caller holds the writer lock)."""
    if age >= threshold:
        return True
    parsed = parse_temp_name(name)
    if parsed is None:
        return False
    _target, thost, pid = parsed
    return thost == (host or host_tag()) and pid != os.getpid() and not alive(pid)


class RunRoot:
    """One run root on one storage: ``ROOT/step_<N>``, ``ROOT/run_<K>/``, ``ROOT/latest``.

    Looking (:meth:`scan`, :meth:`describe`, :meth:`checkpoints`, :meth:`latest`,
    :meth:`read_info`, :meth:`read_pointer`) needs no lock and changes nothing.  Acting
    (:meth:`clean_leftovers`, :meth:`archive`, :meth:`delete`, :meth:`write_pointer`) is
    for the holder of the writer lock (:meth:`open`).
    """

    def __init__(self, root: str | os.PathLike, storage: Storage | None = None):
        self.storage: Storage = storage or storage_for(root)
        self.path = self.storage.resolve(root)
        self._lock: WriterLock = self.storage.lock(self.path)

    def __repr__(self) -> str:
        return f"RunRoot({self.path!r})"

    def step_path(self, step: int) -> str:
        """Where checkpoint ``step`` lives (committed or not)."""
        return posixpath.join(self.path, format_step(step))

    # ---------------------------------------------------------------- looking
    def exists(self) -> bool:
        return self.storage.is_dir(self.path)

    def scan(self) -> Listing:
        """Classify every entry of the root (committed steps, temps, trash, runs, others)."""
        return scan(self.storage, self.path)

    def read_info(self, step: int) -> dict | None:
        """The manifest ``info`` of ``step``, or None when it cannot be read."""
        return read_info(self.storage, self.step_path(step))

    def read_pointer(self) -> str | None:
        return read_pointer(self.storage, self.path)

    def describe(self, step: int) -> CheckpointInfo:
        """Step, path, time (from the manifest, else the mtime), size and metrics of ``step``."""
        path = self.step_path(step)
        info = read_info(self.storage, path) or {}
        try:
            size = self.storage.tree_size(path)
            mtime = self.storage.mtime(path)
        except OSError:  # deleted meanwhile (retention of a running writer)
            size, mtime = 0, 0.0
        t = info.get("time")
        return CheckpointInfo(step, path, float(t) if isinstance(t, (int, float)) else mtime,
                              size, dict(info.get("metrics") or {}))

    def checkpoints(self) -> list[CheckpointInfo]:
        """The committed checkpoints, oldest first."""
        return [self.describe(s) for s in self.scan().steps] if self.exists() else []

    def latest(self) -> CheckpointInfo | None:
        """The newest committed checkpoint, or None."""
        newest = self.scan().newest if self.exists() else None
        return None if newest is None else self.describe(newest)

    # ---------------------------------------------------------------- acting
    def open(self) -> None:
        """Create the root if needed and take its writer lock (idempotent)."""
        root = self.path
        if self.storage.exists(root) and not self.storage.is_dir(root):
            raise RunRootError(f"run root {root} exists and is not a directory; point the "
                               "manager at a directory")
        try:
            self.storage.make_dirs(root)
        except OSError as e:
            raise RunRootError(f"cannot create run root {root}: {e.strerror or e}; choose a "
                               "writable location") from e
        self._lock.acquire()

    def release(self) -> None:
        """Give the writer lock up (idempotent)."""
        self._lock.release()

    def write_pointer(self, name: str | None) -> None:
        write_pointer(self.storage, self.path, name)

    def clean_leftovers(self, listing: Listing, *,
                        threshold: float = STALE_TEMP_SECONDS) -> list[str]:
        """Remove stale temps and retention trash (lock held); return the removed names."""
        removed = []
        now = time.time()
        for name in listing.temps:
            p = posixpath.join(self.path, name)
            try:
                age = now - self.storage.mtime(p)
            except OSError:
                continue
            if temp_is_stale(name, age, threshold=threshold):
                try:
                    if self.storage.is_dir(p):
                        self.storage.remove_tree(p)
                    else:
                        self.storage.remove_file(p)
                except OSError as e:  # best effort; a leftover is never read anyway
                    log.warning("unickpt: could not remove stale %s: %s", p, e)
                    continue
                removed.append(name)
        for name in listing.trash:
            with contextlib.suppress(OSError):
                self.storage.remove_tree(posixpath.join(self.path, name))
                removed.append(name)
        if removed:
            log.info("unickpt: removed %d leftovers of interrupted saves in %s", len(removed),
                     self.path)
        return removed

    def archive(self, steps: Iterable[int], run: int) -> str:
        """Move ``steps`` into ``ROOT/run_<run>/`` (durably); return that directory."""
        dest = posixpath.join(self.path, format_run(run))
        self.storage.make_dirs(dest)
        self.storage.move_many([(self.step_path(s), posixpath.join(dest, format_step(s)))
                                for s in steps])
        return dest

    def delete(self, steps: Iterable[int]) -> None:
        """Delete checkpoints: first renamed out of the ``step_N`` namespace (one durable
        batch), then removed.  A crash mid-delete leaves trash no reader looks at (removed at
        the next start), never a ``step_N`` with half its files."""
        pairs = [(self.step_path(s), trash_name(self.step_path(s))) for s in steps]
        self.storage.move_many(pairs)
        for _, trash in pairs:
            try:
                self.storage.remove_tree(trash)
            except OSError as e:
                log.warning("unickpt: could not remove %s: %s (removed at the next start)",
                            trash, e)
