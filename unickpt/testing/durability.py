"""Check that a storage backend makes what it commits survive a power loss.

A SIGKILL cannot see a missing ``fsync`` (the page cache survives the process); only a power
loss can.  So instead of crashing, :class:`SyscallRecorder` records the file-system calls a
piece of code makes (``os.open``/``open``, writes, ``os.fsync``, ``os.rename``/``os.replace``,
the Linux ``renameat2`` exchange through ``ctypes``, ``os.mkdir`` (and so ``os.makedirs``),
``os.unlink``, ``os.rmdir``, ``shutil.rmtree``) under one directory, and
:class:`DurabilityModel` replays them with the POSIX rules for what a power loss keeps:

* a file's bytes are durable once the file was fsynced after its last write;
* a name (created, renamed in or out, removed) is durable once its parent directory was fsynced
  after that change;
* a path is durable when its name, its bytes and every ancestor's name (up to the recorded
  directory, which is assumed durable) are.

Two checks follow: :meth:`SyscallRecorder.rename_violations` (every rename must move a subtree
whose bytes and entries are already durable: the data files and the temporary directory are
fsynced *before* the commit rename) and :meth:`SyscallRecorder.assert_durable` /
:meth:`SyscallRecorder.assert_durably_absent` (after the operation, the committed path, or
its removal, survives; this needs the parent fsynced *after* the rename).

>>> import os, tempfile
>>> d = tempfile.mkdtemp()
>>> with SyscallRecorder(d) as rec:
...     with open(os.path.join(d, "f"), "wb") as f:
...         _ = f.write(b"x")
>>> rec.durability_problems(os.path.join(d, "f"))
['f: bytes written but not fsynced', 'f: name not durable (parent not fsynced after the change)']
"""

from __future__ import annotations

import builtins
import ctypes
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Event", "DurabilityModel", "SyscallRecorder", "DurabilityError"]


class DurabilityError(AssertionError):
    """A recorded operation would lose or tear data on a power loss."""


@dataclass(frozen=True)
class Event:
    """One recorded call: ``op`` is create_file, create_dir, write, fsync, rename, exchange,
    remove (file, directory or tree); paths are absolute, parents resolved."""

    op: str
    path: str
    path2: str | None = None


def _norm(p: Any) -> str:
    p = os.fspath(p)
    if isinstance(p, bytes):
        p = os.fsdecode(p)
    a = os.path.abspath(p)
    return os.path.join(os.path.realpath(os.path.dirname(a)), os.path.basename(a))


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip(os.sep) + os.sep)


@dataclass
class DurabilityModel:
    """Which bytes and names a power loss would keep, after replaying :class:`Event` s."""

    top: str
    dirty_files: set[str] = field(default_factory=set)
    pending: dict[str, set[str]] = field(default_factory=dict)  # dir -> changed, unsynced names
    dirs: set[str] = field(default_factory=set)
    files: set[str] = field(default_factory=set)

    def _changed(self, path: str) -> None:
        self.pending.setdefault(os.path.dirname(path), set()).add(os.path.basename(path))

    def _take(self, src: str) -> tuple[set, set, set, dict]:
        def pick(s: set[str]) -> set[str]:
            out = {p for p in s if _under(p, src)}
            s -= out
            return out
        pend = {d: self.pending.pop(d) for d in [d for d in self.pending if _under(d, src)]}
        return pick(self.files), pick(self.dirs), pick(self.dirty_files), pend

    def _put(self, taken: tuple[set, set, set, dict], src: str, dst: str) -> None:
        def mv(p: str) -> str:
            return dst + p[len(src):]
        files, dirs, dirty, pend = taken
        self.files |= {mv(p) for p in files}
        self.dirs |= {mv(p) for p in dirs}
        self.dirty_files |= {mv(p) for p in dirty}
        for d, names in pend.items():
            self.pending[mv(d)] = names

    def apply(self, e: Event) -> None:
        if e.op == "create_file":
            self.files.add(e.path)
            self.dirty_files.add(e.path)
            self._changed(e.path)
        elif e.op == "create_dir":
            self.dirs.add(e.path)
            self._changed(e.path)
        elif e.op == "write":
            self.dirty_files.add(e.path)
        elif e.op == "fsync":
            self.dirty_files.discard(e.path)
            self.pending.pop(e.path, None)
        elif e.op == "rename":
            assert e.path2 is not None
            taken = self._take(e.path)
            self._take(e.path2)  # replaced
            self._put(taken, e.path, e.path2)
            if not taken[0] and not taken[1]:  # a pre-existing (durable) entry moved
                (self.dirs if os.path.isdir(e.path2) else self.files).add(e.path2)
            self._changed(e.path)
            self._changed(e.path2)
        elif e.op == "exchange":
            assert e.path2 is not None
            a, b = self._take(e.path), self._take(e.path2)
            self._put(a, e.path, e.path2)
            self._put(b, e.path2, e.path)
            self._changed(e.path)
            self._changed(e.path2)
        elif e.op == "remove":
            self._take(e.path)
            self._changed(e.path)

    def name_durable(self, path: str) -> bool:
        return os.path.basename(path) not in self.pending.get(os.path.dirname(path), ())

    def problems(self, path: str, *, tree: bool = True, name: bool = True) -> list[str]:
        """Why ``path`` (and, with ``tree``, everything under it; with ``name``, its own name
        and its ancestors') would not survive a power loss now; empty when it would."""
        out: list[str] = []

        def rel(p: str) -> str:
            return os.path.relpath(p, self.top)
        below = sorted(p for p in self.files | self.dirs if _under(p, path)) if tree else [path]
        for p in below:
            if p in self.dirty_files:
                out.append(f"{rel(p)}: bytes written but not fsynced")
            if p != path and not self.name_durable(p):
                out.append(f"{rel(p)}: name not durable (parent not fsynced after the change)")
        p = path
        while name and _under(p, self.top) and p != self.top:
            if not self.name_durable(p):
                what = "name" if p == path else f"ancestor {rel(p)}"
                out.append(f"{rel(path)}: {what} not durable (parent not fsynced after the "
                           "change)")
            p = os.path.dirname(p)
        return out


class SyscallRecorder:
    """Record file-system calls under ``top`` (a context manager; patches ``os``, ``shutil``,
    ``builtins.open`` and ``ctypes.CDLL`` while active, thread-safe).

    ``events`` lists what happened; :meth:`model_at` replays a prefix; ``on_event`` (if given)
    is called with each event and the recorder, e.g. to snapshot state at a chosen call.
    """

    def __init__(self, top: str | os.PathLike, *,
                 on_event: Callable[[Event, SyscallRecorder], None] | None = None) -> None:
        self.top = os.path.realpath(os.fspath(top))
        self.events: list[Event] = []
        self.on_event = on_event
        self._lock = threading.RLock()
        self._saved: list[tuple[Any, str, Any]] = []
        self._depth = threading.local()

    # ------------------------------------------------------------------ recording
    def _add(self, op: str, path: Any, path2: Any = None) -> None:
        p = _norm(path)
        p2 = _norm(path2) if path2 is not None else None
        if not (_under(p, self.top) or (p2 is not None and _under(p2, self.top))):
            return
        e = Event(op, p, p2)
        with self._lock:
            self.events.append(e)
        if self.on_event is not None:
            self.on_event(e, self)

    def _fd_path(self, fd: int) -> str | None:
        try:
            return os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return None

    def _nested(self) -> bool:
        return getattr(self._depth, "n", 0) > 0

    def _patch(self, obj: Any, name: str, wrapper: Callable[[Any], Any]) -> None:
        orig = getattr(obj, name)
        self._saved.append((obj, name, orig))
        setattr(obj, name, wrapper(orig))

    def _wrap_os_open(self, orig: Any) -> Any:
        rec = self

        def f(path: Any, flags: int, *a: Any, **k: Any) -> int:
            existed = os.path.lexists(path) if k.get("dir_fd") is None else True
            fd = orig(path, flags, *a, **k)
            if flags & os.O_CREAT and not existed:
                rec._add("create_file", path)
            elif flags & os.O_TRUNC:
                rec._add("write", path)
            return fd
        return f

    def _wrap_b_open(self, orig: Any) -> Any:
        rec = self

        def f(file: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
            if isinstance(file, int) or not any(c in mode for c in "wxa+"):
                return orig(file, mode, *a, **k)
            existed = os.path.lexists(file)
            fobj = orig(file, mode, *a, **k)
            rec._add("write" if existed else "create_file", file)
            return fobj
        return f

    def _wrap_fd_write(self, orig: Any) -> Any:
        rec = self

        def f(fd: int, *a: Any, **k: Any) -> Any:
            out = orig(fd, *a, **k)
            p = rec._fd_path(fd)
            if p is not None and os.path.isfile(p):
                rec._add("write", p)
            return out
        return f

    def _wrap_fsync(self, orig: Any) -> Any:
        rec = self

        def f(fd: Any) -> None:
            fd = fd if isinstance(fd, int) else fd.fileno()
            orig(fd)
            p = rec._fd_path(fd)
            if p is not None:
                rec._add("fsync", p)
        return f

    def _wrap_rename(self, orig: Any) -> Any:
        rec = self

        def f(src: Any, dst: Any, *a: Any, **k: Any) -> None:
            orig(src, dst, *a, **k)
            rec._add("rename", src, dst)
        return f

    def _wrap_mkdir(self, orig: Any) -> Any:
        rec = self

        def f(path: Any, *a: Any, **k: Any) -> None:
            orig(path, *a, **k)
            rec._add("create_dir", path)
        return f

    def _wrap_remove(self, orig: Any) -> Any:
        rec = self

        def f(path: Any, *a: Any, **k: Any) -> None:
            if k.get("dir_fd") is not None or rec._nested():
                return orig(path, *a, **k)  # inside rmtree: recorded as one removal
            orig(path, *a, **k)
            rec._add("remove", path)
        return f

    def _wrap_rmtree(self, orig: Any) -> Any:
        rec = self

        def f(path: Any, *a: Any, **k: Any) -> None:
            rec._depth.n = getattr(rec._depth, "n", 0) + 1
            try:
                orig(path, *a, **k)
            finally:
                rec._depth.n -= 1
            if not os.path.lexists(path):
                rec._add("remove", path)
        return f

    def _wrap_cdll(self, orig: Any) -> Any:
        rec = self

        def f(*a: Any, **k: Any) -> Any:
            return _LibcProxy(orig(*a, **k), rec)
        return f

    def __enter__(self) -> SyscallRecorder:
        self._patch(os, "open", self._wrap_os_open)
        self._patch(builtins, "open", self._wrap_b_open)
        for name in ("write", "pwrite", "ftruncate", "writev", "pwritev"):
            if hasattr(os, name):
                self._patch(os, name, self._wrap_fd_write)
        self._patch(os, "fsync", self._wrap_fsync)
        if hasattr(os, "fdatasync"):
            self._patch(os, "fdatasync", self._wrap_fsync)
        self._patch(os, "rename", self._wrap_rename)
        self._patch(os, "replace", self._wrap_rename)
        self._patch(os, "mkdir", self._wrap_mkdir)
        for name in ("unlink", "remove", "rmdir"):
            self._patch(os, name, self._wrap_remove)
        self._patch(shutil, "rmtree", self._wrap_rmtree)
        self._patch(ctypes, "CDLL", self._wrap_cdll)
        return self

    def __exit__(self, *exc: Any) -> None:
        for obj, name, orig in reversed(self._saved):
            setattr(obj, name, orig)
        self._saved.clear()

    # ------------------------------------------------------------------ checks
    def model_at(self, n: int | None = None) -> DurabilityModel:
        """The durability state after the first ``n`` events (all by default)."""
        m = DurabilityModel(self.top)
        for e in self.events[:n]:
            m.apply(e)
        return m

    def durability_problems(self, path: str | os.PathLike, *, tree: bool = True) -> list[str]:
        return self.model_at().problems(_norm(path), tree=tree)

    def assert_durable(self, path: str | os.PathLike, *, tree: bool = True) -> None:
        """Raise :class:`DurabilityError` unless ``path`` would survive a power loss now."""
        probs = self.durability_problems(path, tree=tree)
        if probs:
            raise DurabilityError(f"{os.fspath(path)} is not durable: " + "; ".join(probs)
                                  + "\n" + self.trace())

    def assert_durably_absent(self, path: str | os.PathLike) -> None:
        """Raise unless ``path`` is gone and its removal survives a power loss."""
        p = _norm(path)
        if os.path.lexists(p) or not self.model_at().name_durable(p):
            raise DurabilityError(f"{p}: removal not durable (parent not fsynced after it)\n"
                                  + self.trace())

    def rename_violations(self) -> list[str]:
        """Renames that moved bytes or entries not yet durable (fsync must come first)."""
        out: list[str] = []
        m = DurabilityModel(self.top)
        for i, e in enumerate(self.events):
            if e.op in ("rename", "exchange"):
                srcs = [e.path] if e.op == "rename" else [e.path, e.path2 or ""]
                for s in srcs:
                    probs = m.problems(s, name=False)
                    if probs:
                        out.append(f"event {i} {e.op} {s} -> {e.path2}: " + "; ".join(probs))
            m.apply(e)
        return out

    def assert_renames_durable(self) -> None:
        v = self.rename_violations()
        if v:
            raise DurabilityError("renamed before fsync:\n" + "\n".join(v) + "\n" + self.trace())

    def index(self, op: str, path: str | os.PathLike | None = None,
              path2: str | os.PathLike | None = None) -> int:
        """Index of the first event with ``op`` (and paths, if given); ValueError if none."""
        p = _norm(path) if path is not None else None
        p2 = _norm(path2) if path2 is not None else None
        for i, e in enumerate(self.events):
            if e.op == op and p in (None, e.path) and p2 in (None, e.path2):
                return i
        raise ValueError(f"no {op} event for {path} -> {path2}")

    def trace(self) -> str:
        def rel(p: str | None) -> str:
            return "" if p is None else os.path.relpath(p, self.top)
        return "\n".join(f"  {i:3d} {e.op:11s} {rel(e.path)} {rel(e.path2)}"
                         for i, e in enumerate(self.events))


class _LibcProxy:
    """Wraps a ``ctypes.CDLL`` so a ``renameat2`` call is recorded (as a rename or, with
    RENAME_EXCHANGE, an exchange); everything else passes through."""

    def __init__(self, lib: Any, rec: SyscallRecorder) -> None:
        self._lib, self._rec = lib, rec

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._lib, name)
        if name != "renameat2":
            return fn
        rec = self._rec

        def renameat2(dfd1: int, a: bytes, dfd2: int, b: bytes, flags: int) -> int:
            rc = fn(dfd1, a, dfd2, b, flags)
            if rc == 0:
                rec._add("exchange" if flags & 2 else "rename", os.fsdecode(a), os.fsdecode(b))
            return rc
        return renameat2
