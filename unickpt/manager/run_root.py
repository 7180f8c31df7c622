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

from ..errors import CheckpointExistsError, CorruptCheckpointError, RunRootError
from ..format.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, read_manifest_bytes
from ..policy.naming import LATEST_NAME, Listing, classify, format_run, format_step, parse_step
from ..process import pid_alive
from ..storage import (
    ARCHIVE_PREFIX,
    STALE_TEMP_SECONDS,
    Storage,
    WriterLock,
    host_tag,
    parse_previous_name,
    parse_temp_name,
    storage_for,
    trash_name,
)
from .records import CheckpointInfo

__all__ = ["RunRoot", "scan", "read_info", "valid_info", "read_manifest", "write_pointer", "read_pointer",
           "temp_is_stale"]

log = logging.getLogger("unickpt")

# ``step_<N>.damaged-<time>``: a damaged checkpoint set aside (never a step, never deleted)
DAMAGED_INFIX = ".damaged-"


def scan(storage: Storage, root: str) -> Listing:
    """List ``root`` and classify it; a ``step_<N>`` is committed iff its manifest exists."""
    names = storage.list_dir(root)
    committed = {n for n in names if parse_step(n) is not None
                 and storage.is_file(posixpath.join(root, n, MANIFEST_NAME))}
    return classify(names, committed)


def read_manifest(storage: Storage, path: str) -> Any:
    """The decoded manifest of checkpoint ``path`` (raises CorruptCheckpointError).

    The size is checked before anything is read: a huge (or sparse) manifest costs no memory.
    """
    f = storage.open(posixpath.join(path, MANIFEST_NAME))
    try:
        if f.size > MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(
                f"{path}: manifest is {f.size} bytes (limit {MAX_MANIFEST_BYTES}); it is "
                "damaged: resume from another checkpoint", path=path)
        buf = bytearray(f.size)
        raw = bytes(buf[:f.pread_into(memoryview(buf), 0)])
    finally:
        f.close()
    return read_manifest_bytes(raw, path)


def valid_info(info: Any) -> dict | None:
    """``info`` if the manager can use it (a map whose ``metrics`` is a map of str to
    numbers), else None: the format leaves ``info`` free, so a hostile or foreign one must
    read as "damaged manifest" rather than raise deep inside a lookup."""
    if not isinstance(info, dict):
        return None
    metrics = info.get("metrics")
    if metrics is None:
        return info
    if not isinstance(metrics, dict) or not all(
            isinstance(k, str) and not isinstance(v, bool) and isinstance(v, (int, float))
            for k, v in metrics.items()):
        return None
    return info


def read_info(storage: Storage, path: str) -> dict | None:
    """The ``info`` map of checkpoint ``path``, or None when its manifest is unreadable
    (or its ``info`` unusable, see :func:`valid_info`)."""
    try:
        return valid_info(read_manifest(storage, path).info)
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
        """The newest committed checkpoint whose manifest reads, or None: the one
        ``resume="auto"`` would pick (a damaged newer one is skipped, as auto-resume does)."""
        steps = list(self.scan().steps) if self.exists() else []
        for step in reversed(steps):
            if self.read_info(step) is not None:
                return self.describe(step)
        return None

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

    def _committed(self, path: str) -> bool:
        return self.storage.is_file(posixpath.join(path, MANIFEST_NAME))

    def _restorable_previous(self, name: str) -> str | None:
        """The checkpoint path an interrupted overwrite left only in trash entry ``name``
        (its previous complete copy, with no committed copy in place), or None."""
        base = parse_previous_name(name)
        if base is None or not self._committed(posixpath.join(self.path, name)):
            return None
        target = posixpath.join(self.path, base)
        return None if self._committed(target) else target

    def recover(self, listing: Listing) -> bool:
        """Undo interrupted multi-step operations (lock held); True if the root changed.

        * An overwrite killed between its two renames (filesystems without atomic exchange)
          left the previous complete copy as ``.unickpt-trash.previous.<name>.*`` and nothing
          at ``<name>``: it is renamed back (the new copy, never published, is a stale temp).
        * An archive killed midway left ``.unickpt-archive.run_<K>``: its checkpoints are moved
          back into the root and the staging directory removed, so the next start plans the
          archive again from scratch (all of the old run in one ``run_<K>``).
        """
        changed = False
        for name in listing.trash:
            target = self._restorable_previous(name)
            if target is None:
                continue
            if self.storage.exists(target):  # something uncommitted there: leave both alone
                log.warning("unickpt: %s holds the previous copy of %s, which is in the way "
                            "(uncommitted); move one of them yourself",
                            posixpath.join(self.path, name), target)
                continue
            self.storage.move_many([(posixpath.join(self.path, name), target)])
            log.warning("unickpt: an overwrite of %s was interrupted; its previous copy was "
                        "put back", target)
            changed = True
        for name in listing.other:
            if name.startswith(ARCHIVE_PREFIX):
                changed |= self._roll_back_archive(posixpath.join(self.path, name))
        return changed

    def _roll_back_archive(self, staging: str) -> bool:
        """Move the staged checkpoints back into the root; or, when ``run_<K>`` exists (the
        archive was killed in its last move, which object stores do one checkpoint at a
        time), on into ``run_<K>``.  On object stores a move is a copy then a delete, so a
        checkpoint may be in both places, or half in one: the committed copy wins, the other
        (partial, or a duplicate) is deleted."""
        dest = posixpath.join(self.path, posixpath.basename(staging)[len(ARCHIVE_PREFIX):])
        into = dest if self.storage.exists(dest) else self.path
        back = []
        for n in self.storage.list_dir(staging):
            if parse_step(n) is None:
                continue
            src, dst = posixpath.join(staging, n), posixpath.join(into, n)
            if self._committed(dst):
                self.storage.remove_tree(src)
            elif self._committed(src):
                if self.storage.exists(dst):
                    self.storage.remove_tree(dst)
                back.append((src, dst))
        if back:
            self.storage.move_many(back)
        if self.storage.list_dir(staging):
            log.warning("unickpt: the interrupted archive %s could not be rolled back fully "
                        "(names in the way); move its entries yourself", staging)
        else:
            self.storage.remove_tree(staging)
        log.warning("unickpt: an archive of %s was interrupted; %d checkpoints were moved back",
                    self.path, len(back))
        return True

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
            if self._restorable_previous(name) is not None:
                continue  # the only complete copy of a checkpoint: never deleted
            with contextlib.suppress(OSError):
                self.storage.remove_tree(posixpath.join(self.path, name))
                removed.append(name)
        if removed:
            log.info("unickpt: removed %d leftovers of interrupted saves in %s", len(removed),
                     self.path)
        return removed

    def archive(self, steps: Iterable[int], run: int) -> str:
        """Move ``steps`` into ``ROOT/run_<run>/`` (durably); return that directory.

        All or nothing: the pointer is removed first (it never names a moved step), the
        checkpoints go into ``ROOT/.unickpt-archive.run_<run>``, which is then renamed to
        ``run_<run>`` in one step; a crash midway is rolled back by :meth:`recover`.
        """
        dest = posixpath.join(self.path, format_run(run))
        staging = posixpath.join(self.path, ARCHIVE_PREFIX + format_run(run))
        if self.storage.exists(dest):
            raise CheckpointExistsError(f"cannot archive into {dest}: the destination exists; "
                                        "move or delete it first")
        self.write_pointer(None)
        self.storage.make_dirs(staging)
        try:
            self.storage.move_many([(self.step_path(s),
                                     posixpath.join(staging, format_step(s))) for s in steps])
            self.storage.move_many([(staging, dest)])
        except OSError:
            with contextlib.suppress(OSError):
                self._roll_back_archive(staging)
            raise
        return dest

    def set_aside_damaged(self, step: int) -> str | None:
        """Move ``step_<N>`` aside to ``step_<N>.damaged-<UTC time>`` if its manifest exists
        but cannot be read (a damaged checkpoint in the way of a save); return the new path,
        or None (nothing done) when it is not such a checkpoint.  Never deletes anything."""
        path = self.step_path(step)
        if not self.storage.is_file(posixpath.join(path, MANIFEST_NAME)):
            return None
        if self.read_info(step) is not None:
            return None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = f"{path}{DAMAGED_INFIX}{stamp}"
        n = 0
        while self.storage.exists(aside):  # two damaged copies within one second
            n += 1
            aside = f"{path}{DAMAGED_INFIX}{stamp}.{n}"
        self.storage.move_many([(path, aside)])
        log.warning("unickpt: %s has a damaged manifest; moved it to %s", path, aside)
        return aside

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
