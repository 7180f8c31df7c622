"""State tree -> files: flatten, lay out, stream arrays into a safetensors file, write manifest.

The tree is fully validated (every leaf classified, every dtype checked) before a single byte
is written, so a bad leaf deep in the tree never leaves anything behind.  Array bytes are
streamed straight from each array's memory: contiguous arrays are written without any copy;
non-contiguous or big-endian arrays are converted chunk by chunk, so the extra memory a save
needs is bounded by ``CHUNK_BYTES`` per worker thread, not by the state size.
"""

from __future__ import annotations

import functools
import math
import operator
import os
import posixpath
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from .. import __version__
from ..storage import LocalStorage, Storage, WriteHandle, can_share
from ..tree import LazyArray, Path, format_path
from . import checksum
from .dtypes import dtype_name
from .flatten import HEADER_ALIGN, Job, dtype_info, flatten, plain_data
from .gcpause import gc_paused
from .groups import HEAD_BYTES, HEAD_MIN_BYTES, Plan, Previous, confirm_file, file_names, plan_files
from .groups import read_previous as _read_previous
from .manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    ArrayEntry,
    ArrayTable,
    FileEntry,
    Manifest,
    ShardedEntry,
)

__all__ = ["DATA_FILE", "WriteStats", "flatten", "layout", "write_tree", "write_jobs",
           "plain_data", "default_workers", "Job"]

DATA_FILE = "arrays.safetensors"
CHUNK_BYTES = 16 << 20
# Arrays up to SMALL_BYTES are written in batches (one pwritev per batch of up to BATCH_BYTES
# or IOV_MAX buffers) instead of one job each: with 10,000 small leaves the per-array Python
# and syscall overhead, not the disk, is what a save would otherwise spend its time on.
SMALL_BYTES = 64 << 10
BATCH_BYTES = 4 << 20
BATCH_IOVECS = 1024


@dataclass
class WriteStats:
    """What a write produced: bytes of array data, number of arrays and seconds spent.

    ``written`` is the array bytes actually written (the rest, ``nbytes - written``, is in
    files shared with the previous checkpoint); ``files`` and ``shared_files`` count array
    files.  ``written`` defaults to ``nbytes`` (nothing shared).
    """

    nbytes: int
    narrays: int
    seconds: float
    written: int | None = None
    files: int = 1
    shared_files: int = 0

    def __post_init__(self) -> None:
        if self.written is None:
            self.written = self.nbytes


def _tensor_names(jobs: list[Job]) -> list[str]:
    """Each array's safetensors name: its tree path joined with "/", made unique with "#n"."""
    # flatten joins the path of most arrays while it walks (one concatenation per array)
    bases = [j.key or "/".join(map(str, j.path)) or "<root>" for j in jobs]
    distinct = set(bases)
    if len(distinct) == len(bases) and "__metadata__" not in distinct:
        return bases  # no clash: the loop below would keep every base name as it is
    names, used = [], {"__metadata__"}  # reserved by safetensors for the header metadata
    for base in bases:
        name, n = base, 1
        while name in used:
            n += 1
            name = f"{base}#{n}"
        used.add(name)
        names.append(name)
    return names


# json.dumps({"__metadata__": {"format": "unickpt", "unickpt_format": "2"}},
# separators=(",", ":")) without its closing brace (a literal: json is imported lazily)
_HEADER_START = f'{{"__metadata__":{{"format":"unickpt","unickpt_format":"{FORMAT_VERSION}"}}'


def _json_string(s: str) -> str:
    """``s`` as a JSON string, as json.dumps(s, ensure_ascii=False) writes it."""
    import json  # rare (names with quotes, backslashes or control characters): lazily

    return json.dumps(s, ensure_ascii=False)


# Characters json.dumps(ensure_ascii=False) escapes in a string.
_NEEDS_ESCAPE = re.compile(r'[\x00-\x1f"\\]').search


def layout(jobs: list[Job], file: str = DATA_FILE) -> tuple[bytes, int]:
    """Assign offsets and build the safetensors header.  Returns ``(header bytes, file size)``.

    Arrays are placed by decreasing alignment so every array starts at a multiple of its own
    alignment (natural alignment for zero-copy memory maps) without gaps, which safetensors
    forbids; the header is padded with spaces so the data section starts 64-byte aligned.
    Sets each job's ``name``, ``file`` and ``offset``.
    """
    # One pass per array: this loop runs once per leaf, so with 10,000 small leaves it is a
    # visible part of a save.  Nothing per array but the header fragment and three stores.
    n = len(jobs)
    names = _tensor_names(jobs)
    # By decreasing power-of-two alignment (the lowest set bit of the item size, at most 64):
    # every array's size is a multiple of its own alignment and of all that follow, so each
    # array starts naturally aligned even with odd item sizes such as U3 (12) or V3.
    aligns = [-j.info[4] for j in jobs]
    order: Any = zip(jobs, names)
    if n and min(aligns) != max(aligns):  # one alignment (the common case): already in order
        order = [(jobs[i], names[i]) for i in sorted(range(n), key=aligns.__getitem__)]
    escape = _NEEDS_ESCAPE("".join(names)) is not None  # one scan instead of one per name
    # The header is the JSON that json.dumps(..., ensure_ascii=False, separators=(",", ":"))
    # gives for {"__metadata__": ..., name: {"dtype", "shape", "data_offsets"}, ...}, built
    # with one f-string per array (a dict per array plus json.dumps costs 3x as much); the
    # rest of each fragment after the name is cached per (dtype, shape): states repeat a few
    # many times.
    parts = [_HEADER_START]
    middles: dict[tuple, str] = {}
    rel = 0
    for j, name in order:
        j.name = name
        info = j.info
        nbytes = j.nbytes
        # the header keeps the shape, or (arrays stored as raw bytes) gives the byte count
        mk = (info, j.shape) if info[2] else (info, nbytes)
        mid = middles.get(mk)
        if mid is None:
            shape = ",".join(map(str, j.shape)) if info[2] else str(nbytes)
            mid = middles[mk] = f'":{{"dtype":"{info[1]}","shape":[{shape}],"data_offsets":['
        if escape and _NEEDS_ESCAPE(name):
            name = _json_string(name)[1:-1]  # escaped, without its quotes
        parts.append(f'"{name}{mid}{rel},{rel + nbytes}]}}')
        j.offset = rel
        rel += nbytes
    raw = (",".join(parts) + "}").encode()
    pad = (-(8 + len(raw))) % HEADER_ALIGN
    raw += b" " * pad
    data_start = 8 + len(raw)
    for j in jobs:  # offsets were relative to the data section
        j.offset += data_start
        j.file = file
    return len(raw).to_bytes(8, "little") + raw, data_start + rel


def _chunks(a: np.ndarray | LazyArray, path: Path) -> Iterable[memoryview]:
    """Yield the array's bytes in C order, little-endian, in chunks of at most CHUNK_BYTES."""
    a = a.materialize(path) if isinstance(a, LazyArray) else np.asarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))  # converting copy; rare (big-endian input)
    if a.size == 0:
        return
    if a.flags.c_contiguous:
        mv = memoryview(a.reshape(-1).view(np.uint8))  # type: ignore[arg-type]  # numpy stubs
        for s in range(0, len(mv), CHUNK_BYTES):
            yield mv[s:s + CHUNK_BYTES]
        return
    # Non-contiguous: copy a block of leading-axis rows at a time.
    # (row size from the shape: reshaping a non-contiguous array would copy all of it)
    row_bytes = max(1, math.prod(a.shape[1:]) * a.dtype.itemsize)
    step = max(1, CHUNK_BYTES // row_bytes)
    for s in range(0, a.shape[0], step):
        block = np.ascontiguousarray(a[s:s + step]).reshape(-1).view(np.uint8)
        yield memoryview(block)  # type: ignore[arg-type]  # numpy stubs: ndarray is a Buffer


def _write_job(fh: WriteHandle, j: Job) -> None:
    h = checksum.hasher() if j.prehash is None else None
    # head_xxh3 for arrays over HEAD_MIN_BYTES, whatever path writes them (chunks may be short)
    head = checksum.hasher() if j.nbytes > HEAD_MIN_BYTES else None
    head_left = HEAD_BYTES
    pos = j.offset
    for mv in _chunks(j.array, j.path):
        if head is not None and head_left > 0:
            head.update(mv[:head_left])
            head_left -= min(len(mv), head_left)
        if h is not None:
            h.update(mv)
        fh.pwrite(mv, pos)
        if len(mv) >= SMALL_BYTES:
            fh.hint_written(pos, len(mv))
        pos += len(mv)
    if pos != j.offset + j.nbytes:
        raise RuntimeError(f"{format_path(j.path)}: wrote {pos - j.offset} bytes, "
                           f"expected {j.nbytes}")
    # no hasher means the sharing check already computed the full checksum
    j.xxh3 = h.intdigest() if h is not None else cast(int, j.prehash)
    if head is not None:
        j.head_xxh3 = head.intdigest()


def _small_bytes(j: Job) -> bytes:
    """A small array's bytes, C order, little-endian (one C-level copy, at most SMALL_BYTES)."""
    a = j.array.materialize(j.path) if isinstance(j.array, LazyArray) else np.asarray(j.array)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return a.tobytes()


def _write_batch(fh: WriteHandle, batch: list[Job]) -> None:
    """Write file-adjacent small arrays with one pwritev, hashing each array's bytes."""
    bufs = []
    digest = checksum.digest_function()  # the C function itself: one Python call per array
    for j in batch:
        a = j.array
        # the common leaf (a native-order ndarray) inline; anything else through _small_bytes
        b = a.tobytes() if type(a) is np.ndarray and a.dtype.byteorder != ">" else _small_bytes(j)
        if len(b) != j.nbytes:
            raise RuntimeError(f"{format_path(j.path)}: has {len(b)} bytes, expected "
                               f"{j.nbytes}")
        j.xxh3 = digest(b)
        bufs.append(b)
    start = batch[0].offset
    end = batch[-1].offset + batch[-1].nbytes
    fh.pwritev(bufs, start)
    if end - start >= SMALL_BYTES:
        fh.hint_written(start, end - start)


_get_offset, _get_nbytes = operator.attrgetter("offset"), operator.attrgetter("nbytes")


def _work_items(jobs: list[Job]) -> list[tuple[int, Callable[[WriteHandle], None]]]:
    """``(bytes, write(handle))`` per big array and per batch of file-adjacent small arrays."""
    items: list[tuple[int, Callable[[WriteHandle], None]]] = []
    batch: list[Job] = []
    size = 0

    def flush() -> None:
        nonlocal batch, size
        if batch:
            b = batch
            items.append((size, lambda fh: _write_batch(fh, b)))
        batch, size = [], 0

    end = -1  # where the batch's last array ends
    for j in sorted(jobs, key=_get_offset):
        n = j.nbytes
        if n > SMALL_BYTES:
            items.append((n, functools.partial(_write_job, j=j)))
            continue
        if batch and (size + n > BATCH_BYTES or len(batch) >= BATCH_IOVECS or
                      end != j.offset):
            flush()
        end = j.offset + n
        batch.append(j)
        size += n
    flush()
    items.sort(key=lambda it: -it[0])
    return items


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 1)))


def write_tree(directory: str, tree: Any, *, metadata: dict | None = None,
               info: dict | Callable[[WriteStats], dict] | None = None,
               kinds: dict[Path, str] | None = None, workers: int | None = None,
               prepared: tuple | None = None, storage: Storage | None = None,
               incremental: bool = False, previous: str | None = None) -> WriteStats:
    """Write ``tree`` into the (existing, empty, uncommitted) ``directory`` of ``storage``.

    Files are synced (durable); committing is the caller's job.  ``info`` may be
    a callable that receives the :class:`WriteStats` of the array data (written and synced)
    and returns the info map, so that a save can record its own size and duration.

    ``incremental`` splits the arrays into several files by a stable grouping
    (:mod:`unickpt.format.groups`; one file otherwise), and ``previous`` (a committed
    checkpoint of the same storage, normally the run's newest) then turns on sharing: array
    files whose arrays are all byte-identical to ``previous`` are shared with it
    (:func:`unickpt.storage.can_share`) instead of written.  Nothing in ``previous`` is
    ever opened for writing.
    """
    t0 = time.perf_counter()
    storage = storage or LocalStorage()
    node, jobs, sharded = prepared if prepared is not None else flatten(tree)
    nworkers = workers or default_workers()
    prev = (_read_previous(storage, previous)
            if incremental and previous is not None and can_share(storage) else None)
    if not incremental:
        plan = Plan([], [list(range(len(jobs)))])
    elif prev is None:
        with gc_paused():  # only around the CPU-bound encoding, never the (long) I/O
            plan = plan_files(jobs, None, None, None)
    else:
        from concurrent.futures import ThreadPoolExecutor  # only when sharing is possible

        with ThreadPoolExecutor(nworkers, thread_name_prefix="unickpt-hash") as ex:
            plan = plan_files(jobs, prev, lambda dt: dtype_info(dt)[0], _hash_job, ex.map)
    # a file that cannot be shared after all is written instead: the count stays the same
    names = file_names(len(plan.shared) + len(plan.new), DATA_FILE)
    files: list[FileEntry] = []
    groups = list(plan.new)
    for fe, members in plan.shared:
        name = names[len(files)]
        # plan.shared is empty unless there is a previous checkpoint
        if _share_file(storage, directory, cast(Previous, prev), fe, members, jobs, name):
            files.append(FileEntry(name, fe.size, fe.data_start, fe.header_xxh3))
        else:  # the checksums computed while planning are reused
            groups.append(sorted(i for i, _ in members))
    nshared = len(files)
    pending: list[tuple[str, bytes, int, list[Job]]] = []
    with gc_paused():
        for g, name in zip(groups, names[nshared:]):
            fjobs = [jobs[i] for i in g]
            header, size = layout(fjobs, name)
            files.append(FileEntry(name, size, len(header), checksum.digest(header)))
            pending.append((name, header, size, fjobs))
    _write_files(storage, directory, pending, nworkers)
    nbytes = sum(map(_get_nbytes, jobs))
    written = sum(sum(map(_get_nbytes, p[3])) for p in pending)

    def stats() -> WriteStats:
        return WriteStats(nbytes=nbytes, narrays=len(jobs), seconds=time.perf_counter() - t0,
                          written=written, files=len(files), shared_files=nshared)

    if callable(info):
        info = info(stats())
    with gc_paused():
        raw = _manifest_bytes(node, jobs, sharded, files, kinds, metadata, info)
    mh = storage.create(posixpath.join(directory, MANIFEST_NAME), len(raw))
    try:
        mh.pwrite(raw, 0)
        mh.sync()
    finally:
        mh.close()
    return stats()


def _hash_job(j: Job) -> int:
    """Full xxh3 of a job's bytes, remembered on the job (a later write does not rehash)."""
    if j.prehash is None:
        h = checksum.hasher()
        for mv in _chunks(j.array, j.path):
            h.update(mv)
        j.prehash = h.intdigest()
    return j.prehash


def _share_file(storage: Storage, directory: str, prev: Previous, fe: FileEntry,
                members: list[tuple[int, ArrayEntry]], jobs: list[Job], name: str) -> bool:
    """Share ``prev``'s file ``fe`` as ``name`` and point its arrays' entries at it; False
    (nothing created) when the file is not what its manifest says or the storage declines."""
    if not confirm_file(storage, prev, fe) or not storage.share(  # type: ignore[attr-defined]
            posixpath.join(prev.path, fe.name), posixpath.join(directory, name)):
        return False
    for i, e in members:
        j = jobs[i]
        # dtype, shape and size are the job's own: plan_files matched them
        j.file, j.name, j.offset, j.xxh3, j.head_xxh3 = name, e.name, e.offset, e.xxh3, \
            e.head_xxh3
    return True


# Mean bytes per array below which a save writes from the calling thread only.
THREAD_MIN_MEAN = 4096

# Files written at once (each an open descriptor until synced): bounded, so a state with
# thousands of array files never runs into the process's descriptor limit.
OPEN_FILES = 64


def _write_files(storage: Storage, directory: str,
                 pending: list[tuple[str, bytes, int, list[Job]]], nworkers: int) -> None:
    """Create, fill and sync the array files ``pending`` (name, header, size, jobs)."""
    for w in range(0, len(pending), OPEN_FILES):
        wave = pending[w:w + OPEN_FILES]
        handles: list[WriteHandle] = []
        try:
            items: list[tuple[int, Callable[[], None]]] = []
            for name, header, size, fjobs in wave:
                fh = storage.create(posixpath.join(directory, name), size)
                handles.append(fh)
                fh.pwrite(header, 0)
                with gc_paused():
                    items += [(n, functools.partial(write, fh)) for n, write in _work_items(fjobs)]
            items.sort(key=lambda it: -it[0])
            n = min(nworkers, max(1, len(items)))
            total = sum(b for b, _ in items)
            # Threads only pay off when copying and hashing bytes outweighs the Python work per
            # array, which holds the GIL: with arrays of 1 KiB, two writer threads made a save
            # of 10,000 of them about 10% slower than one (60 KiB arrays: 20-30% faster).
            if n == 1 or total < (8 << 20) or total < THREAD_MIN_MEAN * sum(
                    len(p[3]) for p in wave):
                for _, run in items:
                    run()
                for fh in handles:
                    fh.sync()
            else:
                from concurrent.futures import ThreadPoolExecutor  # big arrays only

                with ThreadPoolExecutor(n, thread_name_prefix="unickpt-write") as ex:
                    for f in [ex.submit(run) for _, run in items]:
                        f.result()
                    for f in [ex.submit(fh.sync) for fh in handles]:
                        f.result()
        finally:
            for fh in handles:
                fh.close()


def _manifest_bytes(node: Any, jobs: list[Job], sharded: list, files: list[FileEntry],
                    kinds: dict[Path, str] | None, metadata: dict | None,
                    info: dict | None) -> bytes:
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        library_version=__version__,
        tree=node,
        arrays=_array_table(jobs),
        sharded=[ShardedEntry(dtype_name(s.dtype), tuple(s.shape),
                              [(tuple(p.index), ji) for p, ji in zip(s.pieces, idx)],
                              ">" if np.dtype(s.dtype).byteorder == ">" else "<")
                 for s, idx in sharded],
        files=files,
        kinds=dict(kinds or {}),
        metadata=plain_data(metadata or {}, "metadata"),
        info=plain_data(info or {}, "info"),
    )
    return manifest.to_bytes()


def _array_table(jobs: list[Job]) -> ArrayTable:
    """The manifest entries of laid-out, written ``jobs``, as columns (one pass each)."""
    infos = list(map(_get_info, jobs))
    return ArrayTable(list(map(_get_file, jobs)), list(map(_get_name, jobs)),
                      list(map(_first, infos)), list(map(_get_shape, jobs)),
                      list(map(_get_offset, jobs)), list(map(_get_nbytes, jobs)),
                      list(map(_get_xxh3, jobs)), list(map(_fourth, infos)),
                      list(map(_get_scalar, jobs)), list(map(_get_head, jobs)))


_get_info, _get_file, _get_name, _get_shape, _get_xxh3, _get_scalar, _get_head = map(
    operator.attrgetter, ("info", "file", "name", "shape", "xxh3", "scalar", "head_xxh3"))
_first, _fourth = operator.itemgetter(0), operator.itemgetter(3)


def write_jobs(fh: WriteHandle, jobs: list[Job]) -> None:
    """Write ``jobs`` (laid out by :func:`layout`) through ``fh``, checksumming each array.

    The array-data part of :func:`write_tree`, for a writer that lays out its own file (each
    rank of a multi-process save writes one; see :mod:`unickpt.dist.save`).
    """
    for _, write in _work_items(jobs):
        write(fh)
