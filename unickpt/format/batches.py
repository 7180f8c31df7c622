"""Batched reads of small arrays (internal): which arrays share a read, and the arrays made
from one read's buffer.

A checkpoint of 10^4 small arrays is read with a few ``preadv`` of up to a few MiB each; the
per-array work that remains (a checksum and a numpy view each) is done by ``map`` over
columns, and for runs of arrays of one dtype and shape as the rows of one 2-d view, which
is the cheapest way numpy makes many views.
"""

from __future__ import annotations

import operator
from itertools import repeat
from typing import Any

import numpy as np

from . import checksum
from .table import ArrayTable

__all__ = ["plan", "runs", "digests", "views"]


def plan(t: ArrayTable, small: list[int], limit: int) -> list[list[int]]:
    """Entries ``small`` of ``t`` grouped into batches that lie back to back in one file,
    of up to ``limit`` bytes each (at least one array), in file and offset order."""
    if not small:
        return []
    idx = np.array(small, np.int64)
    off = np.array(list(map(t.offset.__getitem__, small)), np.int64)
    size = np.array(list(map(t.nbytes.__getitem__, small)), np.int64)
    names = list(map(t.file.__getitem__, small))
    if len(set(names)) == 1:  # one file (the common case): by offset alone
        order = np.argsort(off, kind="stable")
        brk = off[order][1:] != (off + size)[order][:-1]
    else:
        codes = {f: k for k, f in enumerate(sorted(set(names)))}
        code = np.array(list(map(codes.__getitem__, names)), np.int64)
        order = np.lexsort((off, code))
        brk = ((off[order][1:] != (off + size)[order][:-1])
               | (code[order][1:] != code[order][:-1]))
    csum = np.concatenate(([0], np.cumsum(size[order])))
    cuts = [0, *(np.flatnonzero(brk) + 1).tolist(), len(small)]
    ordered = idx[order].tolist()
    out = []
    for lo, hi in zip(cuts, cuts[1:]):  # runs without a gap
        while lo < hi:  # greedy: as many arrays as fit in limit, at least one
            k = int(np.searchsorted(csum, csum[lo] + limit, "right")) - 1
            k = min(max(k, lo + 1), hi)
            out.append(ordered[lo:k])
            lo = k
    return out


def runs(names: list[str], shapes: list) -> list[tuple[int, int]] | None:
    """Runs ``[a, b)`` of arrays of one dtype and shape in a batch (which has no gaps); None
    when they would be short (then one call per array is as cheap)."""
    n = len(names)
    if n < 16:  # a short batch (between big arrays): numpy's fixed cost would not pay
        return None
    same = (np.array(list(map(operator.eq, names[1:], names[:-1])), bool)
            & np.array(list(map(operator.eq, shapes[1:], shapes[:-1])), bool))
    cuts = [0, *(np.flatnonzero(~same) + 1).tolist(), n]
    if 4 * (len(cuts) - 1) > n:
        return None
    return list(zip(cuts, cuts[1:]))


def digests(buf: np.ndarray, los: list[int], sizes: list[int],
             runs: list[tuple[int, int]] | None) -> list[int]:
    """xxh3 of each array's bytes in ``buf``: one C call per array, no copy (a run's arrays
    are the rows of one 2-d byte view; others, memoryview slices)."""
    digest = checksum.digest_function()
    if runs is None:
        mv = memoryview(buf)  # type: ignore[arg-type]  # numpy stubs: ndarray is a Buffer
        return list(map(digest, map(mv.__getitem__, map(slice, los, map(operator.add, los,
                                                                            sizes)))))
    got: list[int] = []
    for a, b in runs:
        got += map(digest, buf[los[a]:los[a] + (b - a) * sizes[a]].reshape(b - a, sizes[a]))
    return got


def views(buf: np.ndarray, los: list[int], sizes: list[int], dts: list[np.dtype],
          shapes: list, runs: list[tuple[int, int]] | None) -> list[Any]:
    """The arrays at ``los`` in ``buf`` (views sharing its memory), of ``dts`` and ``shapes``."""
    make: Any = np.ndarray  # ndarray(shape, dtype, buffer, offset): a view of buf
    if runs is None:
        return list(map(make, shapes, dts, repeat(buf), los))
    out: list[Any] = []
    for a, b in runs:
        if b - a > 1 and shapes[a]:  # 0-d arrays excluded: their rows would be scalars
            block = buf[los[a]:los[a] + (b - a) * sizes[a]].view(dts[a])
            out += list(block.reshape(b - a, *shapes[a]))
        else:
            out += map(make, shapes[a:b], dts[a:b], repeat(buf), los[a:b])
    return out
