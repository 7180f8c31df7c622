"""Which array file each array goes to, and which files a save shares with the previous one.

A checkpoint's arrays are split into array files by a grouping that depends only on the
tree paths and sizes (docs/FORMAT.md, "Array files and sharing"), so that an array lands in
the same group at every save of a run.  When every array of a group is byte-identical to the
previous committed checkpoint (same path, dtype, shape, checksum) and that checkpoint holds
exactly those arrays in one file, the file is shared (:meth:`Storage.share
<unickpt.storage.Sharing.share>`: a hard link locally) instead of written again.

>>> import numpy as np
>>> from unickpt.format.writer import flatten
>>> _, jobs, _ = flatten({"a": np.zeros(4), "b": np.zeros(4)})
>>> [[jobs[i].path for i in g] for g in group_jobs(jobs, split_bytes=0, alone_bytes=32)]
[[('a',)], [('b',)]]
"""

from __future__ import annotations

import math
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import UnickptError
from ..storage import Storage
from ..tree import LazyArray, Path
from . import checksum
from .manifest import ArrayEntry, FileEntry
from .reader import CheckpointReader

__all__ = ["SPLIT_BYTES", "GROUP_BYTES", "ALONE_BYTES", "HEAD_BYTES", "group_jobs",
           "file_names", "Previous", "read_previous", "shareable", "head_digest"]

# A state smaller than SPLIT_BYTES stays one file (sharing would save little, and one file
# is one fsync).  Above it, an array of ALONE_BYTES or more gets a file of its own (big
# weights: frozen ones are then shared whatever their neighbours do), and smaller arrays are
# packed per top-level subtree, in tree order, into files of about GROUP_BYTES.
SPLIT_BYTES = 64 << 20
GROUP_BYTES = 64 << 20
ALONE_BYTES = 1 << 20
# Arrays larger than this record the checksum of their first HEAD_BYTES bytes (``head_xxh3``):
# a changed array is then told apart from its previous version by hashing 4 KiB, not all of
# it, so a save where everything changes costs what it cost before sharing existed.
HEAD_BYTES = 4096


def _nbytes(job: Any) -> int:
    return math.prod(job.shape) * job.dtype.itemsize


def group_jobs(jobs: Sequence[Any], *, split_bytes: int | None = None,
               group_bytes: int | None = None,
               alone_bytes: int | None = None) -> list[list[int]]:
    """Job indices per array file, deterministic from the jobs' paths and sizes."""
    split = SPLIT_BYTES if split_bytes is None else split_bytes
    cap = GROUP_BYTES if group_bytes is None else group_bytes
    alone = ALONE_BYTES if alone_bytes is None else alone_bytes
    sizes = [_nbytes(j) for j in jobs]
    if sum(sizes) < split or len(jobs) <= 1:
        return [list(range(len(jobs)))]
    groups: list[list[int]] = []
    open_packs: dict[tuple, tuple[list[int], int]] = {}
    for i, j in enumerate(jobs):
        if sizes[i] >= alone:
            groups.append([i])
            continue
        # (type, key): the top-level key 1 and "1" are different subtrees
        key = (type(j.path[0]).__name__, j.path[0]) if j.path else ("", "")
        pack, size = open_packs.get(key, (None, 0))
        if pack is None:
            pack = []
            groups.append(pack)
        pack.append(i)
        size += sizes[i]
        if size >= cap:
            open_packs.pop(key, None)
        else:
            open_packs[key] = (pack, size)
    return groups


def file_names(n: int, single: str) -> list[str]:
    """The array file names of a checkpoint with ``n`` groups (one group: ``single``)."""
    return [single] if n == 1 else [f"arrays-{k:05d}.safetensors" for k in range(n)]


def head_digest(data: Any) -> int:
    """``head_xxh3`` of an array whose bytes (C order, little-endian) start with ``data``."""
    return checksum.digest(memoryview(data)[:HEAD_BYTES])


@dataclass
class Previous:
    """The previous committed checkpoint of a run, as the writer needs it for sharing."""

    path: str
    by_path: dict[Path, ArrayEntry]
    files: dict[str, FileEntry]
    counts: dict[str, int]  # arrays per file


def read_previous(storage: Storage, path: str) -> Previous | None:
    """The previous checkpoint's array entries by tree path; None when it cannot be used
    (unreadable, or format v1, whose files have no header checksum to confirm them by)."""
    try:
        with CheckpointReader(path, storage) as r:
            m = r.manifest
            if m.format_version < 2:
                return None
            by_path = {r.array_paths[i]: e for i, e in enumerate(m.arrays)
                       if i in r.array_paths}
    except (OSError, UnickptError):
        return None
    counts: dict[str, int] = {}
    for e in m.arrays:
        counts[e.file] = counts.get(e.file, 0) + 1
    return Previous(path, by_path, {f.name: f for f in m.files}, counts)


def shareable(jobs: Sequence[Any], group: list[int], prev: Previous,
              dtype_name: Any, hash_job: Any) -> tuple[FileEntry, list[ArrayEntry]] | None:
    """The previous file and entries ``group`` can share, or None (then it is written).

    Cheap checks first (paths, file, dtypes, shapes), then each array's ``head_xxh3`` where
    recorded, then full checksums, stopping at the first difference.  ``hash_job(job)``
    returns the full xxh3 of a job's bytes; the values computed are kept on the jobs
    (``prehash``), so a group found different is not hashed twice.
    """
    if not group:
        return None
    prevs = [prev.by_path.get(jobs[i].path) for i in group]
    if any(e is None for e in prevs):
        return None
    fname = prevs[0].file
    if any(e.file != fname for e in prevs) or prev.counts.get(fname) != len(group):
        return None
    for i, e in zip(group, prevs):
        j = jobs[i]
        if e.dtype != dtype_name(j.dtype) or tuple(e.shape) != tuple(j.shape) \
                or e.nbytes != _nbytes(j):
            return None
    for i, e in zip(group, prevs):
        j = jobs[i]
        if e.head_xxh3 is not None and not isinstance(j.array, LazyArray):
            if head_digest(_head(j)) != e.head_xxh3:
                return None
        if hash_job(j) != e.xxh3:
            return None
    fe = prev.files.get(fname)
    return None if fe is None else (fe, prevs)


def _head(job: Any) -> Any:
    """The first HEAD_BYTES bytes of a (non-lazy) job's array, C order, little-endian."""
    import numpy as np

    a = np.asarray(job.array)
    # .flat[:k] copies k elements in C order, without copying a non-contiguous array whole
    flat = np.asarray(a.flat[:HEAD_BYTES // max(1, a.dtype.itemsize) + 1])
    if flat.dtype.byteorder == ">":
        flat = flat.astype(flat.dtype.newbyteorder("<"))
    return np.ascontiguousarray(flat).view(np.uint8)[:HEAD_BYTES]


def confirm_file(storage: Storage, prev: Previous, fe: FileEntry) -> bool:
    """Whether the previous checkpoint's file still is what its manifest says (size and
    header checksum): a shared file must be the file the entries describe."""
    try:
        fd = storage.open(posixpath.join(prev.path, fe.name))
    except OSError:
        return False
    try:
        if fd.size != fe.size or fe.header_xxh3 is None:
            return False
        head = bytearray(fe.data_start)
        return (fd.pread_into(memoryview(head), 0) == fe.data_start
                and checksum.digest(head) == fe.header_xxh3)
    except OSError:
        return False
    finally:
        fd.close()
