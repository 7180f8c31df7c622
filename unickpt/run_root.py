"""I/O on a run root: scanning, the writer lock, stale temp cleanup, the ``latest`` pointer.

The decisions live in :mod:`unickpt.policy`; this module only looks and acts, always through
a :class:`~unickpt.storage.Storage` (the lock is a local-filesystem ``flock``).

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
import errno
import fcntl
import logging
import os
import socket
import time
from typing import Any

from .errors import CorruptCheckpointError, LockedError, RunRootError
from .format.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, read_manifest_bytes
from .policy.naming import LATEST_NAME, LOCK_NAME, Listing, classify, parse_step
from .storage import Storage, parse_temp_name

__all__ = ["scan", "RootLock", "clean_leftovers", "read_info", "read_manifest", "write_pointer", "temp_is_stale",
           "read_pointer", "host_tag", "pid_alive"]

log = logging.getLogger("unickpt")


def host_tag() -> str:
    """This host as it appears in temporary directory names."""
    return socket.gethostname().replace(".", "_")[:40]


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
                 and storage.is_file(os.path.join(root, n, MANIFEST_NAME))}
    return classify(names, committed)


def read_manifest(storage: Storage, path: str) -> Any:
    """The decoded manifest of checkpoint ``path`` (raises CorruptCheckpointError)."""
    raw = storage.read_bytes(os.path.join(path, MANIFEST_NAME))
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
    p = os.path.join(root, LATEST_NAME)
    if name is None:
        storage.remove_file(p)
    else:
        storage.write_atomic(p, f"{name}\n".encode())


def read_pointer(storage: Storage, root: str) -> str | None:
    """What ``ROOT/latest`` says (informational only: the scan is the truth)."""
    try:
        return storage.read_bytes(os.path.join(root, LATEST_NAME)).decode().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


class RootLock:
    """The exclusive writer lock of a run root: ``flock`` on ``ROOT/.unickpt.lock``.

    The holder writes its pid and host into the file so that a refused manager can say who
    holds it.  ``flock`` locks belong to an open file, so two managers in one process
    exclude each other too; the lock dies with its process (no stale locks after SIGKILL).
    ``flock`` is local: on network filesystems that do not support it, run one writer per
    root by other means.
    """

    def __init__(self, root: str):
        self.root = root
        self.path = os.path.join(root, LOCK_NAME)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunRootError(f"cannot create the lock file {self.path}: {e.strerror}; the run "
                               "root must be writable") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = ""
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 512, 0).decode(errors="replace").strip()
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunRootError(f"cannot lock {self.path}: {e.strerror}") from e
            raise LockedError(
                f"run root {self.root} is locked by another CheckpointManager "
                f"({holder or 'holder unknown'}); two writers in one root would corrupt its "
                "history. Stop the other job, or give this one another root") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()} since="
                      f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def temp_is_stale(name: str, age: float, *, threshold: float, host: str | None = None,
                  alive=pid_alive) -> bool:
    """The stale rule for a temporary entry (the caller holds the writer lock)."""
    if age >= threshold:
        return True
    parsed = parse_temp_name(name)
    if parsed is None:
        return False
    _target, thost, pid = parsed
    return thost == (host or host_tag()) and pid != os.getpid() and not alive(pid)


def clean_leftovers(storage: Storage, root: str, listing: Listing, *,
                    threshold: float) -> list[str]:
    """Remove stale temps and retention trash (lock held); return the removed names."""
    removed = []
    now = time.time()
    for name in listing.temps:
        p = os.path.join(root, name)
        try:
            age = now - storage.mtime(p)
        except OSError:
            continue
        if temp_is_stale(name, age, threshold=threshold):
            try:
                if storage.is_dir(p):
                    storage.remove_tree(p)
                else:
                    storage.remove_file(p)
            except OSError as e:  # cleanup is best effort; a leftover is never read anyway
                log.warning("unickpt: could not remove stale %s: %s", p, e)
                continue
            removed.append(name)
    for name in listing.trash:
        with contextlib.suppress(OSError):
            storage.remove_tree(os.path.join(root, name))
            removed.append(name)
    if removed:
        log.info("unickpt: removed %d leftovers of interrupted saves in %s", len(removed), root)
    return removed
