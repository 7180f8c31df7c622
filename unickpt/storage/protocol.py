"""The storage protocol and the naming helpers shared by every backend (see the package docs)."""

from __future__ import annotations

import contextlib
import os
import posixpath
from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

__all__ = ["Storage", "Sharing", "can_share", "WriteHandle", "ReadHandle", "WriterLock", "NotRegularFileError",
           "staged", "TEMP_PREFIX", "TRASH_PREFIX", "LOCK_NAME",
           "STALE_TEMP_SECONDS", "host_tag", "temp_name", "trash_name", "parse_temp_name",
           "is_transient_name", "ARCHIVE_PREFIX", "previous_name", "parse_previous_name"]

TEMP_PREFIX = ".unickpt-tmp."
TRASH_PREFIX = ".unickpt-trash."
LOCK_NAME = ".unickpt.lock"
# Age after which a leftover temporary entry of a process that cannot be checked (another
# host, an unparsable name) counts as stale.  One value for the manager and the CLI.
STALE_TEMP_SECONDS = 3600.0


class NotRegularFileError(OSError):
    """:meth:`Storage.open` found something that is not a regular file (a FIFO, a socket)."""


class WriteHandle(Protocol):
    """A file being written inside a staged checkpoint (from :meth:`Storage.create`).

    Methods may be called from several threads at once for disjoint byte ranges.
    """

    def pwrite(self, data: memoryview | bytes, offset: int) -> None:
        """Write all of ``data`` at ``offset`` (retrying short writes)."""

    def pwritev(self, bufs: Sequence[memoryview | bytes], offset: int) -> None:
        """Write the buffers back to back from ``offset`` (all of them)."""

    def hint_written(self, offset: int, nbytes: int) -> None:
        """A hint that ``[offset, offset+nbytes)`` is final: start persisting it.  May do
        nothing; :meth:`sync` is what guarantees durability."""

    def sync(self) -> None:
        """Durable write: when this returns, every byte written so far is on stable storage
        (or will be published with the checkpoint); I/O errors are raised here at the latest."""

    def close(self) -> None:
        """Release the handle (after :meth:`sync`, nothing is lost)."""


class ReadHandle(Protocol):
    """A committed file opened for reading (from :meth:`Storage.open`).  Thread-safe."""

    size: int

    def pread_into(self, buf: memoryview, offset: int) -> int:
        """Ranged read: fill ``buf`` from ``offset``; the count read (short only at EOF)."""

    def buffer(self) -> memoryview:
        """The whole file as a read-only buffer; local files are memory-mapped (zero copy),
        other backends may read the file into memory.  Stays valid after :meth:`close`."""

    def close(self) -> None:
        """Release the handle."""


class WriterLock(Protocol):
    """The exclusive writer lock of a run root (local: ``flock``; object stores: a lease)."""

    def acquire(self) -> None:
        """Take the lock or raise :class:`~unickpt.LockedError` naming the holder; also
        raises :class:`~unickpt.RunRootError` when the root cannot be written.  Idempotent."""

    def release(self) -> None:
        """Give the lock up (idempotent; safe to call from a finalizer)."""


@runtime_checkable
class Storage(Protocol):
    """The operations unickpt needs from a place that holds checkpoints.

    Paths are strings in the backend's own syntax, built with ``posixpath.join`` from what
    :meth:`resolve` returns.  Every method raises ``OSError`` subclasses for I/O failures
    (``FileNotFoundError`` for a missing path).
    """

    def resolve(self, path: str | os.PathLike) -> str:
        """The canonical (absolute) form of a user-given path."""

    def list_dir(self, path: str) -> list[str]:
        """Listing: the names directly inside ``path``; ``[]`` if it does not exist."""

    def is_dir(self, path: str) -> bool:
        """Whether ``path`` is a directory (a prefix with entries, for object stores)."""

    def is_file(self, path: str) -> bool:
        """Whether ``path`` is a regular file."""

    def exists(self, path: str) -> bool:
        """Whether anything (file, directory, dangling link) is at ``path``."""

    def make_dirs(self, path: str) -> None:
        """Create ``path`` and its parents (no-op if it is a directory)."""

    def make_temp_dir(self, final: str) -> str:
        """A fresh, empty staging location for the checkpoint ``final`` (see :func:`temp_name`),
        invisible to readers of ``final``."""

    def commit(self, temp: str, final: str, *, replace: bool = False) -> None:
        """Atomic publish: make the staged ``temp`` visible as ``final`` in one step, durably.
        Readers see all of it or nothing.  If ``final`` exists: raise
        :class:`~unickpt.CheckpointExistsError`, or with ``replace`` swap it atomically."""

    def create(self, path: str, size: int = 0) -> WriteHandle:
        """A new file at ``path`` (which must not exist), ``size`` bytes long (zero-filled)."""

    def open(self, path: str) -> ReadHandle:
        """Open a file for ranged reads; ``FileNotFoundError`` if missing,
        ``IsADirectoryError`` or :class:`NotRegularFileError` if it is not a regular file."""

    def read_bytes(self, path: str) -> bytes:
        """The whole (small) file."""

    def write_atomic(self, path: str, data: bytes) -> None:
        """Replace the small file ``path`` atomically and durably (the ``latest`` pointer)."""

    def remove_tree(self, path: str) -> None:
        """Delete the directory ``path`` and everything in it."""

    def remove_file(self, path: str) -> None:
        """Delete the file ``path``; no error if it is missing."""

    def move_many(self, pairs: list[tuple[str, str]]) -> None:
        """Rename each ``(src, dst)``, durably once all are done; a destination that exists
        raises :class:`~unickpt.CheckpointExistsError` (nothing is overwritten)."""

    def tree_size(self, path: str) -> int:
        """Bytes of the files directly inside ``path`` (a checkpoint is flat)."""

    def mtime(self, path: str) -> float:
        """Last modification time of ``path`` (seconds since the epoch)."""

    def lock(self, root: str) -> WriterLock:
        """The writer lock of the run root ``root`` (not yet acquired)."""


@runtime_checkable
class Sharing(Protocol):
    """The optional method of a :class:`Storage` that makes incremental saves cheap.

    A backend without it still works: every save then writes all of its bytes.
    """

    def share(self, src: str, dst: str) -> bool:
        """Make the new file ``dst`` (which must not exist; in a staged checkpoint) hold the
        same bytes as the committed file ``src``, cheaply (local: a hard link; object stores:
        a server-side copy), and return True; or create nothing and return False when the
        backend cannot (the writer then writes ``dst`` itself).  ``dst`` must stay those
        bytes whatever later happens to ``src`` (deleting it, or the checkpoint holding it)."""


def can_share(storage: object) -> bool:
    """Whether ``storage`` has the optional :meth:`Sharing.share` method."""
    return callable(getattr(storage, "share", None))


def host_tag() -> str:
    """This host as it appears in temporary directory names."""
    import socket  # only when a temporary name is made: not part of `import unickpt`

    return socket.gethostname().replace(".", "_")[:40]


def temp_name(final: str) -> str:
    """The temporary sibling name for ``final``: prefix, target name, host, pid, random."""
    parent, base = posixpath.split(final.rstrip("/"))
    return posixpath.join(parent, f"{TEMP_PREFIX}{base}.{host_tag()}.{os.getpid()}."
                                  f"{os.urandom(4).hex()}")


def trash_name(path: str) -> str:
    """The sibling name ``path`` is moved to before it is deleted."""
    parent, base = posixpath.split(path.rstrip("/"))
    return posixpath.join(parent, f"{TRASH_PREFIX}{base}.{os.urandom(4).hex()}")


# An overwrite on a filesystem without atomic exchange moves the old checkpoint aside under
# this trash sub-prefix first: a crash before the new copy is renamed into place leaves the
# previous *complete* copy there, and the next start puts it back instead of deleting it.
PREVIOUS_INFIX = "previous."
# Archiving (resume="never") moves checkpoints into ROOT/<this>run_<K> first, then renames
# that into place: a crash midway leaves a recognisable staging dir the next start rolls back.
ARCHIVE_PREFIX = ".unickpt-archive."


def previous_name(path: str) -> str:
    """The sibling name an overwritten checkpoint is moved to while its replacement lands."""
    parent, base = posixpath.split(path.rstrip("/"))
    return posixpath.join(parent, f"{TRASH_PREFIX}{PREVIOUS_INFIX}{base}."
                                  f"{os.urandom(4).hex()}")


def parse_previous_name(name: str) -> str | None:
    """The checkpoint name an overwrite moved aside as ``name``, or None."""
    head = TRASH_PREFIX + PREVIOUS_INFIX
    if not name.startswith(head):
        return None
    base, _, tag = name[len(head):].rpartition(".")
    return base or None


def parse_temp_name(name: str) -> tuple[str, str, int] | None:
    """``(target, host, pid)`` of a temporary directory name, or None if it is not one."""
    if not name.startswith(TEMP_PREFIX):
        return None
    parts = name[len(TEMP_PREFIX):].rsplit(".", 3)
    if len(parts) != 4 or not parts[2].isdigit():
        return None
    return parts[0], parts[1], int(parts[2])


def is_transient_name(name: str) -> bool:
    """Whether ``name`` is a staging or trash entry (never a checkpoint)."""
    return name.startswith((TEMP_PREFIX, TRASH_PREFIX))


@contextlib.contextmanager
def staged(storage: Storage, final: str) -> Iterator[str]:
    """Yield a fresh staging location for ``final``; remove it if the body raises."""
    tmp = storage.make_temp_dir(final)
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(OSError):
            storage.remove_tree(tmp)
        raise

