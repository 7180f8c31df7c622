"""State tree -> files: flatten, lay out, stream arrays into a safetensors file, write manifest.

The tree is fully validated (every leaf classified, every dtype checked) before a single byte
is written, so a bad leaf deep in the tree never leaves anything behind.  Array bytes are
streamed straight from each array's memory: contiguous arrays are written without any copy;
non-contiguous or big-endian arrays are converted chunk by chunk, so the extra memory a save
needs is bounded by ``CHUNK_BYTES`` per worker thread, not by the state size.
"""

from __future__ import annotations

import functools
import json
import math
import os
import posixpath
import re
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import __version__
from ..errors import UnsupportedLeafError
from ..storage import LocalStorage, Storage, WriteHandle
from ..tree import LazyArray, Path, ShardedArray, format_path
from . import checksum
from .dtypes import UnsupportedDtype, dtype_name, safetensors_code
from .gcpause import gc_paused
from .manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    MAX_DEPTH,
    ArrayEntry,
    FileEntry,
    Manifest,
    ShardedEntry,
    check_int_range,
    encode_big_int,
)

DATA_FILE = "arrays.safetensors"
CHUNK_BYTES = 16 << 20
HEADER_ALIGN = 64
# Arrays up to SMALL_BYTES are written in batches (one pwritev per batch of up to BATCH_BYTES
# or IOV_MAX buffers) instead of one job each: with 10,000 small leaves the per-array Python
# and syscall overhead, not the disk, is what a save would otherwise spend its time on.
SMALL_BYTES = 64 << 10
BATCH_BYTES = 4 << 20
BATCH_IOVECS = 1024



@dataclass
class _Job:
    path: Path
    array: Any  # np.ndarray, or a zero-arg callable returning one (lazy host copy)
    dtype: np.dtype
    shape: tuple[int, ...]
    scalar: bool
    entry: ArrayEntry | None = None


@dataclass
class WriteStats:
    """What a write produced: bytes of array data, number of arrays and seconds spent."""

    nbytes: int
    narrays: int
    seconds: float


def flatten(tree: Any) -> tuple[Any, list[_Job], list]:
    """Encode the structure of ``tree`` and collect its arrays, validating every leaf.

    Returns ``(node, jobs, sharded)`` where ``sharded`` holds ``(ShardedArray, [job idx])``.
    """
    with gc_paused():
        return _flatten(tree)


def _flatten(tree: Any) -> tuple[Any, list[_Job], list]:
    jobs: list[_Job] = []
    sharded: list[tuple[ShardedArray, list[int]]] = []
    seen: set[int] = set()

    def add_array(arr: Any, path: Path, scalar: bool = False) -> int:
        a = arr
        dt = a.dtype
        try:
            _dtype_info(dt)
        except UnsupportedDtype as e:
            raise UnsupportedLeafError(f"cannot save {format_path(path)}: {e}") from None
        jobs.append(_Job(path, a, dt, tuple(map(int, a.shape)), scalar))
        return len(jobs) - 1

    def enc(x: Any, path: Path) -> Any:
        if type(x) is np.ndarray:  # the common leaf first: saves ~1 us per array
            return ["a", add_array(x, path)]
        # numpy scalars first: np.float64 / np.str_ / np.bytes_ subclass float / str / bytes,
        # and must come back as the numpy type they are.
        if isinstance(x, np.generic):
            return ["a", add_array(np.asarray(x), path, scalar=True)]
        if x is None or isinstance(x, (bool, bytes)):
            return x
        if isinstance(x, str):
            _check_utf8(x, path)
            return x
        if isinstance(x, int):
            if check_int_range(x):
                return x
            try:
                return encode_big_int(x)
            except ValueError as e:
                raise UnsupportedLeafError(f"cannot save {format_path(path)}: {e}") from None
        if isinstance(x, float):
            return x
        if isinstance(x, np.ndarray):
            return ["a", add_array(x, path)]
        if isinstance(x, LazyArray):
            return ["a", add_array(x, path)]
        if isinstance(x, ShardedArray):
            idx = [add_array(p.data if isinstance(p.data, LazyArray) else np.asarray(p.data),
                             (*path, f"<piece {i}>")) for i, p in enumerate(x.pieces)]
            sharded.append((x, idx))
            return ["s", len(sharded) - 1]
        if isinstance(x, (dict, list, tuple)):
            if len(path) >= MAX_DEPTH:
                raise UnsupportedLeafError(f"cannot save {format_path(path[:8])}/...: the tree "
                                           f"is nested deeper than {MAX_DEPTH} levels")
            if id(x) in seen:
                raise UnsupportedLeafError(f"cannot save {format_path(path)}: the tree "
                                           "contains a reference cycle")
            seen.add(id(x))
            try:
                if isinstance(x, dict):
                    flat: list = []
                    for k, v in x.items():
                        if isinstance(k, bool) or not isinstance(k, (str, int)) or (
                                isinstance(k, int) and not check_int_range(k)):
                            raise UnsupportedLeafError(
                                f"cannot save {format_path(path)}: dict key {k!r} of type "
                                f"{type(k).__name__} (keys must be str or 64-bit int)")
                        if isinstance(k, str):
                            _check_utf8(k, path)
                        flat.append(k)
                        flat.append(enc(v, (*path, k)))
                    return ["d", flat]
                if type(x) not in (list, tuple):
                    raise UnsupportedLeafError(
                        f"cannot save {format_path(path)}: {type(x).__name__} is a "
                        f"{'tuple' if isinstance(x, tuple) else 'list'} subclass; no adapter "
                        "claims it (convert it to a plain tuple/dict, or register an adapter)")
                return ["l" if isinstance(x, list) else "t",
                        [enc(v, (*path, i)) for i, v in enumerate(x)]]
            finally:
                seen.discard(id(x))
        raise UnsupportedLeafError(
            f"cannot save {format_path(path)}: value of type {type(x).__module__}."
            f"{type(x).__qualname__} is not a state-tree leaf and no adapter claims it. "
            "Use numpy arrays / Python scalars, give the object state_dict()/load_state_dict(), "
            "or install the adapter for its framework")

    return enc(tree, ()), jobs, sharded


def _check_utf8(s: str, path: Path) -> None:
    """Strings are stored as UTF-8: refuse lone surrogates before anything is written."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsupportedLeafError(
            f"cannot save {format_path(path)}: string {s[:40]!r} is not valid Unicode (lone "
            "surrogate); store it as bytes") from None


def _tensor_names(jobs: list[_Job]) -> list[str]:
    names, used = [], {"__metadata__"}  # reserved by safetensors for the header metadata
    for j in jobs:
        base = "/".join(map(str, j.path)) or "<root>"
        name, n = base, 1
        while name in used:
            n += 1
            name = f"{base}#{n}"
        used.add(name)
        names.append(name)
    return names


# Characters json.dumps(ensure_ascii=False) escapes in a string.
_NEEDS_ESCAPE = re.compile(r'[\x00-\x1f"\\]').search


@functools.lru_cache(maxsize=1024)
def _dtype_info(dt: np.dtype) -> tuple[str, str, bool, str]:
    """(manifest name, safetensors code, header keeps the shape, byte order) of a dtype."""
    name = dtype_name(dt)
    code = safetensors_code(name)
    return name, code, code != "U8" or name == "uint8", ">" if dt.byteorder == ">" else "<"


def _align(itemsize: int) -> int:
    return min(itemsize & -itemsize, HEADER_ALIGN) if itemsize else HEADER_ALIGN


def layout(jobs: list[_Job], file: str = DATA_FILE) -> tuple[bytes, int]:
    """Assign offsets and build the safetensors header.  Returns ``(header bytes, file size)``.

    Arrays are placed by decreasing alignment so every array starts at a multiple of its own
    alignment (natural alignment for zero-copy memory maps) without gaps, which safetensors
    forbids; the header is padded with spaces so the data section starts 64-byte aligned.
    """
    # One pass per array with per-dtype facts cached: this loop runs once per leaf, so with
    # 10,000 small leaves it is a visible part of a save.
    infos = [_dtype_info(j.dtype) for j in jobs]
    sizes = [math.prod(j.shape) * j.dtype.itemsize for j in jobs]  # stored itemsize is the same
    # By decreasing power-of-two alignment (the lowest set bit of the item size, at most 64):
    # every array's size is a multiple of its own alignment and of all that follow, so each
    # array starts naturally aligned even with odd item sizes such as U3 (12) or V3.
    order = sorted(range(len(jobs)), key=lambda i: -_align(jobs[i].dtype.itemsize))  # stable
    names = _tensor_names(jobs)
    # The header is the JSON that json.dumps(..., ensure_ascii=False, separators=(",", ":"))
    # gives for {"__metadata__": ..., name: {"dtype", "shape", "data_offsets"}, ...}, built
    # with one f-string per array (a dict per array plus json.dumps costs 3x as much).
    parts = [json.dumps({"__metadata__": {"format": "unickpt", "unickpt_format":
                                          str(FORMAT_VERSION)}}, separators=(",", ":"))[:-1]]
    rel = 0
    rel_offsets = [0] * len(jobs)
    for i in order:
        _name, code, keep_shape, _bo = infos[i]
        nbytes = sizes[i]
        name = names[i]
        key = (json.dumps(name, ensure_ascii=False) if _NEEDS_ESCAPE(name)
               else f'"{name}"')
        shape = ",".join(map(str, jobs[i].shape)) if keep_shape else str(nbytes)
        parts.append(f'{key}:{{"dtype":"{code}","shape":[{shape}],'
                     f'"data_offsets":[{rel},{rel + nbytes}]}}')
        rel_offsets[i] = rel
        rel += nbytes
    raw = (",".join(parts) + "}").encode()
    pad = (-(8 + len(raw))) % HEADER_ALIGN
    raw += b" " * pad
    data_start = 8 + len(raw)
    for i, j in enumerate(jobs):
        name, _code, _keep, byteorder = infos[i]
        j.entry = ArrayEntry(file, names[i], name, j.shape, data_start + rel_offsets[i],
                             sizes[i], 0, byteorder, j.scalar)
    return len(raw).to_bytes(8, "little") + raw, data_start + rel


def _chunks(a: np.ndarray | LazyArray, path: Path) -> Iterable[memoryview]:
    """Yield the array's bytes in C order, little-endian, in chunks of at most CHUNK_BYTES."""
    a = a.materialize(path) if isinstance(a, LazyArray) else np.asarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))  # converting copy; rare (big-endian input)
    if a.size == 0:
        return
    if a.flags.c_contiguous:
        mv = memoryview(a.reshape(-1).view(np.uint8))
        for s in range(0, len(mv), CHUNK_BYTES):
            yield mv[s:s + CHUNK_BYTES]
        return
    # Non-contiguous: copy a block of leading-axis rows at a time.
    # (row size from the shape: reshaping a non-contiguous array would copy all of it)
    row_bytes = max(1, math.prod(a.shape[1:]) * a.dtype.itemsize)
    step = max(1, CHUNK_BYTES // row_bytes)
    for s in range(0, a.shape[0], step):
        yield memoryview(np.ascontiguousarray(a[s:s + step]).reshape(-1).view(np.uint8))


def _write_job(fh: WriteHandle, j: _Job) -> None:
    h = checksum.hasher()
    pos = j.entry.offset
    for mv in _chunks(j.array, j.path):
        h.update(mv)
        fh.pwrite(mv, pos)
        if len(mv) >= SMALL_BYTES:
            fh.hint_written(pos, len(mv))
        pos += len(mv)
    if pos != j.entry.offset + j.entry.nbytes:
        raise RuntimeError(f"{format_path(j.path)}: wrote {pos - j.entry.offset} bytes, "
                           f"expected {j.entry.nbytes}")
    j.entry.xxh3 = h.intdigest()


def _small_bytes(j: _Job) -> bytes:
    """A small array's bytes, C order, little-endian (one C-level copy, at most SMALL_BYTES)."""
    a = j.array.materialize(j.path) if isinstance(j.array, LazyArray) else np.asarray(j.array)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return a.tobytes()


def _write_batch(fh: WriteHandle, batch: list[_Job]) -> None:
    """Write file-adjacent small arrays with one pwritev, hashing each array's bytes."""
    bufs = []
    for j in batch:
        b = _small_bytes(j)
        if len(b) != j.entry.nbytes:
            raise RuntimeError(f"{format_path(j.path)}: has {len(b)} bytes, expected "
                               f"{j.entry.nbytes}")
        j.entry.xxh3 = checksum.digest(b)
        bufs.append(b)
    start = batch[0].entry.offset
    end = batch[-1].entry.offset + batch[-1].entry.nbytes
    fh.pwritev(bufs, start)
    if end - start >= SMALL_BYTES:
        fh.hint_written(start, end - start)


def _work_items(jobs: list[_Job]) -> list[tuple[int, Callable[[WriteHandle], None]]]:
    """``(bytes, write(handle))`` per big array and per batch of file-adjacent small arrays."""
    items: list[tuple[int, Callable[[WriteHandle], None]]] = []
    batch: list[_Job] = []
    size = 0

    def flush() -> None:
        nonlocal batch, size
        if batch:
            b = batch
            items.append((size, lambda fh: _write_batch(fh, b)))
        batch, size = [], 0

    for j in sorted(jobs, key=lambda j: j.entry.offset):
        n = j.entry.nbytes
        if n > SMALL_BYTES:
            items.append((n, functools.partial(_write_job, j=j)))
            continue
        if batch and (size + n > BATCH_BYTES or len(batch) >= BATCH_IOVECS or
                      batch[-1].entry.offset + batch[-1].entry.nbytes != j.entry.offset):
            flush()
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
               prepared: tuple | None = None, storage: Storage | None = None) -> WriteStats:
    """Write ``tree`` into the (existing, empty, uncommitted) ``directory`` of ``storage``.

    Files are synced (durable); committing is the caller's job.  ``info`` may be
    a callable that receives the :class:`WriteStats` of the array data (written and synced)
    and returns the info map, so that a save can record its own size and duration.
    """
    t0 = time.perf_counter()
    storage = storage or LocalStorage()
    node, jobs, sharded = prepared if prepared is not None else flatten(tree)
    with gc_paused():  # only around the CPU-bound encoding, never the (long) I/O
        header, size = layout(jobs)
        items = _work_items(jobs)
    fh = storage.create(posixpath.join(directory, DATA_FILE), size)
    try:
        fh.pwrite(header, 0)
        nworkers = min(workers or default_workers(), max(1, len(items)))
        if nworkers == 1 or sum(n for n, _ in items) < (8 << 20):
            for _, write in items:
                write(fh)
        else:
            with ThreadPoolExecutor(nworkers, thread_name_prefix="unickpt-write") as ex:
                for f in [ex.submit(write, fh) for _, write in items]:
                    f.result()
        fh.sync()
    finally:
        fh.close()
    if callable(info):
        info = info(WriteStats(nbytes=sum(j.entry.nbytes for j in jobs), narrays=len(jobs),
                               seconds=time.perf_counter() - t0))
    with gc_paused():
        raw = _manifest_bytes(node, jobs, sharded, size, header, kinds, metadata, info)
    mh = storage.create(posixpath.join(directory, MANIFEST_NAME), len(raw))
    try:
        mh.pwrite(raw, 0)
        mh.sync()
    finally:
        mh.close()
    nbytes = sum(j.entry.nbytes for j in jobs)
    return WriteStats(nbytes=nbytes, narrays=len(jobs), seconds=time.perf_counter() - t0)


def _manifest_bytes(node: Any, jobs: list[_Job], sharded: list, size: int, header: bytes,
                    kinds: dict[Path, str] | None, metadata: dict | None,
                    info: dict | None) -> bytes:
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        library_version=__version__,
        tree=node,
        arrays=[j.entry for j in jobs],
        sharded=[ShardedEntry(dtype_name(s.dtype), tuple(s.shape),
                              [(tuple(p.index), ji) for p, ji in zip(s.pieces, idx)],
                              ">" if np.dtype(s.dtype).byteorder == ">" else "<")
                 for s, idx in sharded],
        files=[FileEntry(DATA_FILE, size, len(header), checksum.digest(header))],
        kinds=dict(kinds or {}),
        metadata=plain_data(metadata or {}, "metadata"),
        info=plain_data(info or {}, "info"),
    )
    return manifest.to_bytes()


def plain_data(x: Any, what: str, path: Path = ()) -> Any:
    """Check that user metadata is plain msgpack data (no arrays, no objects); a copy."""
    if x is None or isinstance(x, (bool, bytes, float)):
        return x
    if isinstance(x, str):
        _check_utf8(x, path)
        return x
    if isinstance(x, int):
        if not check_int_range(x):
            raise UnsupportedLeafError(f"{what} at {format_path(path)}: int {x} exceeds 64 bits")
        return x
    if isinstance(x, (np.integer, np.floating, np.bool_)):
        return x.item()
    if isinstance(x, dict):
        out = {}
        for k, v in x.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise UnsupportedLeafError(f"{what} at {format_path(path)}: key {k!r} "
                                           "must be str or int")
            if isinstance(k, str):
                _check_utf8(k, path)
            out[k] = plain_data(v, what, (*path, k))
        return out
    if isinstance(x, (list, tuple)):
        return [plain_data(v, what, (*path, i)) for i, v in enumerate(x)]
    raise UnsupportedLeafError(
        f"{what} at {format_path(path)}: {type(x).__name__} is not plain data "
        "(use str, numbers, bool, None, bytes, lists and dicts)")


def write_jobs(fh: WriteHandle, jobs: list[_Job]) -> None:
    """Write ``jobs`` (laid out by :func:`layout`) through ``fh``, checksumming each array.

    The array-data part of :func:`write_tree`, for a writer that lays out its own file (each
    rank of a multi-process save writes one; see :mod:`unickpt.dist.save`).
    """
    for _, write in _work_items(jobs):
        write(fh)
