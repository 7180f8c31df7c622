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

__all__ = ["SPLIT_BYTES", "GROUP_BYTES", "ALONE_BYTES", "MERGE_BYTES", "HEAD_BYTES",
           "HEAD_MIN_BYTES",
           "group_jobs", "file_names", "Previous", "read_previous", "Plan", "plan_files",
           "head_digest", "confirm_file"]

# A state smaller than SPLIT_BYTES stays one file (sharing would save little, and one file
# is one fsync).  Above it, arrays are packed per top-level subtree, in tree order, into files
# of about GROUP_BYTES; an array of ALONE_BYTES or more gets a file of its own; packs smaller
# than MERGE_BYTES (counters, RNG states, biases) are merged into one file.  Files are few
# and large because each file costs a create, an fsync and an unlink (~6 ms on a small VM):
# many small files would make a save where everything changes slower than one file.
SPLIT_BYTES = 64 << 20
GROUP_BYTES = 128 << 20
ALONE_BYTES = 128 << 20
MERGE_BYTES = 4 << 20
# Arrays larger than this record the checksum of their first HEAD_BYTES bytes (``head_xxh3``):
# a changed array is then told apart from its previous version by hashing 4 KiB, not all of
# it, so a save where everything changes costs what it cost before sharing existed.
HEAD_BYTES = 4096
HEAD_MIN_BYTES = 64 << 10  # arrays over this size get a head_xxh3 (smaller ones hash fast)


def group_jobs(jobs: Sequence[Any], idx: Sequence[int] | None = None, *,
               split_bytes: int | None = None, group_bytes: int | None = None,
               alone_bytes: int | None = None,
               merge_bytes: int | None = None) -> list[list[int]]:
    """Job indices per array file, deterministic from the jobs' paths and sizes (``idx``:
    only these jobs, in this order)."""
    split = SPLIT_BYTES if split_bytes is None else split_bytes
    cap = GROUP_BYTES if group_bytes is None else group_bytes
    alone = ALONE_BYTES if alone_bytes is None else alone_bytes
    merge = MERGE_BYTES if merge_bytes is None else merge_bytes
    idx = list(range(len(jobs))) if idx is None else list(idx)
    sizes = {i: jobs[i].nbytes for i in idx}
    if sum(sizes.values()) < split or len(idx) <= 1:
        return [idx] if idx or not jobs else []
    groups: list[list[int]] = []
    packs: list[list[int]] = []
    open_packs: dict[tuple, tuple[list[int], int]] = {}
    for i in idx:
        j = jobs[i]
        if sizes[i] >= alone:
            groups.append([i])
            continue
        # (type, key): the top-level key 1 and "1" are different subtrees
        key = (type(j.path[0]).__name__, j.path[0]) if j.path else ("", "")
        pack, size = open_packs.get(key, (None, 0))
        if pack is None:
            pack = []
            groups.append(pack)
            packs.append(pack)
        pack.append(i)
        size += sizes[i]
        if size >= cap:
            open_packs.pop(key, None)
        else:
            open_packs[key] = (pack, size)
    small = [id(g) for g in packs if sum(sizes[i] for i in g) < merge]
    if len(small) > 1:  # one file for all the little packs, in tree order
        merged = sorted(i for g in groups if id(g) in small for i in g)
        groups = [g for g in groups if id(g) not in small] + [merged]
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


@dataclass
class Plan:
    """The array files of one save: ``shared`` previous files (their entry, and per array the
    job index and previous entry) and ``new`` groups of job indices to write."""

    shared: list[tuple[FileEntry, list[tuple[int, ArrayEntry]]]]
    new: list[list[int]]


def plan_files(jobs: Sequence[Any], prev: Previous | None, dtype_name: Any,
               hash_job: Any, map_: Any = map) -> Plan:
    """Decide which previous files are shared and how the other arrays are grouped.

    Each array is *unchanged* when the previous checkpoint has an array at the same tree
    path with the same dtype, shape and checksum (a differing ``head_xxh3`` settles
    "changed" after hashing 4 KiB).  A previous file is shared when it holds only unchanged
    arrays of this save, all of them.  The remaining arrays are grouped (:func:`group_jobs`)
    unchanged and changed apart: an unchanged array that shared a file with a changed one is
    written once more, into a file of unchanged arrays that the next save can share.
    ``hash_job(job)`` is the full xxh3 of a job's bytes (kept on the job: never computed
    twice); ``map_`` runs the checks (a thread pool's map).
    """
    if prev is None:
        return Plan([], group_jobs(jobs))
    cands: list[tuple[int, ArrayEntry]] = []
    for i, j in enumerate(jobs):
        e = prev.by_path.get(j.path)
        if (e is not None and e.dtype == dtype_name(j.dtype)
                and tuple(e.shape) == tuple(j.shape) and e.nbytes == j.nbytes):
            cands.append((i, e))

    def same(c: tuple[int, ArrayEntry]) -> bool:
        j, e = jobs[c[0]], c[1]
        if e.head_xxh3 is not None and not isinstance(j.array, LazyArray) \
                and head_digest(_head(j)) != e.head_xxh3:
            return False
        return hash_job(j) == e.xxh3

    unchanged = {i: e for (i, e), ok in zip(cands, map_(same, cands)) if ok}
    per_file: dict[str, list[tuple[int, ArrayEntry]]] = {}
    for i, e in unchanged.items():
        per_file.setdefault(e.file, []).append((i, e))
    shared = []
    for name, members in per_file.items():
        fe = prev.files.get(name)
        if fe is not None and len(members) == prev.counts.get(name):
            shared.append((fe, sorted(members, key=lambda m: m[1].offset)))
    taken = {i for _, members in shared for i, _ in members}
    rest = [i for i in range(len(jobs)) if i not in taken]
    if not shared and sum(jobs[i].nbytes for i in rest) < SPLIT_BYTES:
        return Plan([], [rest])
    keep = [i for i in rest if i in unchanged]
    moved = [i for i in rest if i not in unchanged]
    return Plan(shared, group_jobs(jobs, keep, split_bytes=0)
                + group_jobs(jobs, moved, split_bytes=0))


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
