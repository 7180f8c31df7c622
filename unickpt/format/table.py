"""The array entries of a manifest: one :class:`ArrayEntry` each, or a columnar table of them.

A checkpoint of 10^4 small arrays has 10^4 entries.  Reading one field of each entry in a
Python loop, and making an object per entry, cost about as much as reading the data, so a
decoded manifest keeps its entries as columns (:class:`ArrayTable`): the reader works on
whole columns, and an :class:`ArrayEntry` is made only for the entries someone asks for.

:func:`fast_table` validates the array entries of a decoded manifest column by column.  It
checks conditions that together imply that every check of the entry-by-entry validation
(``manifest._validate_arrays``) passes; when any of them does not hold it returns None, and
the caller runs the entry-by-entry validation, which names the first bad entry.  So the
entries accepted, and every error message, are those of the simple validation.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, overload

import numpy as np

from .dtypes import UnsupportedDtype, dtype_from_name, has_byteorder

MAX_NDIM = 64
UINT64_MAX = (1 << 64) - 1
SIZE_LIMIT = 1 << 62  # dimensions, and non-zero dimensions times the item size, stay below
REQUIRED = ("file", "name", "dtype", "shape", "offset", "nbytes", "xxh3")


@dataclass(slots=True)  # slots: one is made per array (10^4 per checkpoint is common)
class ArrayEntry:
    """Where one array's bytes live and what they must hash to."""

    file: str
    name: str  # the safetensors tensor name
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in ``file``
    nbytes: int
    xxh3: int
    byteorder: str = "<"  # "<" or ">": the byte order of the array as the user gave it
    scalar: bool = False  # a numpy scalar (np.generic) rather than a 0-d array
    # optional: xxh3-64 of the first 4096 bytes (arrays over 64 KiB); lets an incremental save
    # see that an array changed without hashing all of it (never proof that it did not)
    head_xxh3: int | None = None

    def to_msg(self) -> dict:
        # msgpack packs a tuple as the same array a list gives: no list per entry
        d = {"file": self.file, "name": self.name, "dtype": self.dtype, "shape": self.shape,
             "offset": self.offset, "nbytes": self.nbytes, "xxh3": self.xxh3}
        if self.byteorder != "<":
            d["byteorder"] = self.byteorder
        if self.scalar:
            d["scalar"] = True
        if self.head_xxh3 is not None:
            d["head_xxh3"] = self.head_xxh3
        return d


class ArrayTable(Sequence[ArrayEntry]):
    """Validated array entries as columns (lists indexed by entry number).

    Indexing and iterating give :class:`ArrayEntry` objects, made on first access and kept
    (so that an entry read twice is the same object).  ``shape`` holds each shape as it was
    decoded (a list or tuple of ints); the entries hold tuples.

    >>> t = ArrayTable.from_entries([ArrayEntry("f", "w", "float32", (2,), 64, 8, 7)])
    >>> t[0].shape, t.nbytes, len(t), t == [ArrayEntry("f", "w", "float32", (2,), 64, 8, 7)]
    ((2,), [8], 1, True)
    """

    __slots__ = ("file", "name", "dtype", "shape", "offset", "nbytes", "xxh3", "byteorder",
                 "scalar", "head_xxh3", "_made")

    def __init__(self, file: list[str], name: list[str], dtype: list[str], shape: list,
                 offset: list[int], nbytes: list[int], xxh3: list[int], byteorder: list[str],
                 scalar: list[bool], head_xxh3: list[int | None]):
        self.file, self.name, self.dtype, self.shape = file, name, dtype, shape
        self.offset, self.nbytes, self.xxh3 = offset, nbytes, xxh3
        self.byteorder, self.scalar, self.head_xxh3 = byteorder, scalar, head_xxh3
        self._made: list[ArrayEntry | None] = [None] * len(file)

    @classmethod
    def from_entries(cls, entries: list[ArrayEntry]) -> ArrayTable:
        """The table of ``entries`` (kept: indexing gives these very objects)."""
        cols = [[getattr(e, f) for e in entries] for f in
                ("file", "name", "dtype", "shape", "offset", "nbytes", "xxh3", "byteorder",
                 "scalar", "head_xxh3")]
        t = cls(*cols)
        t._made = list(entries)
        return t

    def __len__(self) -> int:
        return len(self.file)

    def _entry(self, i: int) -> ArrayEntry:
        e = self._made[i]
        if e is None:
            e = self._made[i] = ArrayEntry(
                self.file[i], self.name[i], self.dtype[i], tuple(self.shape[i]), self.offset[i],
                self.nbytes[i], self.xxh3[i], self.byteorder[i], self.scalar[i],
                self.head_xxh3[i])
        return e

    @overload
    def __getitem__(self, i: int) -> ArrayEntry: ...
    @overload
    def __getitem__(self, i: slice) -> list[ArrayEntry]: ...
    def __getitem__(self, i: int | slice) -> ArrayEntry | list[ArrayEntry]:
        if isinstance(i, slice):
            return [self._entry(k) for k in range(len(self))[i]]
        return self._entry(operator.index(i) % len(self) if i < 0 else i)

    def __iter__(self) -> Iterator[ArrayEntry]:
        return map(self._entry, range(len(self)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (ArrayTable, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable, like the list it stands for

    def __repr__(self) -> str:
        return f"ArrayTable({list(self)!r})"


Fail = Callable[[str], Any]


def optional_array_fields(a: dict, i: int, shape: tuple, swappable: bool,
                          fail: Fail) -> tuple[str, bool, int | None]:
    """``(byteorder, scalar, head_xxh3)`` of array entry ``i``, checked (defaults if absent)."""
    bo = a.get("byteorder", "<")
    if bo != "<" and (bo != ">" or not swappable):
        fail(f"array {i}: byteorder {bo!r} for dtype {a['dtype']}")
    scalar = a.get("scalar", False)
    if scalar is not False and (scalar is not True or shape != ()):
        fail(f"array {i}: 'scalar' must be a bool, true only for shape []")
    head = a.get("head_xxh3")
    if head is not None and (type(head) is not int or not 0 <= head <= UINT64_MAX):
        fail(f"array {i}: head_xxh3 is not a uint64")
    return bo, scalar, head


class _Doubt(Exception):
    """Raised inside :func:`fast_table`: leave the decision to the entry-by-entry validation."""


def _doubt(_msg: str = "") -> Any:
    raise _Doubt


def _only(col: list, typ: type) -> None:
    if set(map(type, col)) - {typ}:
        raise _Doubt


def fast_table(arrs: list, files: dict[str, tuple[int, int]]) -> ArrayTable | None:
    """Validate the decoded ``arrays`` list column by column (``files``: name -> (data
    start, size)).  The table when every entry is certainly valid and no two overlap; None
    when in doubt (then nothing is known: validate entry by entry)."""
    try:
        with np.errstate(all="ignore"):
            return _fast_table(arrs, files)
    except (_Doubt, KeyError, TypeError, ValueError, OverflowError, UnsupportedDtype):
        return None


def _fast_table(arrs: list, files: dict[str, tuple[int, int]]) -> ArrayTable:
    n = len(arrs)
    _only(arrs, dict)
    fname, tname, dname, shape, offset, nbytes, xxh = (
        list(map(operator.itemgetter(k), arrs)) for k in REQUIRED)
    for col in (fname, tname, dname):
        _only(col, str)
    for col in (offset, nbytes, xxh):  # type() also rules out bool
        _only(col, int)
    _only(shape, list)
    names = set(fname)
    if not names <= files.keys():
        raise _Doubt
    facts = {d: dtype_from_name(d) for d in set(dname)}  # raises UnsupportedDtype: in doubt
    itemsize = list(map({d: dt.itemsize for d, dt in facts.items()}.__getitem__, dname))
    if n and max(map(len, shape)) > MAX_NDIM:
        raise _Doubt
    dims = list(chain.from_iterable(shape))
    _only(dims, int)
    if dims and (min(dims) < 0 or max(dims) >= SIZE_LIMIT):
        raise _Doubt
    count = list(map(math.prod, shape))
    nonzero = count if not dims or min(dims) else [math.prod(filter(None, s)) for s in shape]
    if n and max(nonzero) * max(max(dt.itemsize, 1) for dt in facts.values()) >= SIZE_LIMIT:
        raise _Doubt
    if list(map(operator.mul, count, itemsize)) != nbytes:
        raise _Doubt
    if xxh and (min(xxh) < 0 or max(xxh) > UINT64_MAX):
        raise _Doubt
    end = list(map(operator.add, offset, nbytes))
    if len(names) == 1:
        lo, hi = files[fname[0]] if n else (0, 0)
        if n and (min(offset) < lo or max(end) > hi):
            raise _Doubt
    elif not (all(map(operator.ge, offset, (files[f][0] for f in fname)))
              and all(map(operator.le, end, (files[f][1] for f in fname)))):
        raise _Doubt
    _no_overlap(fname, offset, end, len(names))
    byteorder, scalar = ["<"] * n, [False] * n
    head: list[int | None] = [None] * n
    lens = list(map(len, arrs))
    extra = [] if not n or max(lens) == len(REQUIRED) else \
        [i for i, k in enumerate(lens) if k != len(REQUIRED)]
    for i in extra:
        # an optional field (or an unknown one) is present: the rare entries, one by one
        dt = facts[dname[i]]
        byteorder[i], scalar[i], head[i] = optional_array_fields(
            arrs[i], i, tuple(shape[i]), has_byteorder(dt), _doubt)
    return ArrayTable(fname, tname, dname, shape, offset, nbytes, xxh, byteorder, scalar, head)


def _no_overlap(fname: list[str], offset: list[int], end: list[int], nfiles: int) -> None:
    """Doubt unless no two arrays of one file overlap (offsets and ends lie in their files,
    which were checked to fit in int64 by np.array raising OverflowError otherwise)."""
    if len(offset) < 2:
        return
    codes = None
    if nfiles > 1:
        numbers = {f: k for k, f in enumerate(set(fname))}
        codes = np.array(list(map(numbers.__getitem__, fname)), np.int64)
    if any_overlap(codes, np.array(offset, np.int64), np.array(end, np.int64)):
        raise _Doubt


def any_overlap(file: np.ndarray | None, start: np.ndarray, end: np.ndarray) -> bool:
    """Whether two arrays of one file overlap, ``file`` giving each array's file number
    (None: all in one file).

    Sorted by file, start, then end (an empty array where another starts overlaps nothing),
    as the entry-by-entry check sorts: an overlap it finds is found here too.

    >>> bool(any_overlap(None, np.array([0, 4]), np.array([8, 6])))
    True
    >>> bool(any_overlap(np.array([0, 1]), np.array([0, 4]), np.array([8, 6])))
    False
    """
    if len(start) < 2:
        return False
    if file is None:
        order = np.lexsort((end, start))
        return bool((start[order[1:]] < end[order[:-1]]).any())
    order = np.lexsort((end, start, file))
    same = file[order[1:]] == file[order[:-1]]
    return bool((same & (start[order[1:]] < end[order[:-1]])).any())


__all__ = ["ArrayEntry", "ArrayTable", "fast_table", "optional_array_fields", "MAX_NDIM",
           "UINT64_MAX", "REQUIRED", "SIZE_LIMIT", "any_overlap"]
