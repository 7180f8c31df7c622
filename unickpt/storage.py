"""Where bytes live: the local filesystem, with atomic directory commits.

A checkpoint is written into a temporary directory *inside the destination's parent* (so the
final rename stays on one filesystem, where rename is atomic), fsynced, renamed into place,
and the parent fsynced so the rename itself is durable.  Temporary directories carry a
recognisable prefix plus the writer's host and pid, so leftovers of a crashed save can be told
apart from a save still running.

The :class:`Storage` protocol is the seam for other backends (object stores later).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from typing import Protocol

from .errors import CheckpointExistsError, UnickptError

TEMP_PREFIX = ".unickpt-tmp."
TRASH_PREFIX = ".unickpt-trash."
_RENAME_EXCHANGE = 2


class Storage(Protocol):
    """The few operations the manager needs from a place that holds checkpoints."""

    def list_dir(self, path: str) -> list[str]: ...
    def make_temp_dir(self, final: str) -> str: ...
    def commit(self, temp: str, final: str, *, replace: bool = False) -> None: ...
    def remove_tree(self, path: str) -> None: ...
    def move(self, src: str, dst: str) -> None: ...
    def move_many(self, pairs: list[tuple[str, str]]) -> None: ...
    def is_dir(self, path: str) -> bool: ...
    def is_file(self, path: str) -> bool: ...
    def read_bytes(self, path: str) -> bytes: ...
    def write_atomic(self, path: str, data: bytes) -> None: ...
    def tree_size(self, path: str) -> int: ...
    def mtime(self, path: str) -> float: ...
    def make_dirs(self, path: str) -> None: ...
    def remove_file(self, path: str) -> None: ...


def fsync_dir(path: str) -> None:
    """Make a directory's entries (created/renamed files) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(final: str) -> str:
    """The temporary sibling name for ``final``: prefix, target name, host, pid, random."""
    host = socket.gethostname().replace(".", "_")[:40]
    return os.path.join(os.path.dirname(os.path.abspath(final)),
                        f"{TEMP_PREFIX}{os.path.basename(final)}.{host}.{os.getpid()}."
                        f"{uuid.uuid4().hex[:8]}")


def parse_temp_name(name: str) -> tuple[str, str, int] | None:
    """``(target, host, pid)`` of a temporary directory name, or None if it is not one."""
    if not name.startswith(TEMP_PREFIX):
        return None
    parts = name[len(TEMP_PREFIX):].rsplit(".", 3)
    if len(parts) != 4 or not parts[2].isdigit():
        return None
    return parts[0], parts[1], int(parts[2])


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL / ENOSYS / EOPNOTSUPP: filesystem lacks exchange
        return False
    raise OSError(err, os.strerror(err), a)


class LocalStorage:
    """The local (POSIX) filesystem."""

    def list_dir(self, path: str) -> list[str]:
        try:
            return os.listdir(path)
        except FileNotFoundError:
            return []

    def make_temp_dir(self, final: str) -> str:
        parent = os.path.dirname(os.path.abspath(final))
        os.makedirs(parent, exist_ok=True)
        tmp = temp_name(final)
        os.mkdir(tmp)
        return tmp

    def commit(self, temp: str, final: str, *, replace: bool = False) -> None:
        """Rename ``temp`` to ``final`` atomically; with ``replace``, swap out what is there."""
        fsync_dir(temp)
        parent = os.path.dirname(os.path.abspath(final))
        if os.path.lexists(final):
            if not replace:
                raise CheckpointExistsError(
                    f"{final} already exists; pass overwrite=True to replace it atomically")
            # Swap new and old in one step when the filesystem can; otherwise move the old one
            # aside first (a crash in between leaves it recoverable under a .unickpt-trash name).
            if _exchange(temp, final):
                fsync_dir(parent)
                shutil.rmtree(temp, ignore_errors=True)
                return
            trash = os.path.join(parent, f"{TRASH_PREFIX}{os.path.basename(final)}."
                                 f"{uuid.uuid4().hex[:8]}")
            os.rename(final, trash)
            os.rename(temp, final)
            fsync_dir(parent)
            shutil.rmtree(trash, ignore_errors=True)
            return
        # os.rename would silently replace an empty directory that appeared meanwhile; the
        # existence check above plus the run-root lock held by the manager rule that out.
        os.rename(temp, final)
        fsync_dir(parent)

    def remove_tree(self, path: str) -> None:
        shutil.rmtree(path)

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(path)

    def is_file(self, path: str) -> bool:
        return os.path.isfile(path)

    def read_bytes(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def write_atomic(self, path: str, data: bytes) -> None:
        """Replace the small file ``path`` atomically (temp file, fsync, rename, fsync dir)."""
        tmp = temp_name(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(os.path.abspath(path)))

    def tree_size(self, path: str) -> int:
        """Bytes of the regular files directly inside ``path`` (a checkpoint is flat)."""
        total = 0
        with os.scandir(path) as it:
            for e in it:
                if e.is_file(follow_symlinks=False):
                    total += e.stat(follow_symlinks=False).st_size
        return total

    def mtime(self, path: str) -> float:
        return os.lstat(path).st_mtime

    def make_dirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def remove_file(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def move_many(self, pairs: list[tuple[str, str]]) -> None:
        """Rename each ``(src, dst)`` (same filesystem), then make all renames durable with
        one fsync per directory involved (instead of two per rename)."""
        dirs: set[str] = set()
        for src, dst in pairs:
            if os.path.lexists(dst):
                raise UnickptError(f"cannot move {src} to {dst}: destination exists")
            os.rename(src, dst)
            dirs.add(os.path.dirname(os.path.abspath(dst)))
            dirs.add(os.path.dirname(os.path.abspath(src)))
        for d in sorted(dirs):
            fsync_dir(d)

    def move(self, src: str, dst: str) -> None:
        if os.path.lexists(dst):
            raise UnickptError(f"cannot move {src} to {dst}: destination exists")
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        os.rename(src, dst)
        fsync_dir(os.path.dirname(os.path.abspath(dst)))
        fsync_dir(os.path.dirname(os.path.abspath(src)))


@contextlib.contextmanager
def staged(storage: Storage, final: str) -> Iterator[str]:
    """Yield a fresh temporary directory for ``final``; remove it if the body raises."""
    tmp = storage.make_temp_dir(final)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
