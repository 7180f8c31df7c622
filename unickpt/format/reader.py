"""Files -> state tree.  Everything read from disk is validated before it is trusted.

Arrays are either memory-mapped (zero copy, read-only) or read straight into a freshly
allocated array of the final dtype and shape (one copy, checksummed as it is read).
"""

from __future__ import annotations

import os
import posixpath
import threading
from collections.abc import Callable
from typing import Any, cast

import numpy as np

from ..errors import CheckpointNotFoundError, CorruptCheckpointError
from ..storage import (
    NotRegularFileError,
    ReadHandle,
    Storage,
    is_transient_name,
    storage_for,
)
from ..tree import Path, Piece, ShardedArray, format_path
from . import batches, checksum
from .dtypes import dtype_from_name
from .gcpause import gc_paused
from .manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    ArrayEntry,
    ArrayTable,
    DecodeContext,
    FileEntry,
    Manifest,
    decode_node,
    read_manifest_bytes,
)

READ_CHUNK = 64 << 20
# Arrays up to SMALL_READ bytes that lie back to back in a file are read with one preadv per
# batch (up to BATCH_READ bytes) and returned as views of that batch's buffer: with 10,000
# small leaves one syscall and one allocation per array would dominate a restore.
SMALL_READ = 64 << 10
BATCH_READ = 4 << 20


class _Ref(int):
    """Placeholder for array ``int(ref)`` in the decoded tree skeleton.

    An int subclass: made by C code, without a Python ``__init__`` call, which shows with
    10^4 arrays per checkpoint.
    """

    __slots__ = ()

    @property
    def i(self) -> int:
        return int(self)


class _ShardedRef(_Ref):
    """Placeholder for sharded entry ``i``."""

    __slots__ = ()


def _array_ref(i: int, _p: Path) -> _Ref:
    return _Ref(i)


def _sharded_ref(i: int, _p: Path) -> _ShardedRef:
    return _ShardedRef(i)


def _as_table(arrays: Any) -> ArrayTable:
    return arrays if isinstance(arrays, ArrayTable) else ArrayTable.from_entries(list(arrays))


def _array_paths(skeleton: Any, manifest: Manifest) -> dict[int, Path]:
    """Array entry number -> tree path, in the order the manifest's tree was decoded."""
    paths: dict[int, Path] = {}
    stack: list[tuple[Any, Path]] = [(skeleton, ())]
    while stack:  # depth first, children in order (pushed reversed): the decode's order
        x, path = stack.pop()
        t = type(x)
        if t is dict:
            stack.extend(reversed([(v, (*path, k)) for k, v in x.items()]))
        elif t is list or t is tuple:
            stack.extend(reversed([(v, (*path, i)) for i, v in enumerate(x)]))
        elif t is _Ref:
            paths.setdefault(int(x), path)
        elif t is _ShardedRef:
            for k, (_, a) in enumerate(manifest.sharded[x].pieces):
                paths.setdefault(a, (*path, f"<piece {k}>"))
    return paths


def is_committed(path: str | os.PathLike, storage: Storage | None = None) -> bool:
    """Whether ``path`` is a committed checkpoint directory (cheap: no manifest decoding)."""
    p = os.fspath(path).rstrip("/")
    return (not is_transient_name(posixpath.basename(p))
            and (storage or storage_for(p)).is_file(posixpath.join(p, MANIFEST_NAME)))


class CheckpointReader:
    """Open one committed checkpoint: validated manifest, lazily opened data files.

    >>> import tempfile, unickpt
    >>> d = tempfile.mkdtemp()
    >>> _ = unickpt.save(d + "/ck", {"w": np.arange(3.0)})
    >>> CheckpointReader(d + "/ck").tree()["w"].tolist()
    [0.0, 1.0, 2.0]
    """

    def __init__(self, path: str | os.PathLike, storage: Storage | None = None):
        self.path = os.fspath(path)
        self.storage: Storage = storage or storage_for(self.path)
        if not self.storage.is_dir(self.path):
            raise CheckpointNotFoundError(f"no checkpoint at {self.path}: not a directory")
        if is_transient_name(posixpath.basename(self.path.rstrip("/"))):
            raise CheckpointNotFoundError(
                f"{self.path} is an uncommitted (temporary) checkpoint directory left by an "
                "interrupted save; it is not a checkpoint and will be cleaned up")
        mpath = posixpath.join(self.path, MANIFEST_NAME)
        try:
            f = self.storage.open(mpath)
            try:
                size = f.size
                if size > MAX_MANIFEST_BYTES:
                    raise CorruptCheckpointError(
                        f"{self.path}: manifest is {size} bytes (limit {MAX_MANIFEST_BYTES})",
                        path=self.path)
                buf = bytearray(size)
                raw = bytes(buf[:f.pread_into(memoryview(buf), 0)])
            finally:
                f.close()
        except NotRegularFileError:
            raise CheckpointNotFoundError(
                f"no checkpoint at {self.path}: {MANIFEST_NAME} is not a regular file") from None
        except FileNotFoundError:
            raise CheckpointNotFoundError(
                f"no checkpoint at {self.path}: {MANIFEST_NAME} is missing (not a unickpt "
                "checkpoint, or an uncommitted one)") from None
        except IsADirectoryError:
            raise CheckpointNotFoundError(
                f"no checkpoint at {self.path}: {MANIFEST_NAME} is a directory, not a file "
                "(not a unickpt checkpoint)") from None
        with gc_paused():
            self.manifest: Manifest = read_manifest_bytes(raw, self.path)
            self._files: dict[str, tuple[ReadHandle, memoryview | None]] = {}
            self._lock = threading.Lock()
            self._warned_unverified = False
            #: array file -> why it is damaged as a whole (filled by :meth:`verify_all`)
            self.file_damage: dict[str, str] = {}
            self._paths: dict[int, Path] | None = None
            # The first (validating) decode keeps the tree with placeholders where arrays go,
            # so that tree() only substitutes them instead of decoding the manifest again.
            self._skeleton = decode_node(
                self.manifest.tree,
                DecodeContext(self.manifest, self.path, _array_ref, _sharded_ref, _Ref))
            #: the array entries as columns (what the batched reads work on)
            self.arrays: ArrayTable = _as_table(self.manifest.arrays)
            # entries stored big-endian or as numpy scalars: finished after their read
            self._special = {i for i, (bo, sc) in enumerate(
                zip(self.arrays.byteorder, self.arrays.scalar)) if bo == ">" or sc} \
                if ">" in self.arrays.byteorder or True in self.arrays.scalar else set()
            self._dtype_of: dict[str, np.dtype] | None = None
            self._align_of: dict[str, int] = {}

    @property
    def array_paths(self) -> dict[int, Path]:
        """Array entry number -> its tree path (the first, if the tree refers to it twice).

        Found on first use by walking the skeleton (no data is read): only errors, listings
        and incremental saves need the paths, and a plain load makes none.
        """
        if self._paths is None:
            self._paths = _array_paths(self._skeleton, self.manifest)
        return self._paths

    # ---------------------------------------------------------------- files
    def _file(self, name: str) -> tuple[ReadHandle, memoryview | None]:
        with self._lock:
            if name in self._files:
                return self._files[name]
            fe = next(f for f in self.manifest.files if f.name == name)
            fpath = posixpath.join(self.path, name)
            try:
                fd = self.storage.open(fpath)
            except FileNotFoundError:
                if not self.storage.exists(posixpath.join(self.path, MANIFEST_NAME)):
                    # the manifest went too: the checkpoint was deleted after we opened it
                    raise CheckpointNotFoundError(
                        f"{self.path} was removed while it was being read (deleted by the "
                        "retention of the job writing this run?); read a newer checkpoint, "
                        "or keep this one (keep_last/keep_every) to read it") from None
                raise CorruptCheckpointError(
                    f"{self.path}: array file {name!r} is missing; restore from another "
                    "checkpoint", path=self.path, leaves=self._leaves_in(name)) from None
            except (IsADirectoryError, NotRegularFileError):
                raise CorruptCheckpointError(
                    f"{self.path}: array file {name!r} is not a regular file", path=self.path,
                    leaves=self._leaves_in(name)) from None
            actual = fd.size
            if actual != fe.size:
                fd.close()
                raise CorruptCheckpointError(
                    f"{self.path}: array file {name!r} is {actual} bytes, the manifest says "
                    f"{fe.size} (truncated or replaced); restore from another checkpoint",
                    path=self.path, leaves=self._leaves_in(name))
            head = bytearray(8)
            got = fd.pread_into(memoryview(head), 0)
            if got != 8 or int.from_bytes(head, "little") + 8 != fe.data_start:
                fd.close()
                raise CorruptCheckpointError(
                    f"{self.path}: array file {name!r} has a damaged safetensors header",
                    path=self.path, leaves=self._leaves_in(name))
            self._check_header(fe, fd)
            # The whole-file buffer (an mmap locally; a full download on object stores) is
            # taken only when asked for (mmap=True, verify): plain loads use ranged reads.
            self._files[name] = (fd, None)
            return fd, None

    def _mapped(self, name: str) -> memoryview | None:
        """The whole array file as a buffer (opened, checked and cached on first use)."""
        fd, mm = self._file(name)
        if mm is None and fd.size:
            with self._lock:
                fd, mm = self._files[name]
                if mm is None:
                    mm = fd.buffer()
                    self._files[name] = (fd, mm)
        return mm

    def _check_header(self, fe: FileEntry, fd: ReadHandle) -> None:
        """Format v2 on: the safetensors header must hash to the manifest's ``header_xxh3``.

        Checked whenever a file is opened, with or without ``verify`` (it is a few KiB): a
        changed shape or offset in the header would mislead safetensors tooling silently.
        """
        if fe.header_xxh3 is None or not checksum.available():
            return
        head = bytearray(fe.data_start)  # a ranged read: a few KiB on any backend
        if fd.pread_into(memoryview(head), 0) != fe.data_start or \
                checksum.digest(head) != fe.header_xxh3:
            fd.close()
            raise CorruptCheckpointError(
                f"{self.path}: array file {fe.name!r} has a damaged safetensors header "
                "(checksum mismatch); restore from another checkpoint", path=self.path,
                leaves=self._leaves_in(fe.name))

    def _leaves_in(self, name: str) -> list[str]:
        return [self._leaf_name(i) for i, a in enumerate(self.manifest.arrays) if a.file == name]

    def close(self) -> None:
        """Close file descriptors (memory-mapped arrays stay valid)."""
        with self._lock:
            for fd, _mm in self._files.values():
                fd.close()
            self._files.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- arrays
    def _leaf_name(self, i: int) -> str:
        return format_path(self.array_paths.get(i, (f"<array {i}>",)))

    def _corrupt(self, i: int, what: str) -> CorruptCheckpointError:
        name = self._leaf_name(i)
        return CorruptCheckpointError(
            f"{self.path}: leaf {name}: {what}; the checkpoint is damaged, restore from an "
            "earlier one (or run `unickpt verify` for a full report)", path=self.path,
            leaves=[name])

    def _can_verify(self, verify: bool) -> bool:
        """``verify``, unless xxhash is missing: then warn (once per reader) and read anyway."""
        if verify and not checksum.available():
            if not self._warned_unverified:
                self._warned_unverified = True
                checksum.warn_unverified(self.path)
            return False
        return verify

    def read_array(self, i: int, *, mmap: bool = False, verify: bool = True) -> np.ndarray:
        """Return array ``i`` of the manifest, as the dtype it was saved with."""
        verify = self._can_verify(verify)
        e: ArrayEntry = self.manifest.arrays[i]
        dt = dtype_from_name(e.dtype)
        fd, _ = self._file(e.file)
        if mmap:
            # None only for an empty file, and then e.nbytes == 0 (the manifest was checked)
            mm = cast(memoryview, self._mapped(e.file))
            if e.nbytes == 0:
                a = np.empty(e.shape, dt)
            else:
                a = np.frombuffer(mm, dtype=dt, count=e.nbytes // dt.itemsize,
                                  offset=e.offset).reshape(e.shape)
            if verify and checksum.digest(memoryview(mm)[e.offset:e.offset + e.nbytes]
                                                   if e.nbytes else b"") != e.xxh3:
                raise self._corrupt(i, "checksum mismatch")
        else:
            a = np.empty(e.shape, dt)
            buf = (memoryview(a.reshape(-1).view(np.uint8))  # type: ignore[arg-type]  # numpy stubs
                   if e.nbytes else memoryview(b""))
            h = checksum.hasher() if verify else None
            pos = 0
            while pos < e.nbytes:
                n = fd.pread_into(buf[pos:pos + READ_CHUNK], e.offset + pos)
                if n <= 0:
                    raise self._corrupt(i, "unexpected end of file")
                if h is not None:  # h is not None exactly when verify
                    h.update(buf[pos:pos + n])
                pos += n
            if h is not None and h.intdigest() != e.xxh3:
                raise self._corrupt(i, "checksum mismatch")
        if e.byteorder == ">":
            a = a.astype(dt.newbyteorder(">"))
        return a[()] if e.scalar else a

    def verify_all(self, progress: Callable[[int], None] | None = None) -> list[str]:
        """Check every array; returns the names of bad leaves (empty when all is well).

        Each array is checked on its own, also in an array file that is damaged as a whole
        (truncated, padded, a damaged safetensors header): the ones whose bytes are all there
        and match their checksum are intact and not reported, so the count is exact.  The
        damage of a file as a whole is recorded in :attr:`file_damage` (file name -> why
        ``load`` refuses it): a checkpoint verifies only when both are empty.
        """
        checksum.require(f"verifying {self.path}")
        bad: list[str] = []
        damaged: dict[str, Any] = {}  # file name -> its bytes as found (None: unreadable)
        self.file_damage = {}
        for i, e in enumerate(self.manifest.arrays):
            if e.file in damaged:
                data = damaged[e.file]
            else:
                try:
                    data = self._mapped(e.file)
                except CorruptCheckpointError as err:
                    if not err.leaves:
                        raise
                    why = str(err).removeprefix(f"{self.path}: ")
                    self.file_damage[e.file] = why.removesuffix(
                        "; restore from another checkpoint")
                    data = damaged[e.file] = self._map_as_found(e.file)
            if data is None or e.offset + e.nbytes > len(data):
                ok = e.nbytes == 0 and data is not None
            else:
                got = checksum.hasher()
                for s in range(0, e.nbytes, READ_CHUNK):
                    got.update(memoryview(data)[e.offset + s:e.offset + min(e.nbytes, s + READ_CHUNK)])
                ok = got.intdigest() == e.xxh3
            if not ok:
                bad.append(self._leaf_name(i))
            if progress is not None:
                progress(e.nbytes)
        return bad

    def _map_as_found(self, name: str) -> memoryview | None:
        """A damaged array file's bytes as they are (None if missing, empty or special)."""
        try:
            fd = self.storage.open(posixpath.join(self.path, name))
        except OSError:
            return None
        try:
            return fd.buffer() if fd.size else None
        finally:
            fd.close()

    # ---------------------------------------------------------------- tree
    def map_tree(self, array: Callable[[int, Path], Any],
                 sharded: Callable[[int, Path], Any]) -> Any:
        """The tree with ``array(i, path)`` / ``sharded(i, path)`` where its arrays go.

        Walks the skeleton validated when the reader opened (the manifest is not decoded
        again), so it is what ``inspect`` and ``unickpt ls`` use to list leaves.

        >>> import tempfile, unickpt
        >>> d = tempfile.mkdtemp()
        >>> _ = unickpt.save(d + "/ck", {"w": np.arange(3.0), "n": 1})
        >>> CheckpointReader(d + "/ck").map_tree(lambda i, p: ("array", i, p), None)
        {'w': ('array', 0, ('w',)), 'n': 1}
        """
        def walk(x: Any, path: Path) -> Any:
            t = type(x)
            if t is dict:
                return {k: walk(v, (*path, k)) for k, v in x.items()}
            if t is list or t is tuple:
                out = [walk(v, (*path, i)) for i, v in enumerate(x)]
                return out if t is list else tuple(out)
            if t is _Ref:
                return array(int(x), path)
            if t is _ShardedRef:
                return sharded(int(x), path)
            return x

        try:
            with gc_paused():
                return walk(self._skeleton, ())
        finally:
            walk = cast(Any, None)  # noqa: F841  (a recursive closure is a reference cycle: break it)


    def tree(self, *, mmap: bool = False, verify: bool | None = None,
             assemble: bool = True, workers: int = 4) -> Any:
        """Decode the whole tree.  Sharded arrays are assembled unless ``assemble=False``."""
        verify = self._can_verify((not mmap) if verify is None else verify)
        return self._tree(mmap, verify, assemble, workers)

    def _read_batch(self, batch: list[int], verify: bool, mmap: bool = False
                    ) -> list[np.ndarray]:
        """Read file-adjacent small arrays with one preadv; each result views the buffer
        (with ``mmap``, views of the mapped file: nothing is read until used).

        Column by column: the checksums, the arrays and their alignment are computed by
        ``map`` over the batch (no Python-level loop per array), so 10^4 small arrays cost
        about what their bytes cost.
        """
        t = self.arrays
        fd, _mm = self._file(t.file[batch[0]])
        offs = list(map(t.offset.__getitem__, batch))
        sizes = list(map(t.nbytes.__getitem__, batch))
        start = offs[0]
        if mmap:  # the manifest was checked: the batch lies inside the file
            buf = np.frombuffer(cast(memoryview, self._mapped(t.file[batch[0]])), np.uint8,
                                offs[-1] + sizes[-1] - start, start)
        else:
            buf = self._pread(fd, batch[0], start, offs[-1] + sizes[-1] - start)
        los = [o - start for o in offs]
        names = list(map(t.dtype.__getitem__, batch))
        dts = list(map(self._dtypes().__getitem__, names))
        shapes = list(map(t.shape.__getitem__, batch))
        runs = batches.runs(names, shapes)
        if verify:
            got = batches.digests(buf, los, sizes, runs)
            if got != list(map(t.xxh3.__getitem__, batch)):
                k = next(k for k, (g, i) in enumerate(zip(got, batch)) if g != t.xxh3[i])
                raise self._corrupt(batch[k], "checksum mismatch")
        out = batches.views(buf, los, sizes, dts, shapes, runs)
        # numpy's buffer is 16-byte aligned; an array after an odd-itemsize one (e.g. S3)
        # may not be: such arrays get an own, aligned copy
        base, align = buf.ctypes.data, list(map(self._align_of.__getitem__, names))
        if len(batch) > 64:  # vectorised; a short batch (between big arrays) in Python
            bad = np.flatnonzero((base + np.array(los, np.int64)) % np.array(align)).tolist()
        else:
            bad = [k for k, (lo, al) in enumerate(zip(los, align)) if (base + lo) % al]
        for k in bad:
            if not mmap:  # a view of the map stays a view, as read_array(mmap=True) gives it
                out[k] = out[k].copy()
        if self._special:
            for k, i in enumerate(batch):
                if i in self._special:
                    out[k] = self._finish(i, out[k])
        return out

    def _pread(self, fd: ReadHandle, first: int, start: int, size: int) -> np.ndarray:
        """``size`` bytes at ``start`` of ``fd`` (array ``first`` is named if they are not)."""
        buf = np.empty(size, np.uint8)
        mv = memoryview(buf)  # type: ignore[arg-type]  # numpy stubs: ndarray is a Buffer
        pos = 0
        while pos < size:
            n = fd.pread_into(mv[pos:], start + pos)
            if n <= 0:
                raise self._corrupt(first, "unexpected end of file")
            pos += n
        return buf

    def _dtypes(self) -> dict[str, np.dtype]:
        """Manifest dtype name -> numpy dtype, for the names this checkpoint uses."""
        if self._dtype_of is None:
            self._dtype_of = {d: dtype_from_name(d) for d in set(self.arrays.dtype)}
            self._align_of = {d: dt.alignment for d, dt in self._dtype_of.items()}
        return self._dtype_of

    def _finish(self, i: int, a: np.ndarray) -> Any:
        """A read array as it was saved: big-endian again, or a numpy scalar."""
        t = self.arrays
        if t.byteorder[i] == ">":
            a = a.astype(a.dtype.newbyteorder(">"))
        return a[()] if t.scalar[i] else a

    def _small_batches(self, small: list[int]) -> list[list[int]]:
        """Group small arrays that lie back to back in one file (no gap) into batches of up
        to BATCH_READ bytes, in file and offset order."""
        return batches.plan(self.arrays, small, BATCH_READ)

    def _tree(self, mmap: bool, verify: bool, assemble: bool, workers: int) -> Any:
        n = len(self.arrays)
        arrays: list[Any] = [None] * n
        nb = np.array(self.arrays.nbytes, np.int64)
        big = np.flatnonzero(nb >= (1 << 20)).tolist()
        # up to SMALL_READ bytes (any size below 1 MiB with mmap): batched reads (views);
        # empty arrays: own (empty) memory
        is_tiny = (nb > 0) & (nb < (1 << 20) if mmap else nb <= SMALL_READ)
        tiny = np.flatnonzero(is_tiny).tolist()
        small = np.flatnonzero(~is_tiny & (nb < (1 << 20))).tolist()
        with gc_paused():  # many small objects; the big reads below run with gc on
            for i in small:
                arrays[i] = self.read_array(i, mmap=mmap, verify=verify)
            for batch in (batches.plan(self.arrays, tiny, 1 << 62) if mmap else
                          self._small_batches(tiny)):
                for i, a in zip(batch, self._read_batch(batch, verify, mmap)):
                    arrays[i] = a
        if len(big) > 1 and workers > 1 and not mmap:
            from concurrent.futures import ThreadPoolExecutor  # big arrays only

            with ThreadPoolExecutor(workers, thread_name_prefix="unickpt-read") as ex:
                for i, a in zip(big, ex.map(lambda j: self.read_array(j, verify=verify), big)):
                    arrays[i] = a
        else:
            for i in big:
                arrays[i] = self.read_array(i, mmap=mmap, verify=verify)

        # Each sharded entry is built once, however many times the tree refers to it (with
        # pieces never sharing an array, load() returns at most the bytes stored).
        built: dict[int, Any] = {}

        def shard(i: int, _p: Path) -> Any:
            if i in built:
                return built[i]
            s = self.manifest.sharded[i]
            dt = dtype_from_name(s.dtype)
            sa = ShardedArray(s.shape, dt.newbyteorder(">") if s.byteorder == ">" else dt,
                              [Piece(idx, arrays[a]) for idx, a in s.pieces])
            built[i] = out = sa.assemble() if assemble else sa
            return out

        def fill(x: Any) -> Any:
            t = type(x)
            if t is dict:  # array children inline: one call less per array
                return {k: arrays[v] if type(v) is _Ref else fill(v) for k, v in x.items()}
            if t is list:
                return [fill(v) for v in x]
            if t is tuple:
                return tuple([fill(v) for v in x])
            if t is _Ref:
                return arrays[x]
            if t is _ShardedRef:
                return shard(int(x), ())
            return x  # immutable scalars (None, bool, int, float, str, bytes)

        try:
            with gc_paused():
                return fill(self._skeleton)
        finally:
            # fill refers to itself through its closure cell: clear it, so that this reader
            # and its entries are freed by reference counting, not by a later gc walk
            fill = shard = cast(Any, None)  # noqa: F841
