"""The v3 array table: every array entry of a manifest as columns (docs/FORMAT.md 4.1.2).

Version 2 stored one msgpack map per array entry.  With 10^4 small arrays, decoding those maps
made about a dozen Python objects per array and dominated the load (slower still in a process
that holds many objects, as a training process does).  Version 3 stores the entries as one
map of columns: the names as one list, file and dtype as index columns into small tables,
shapes, offsets, sizes and checksums as packed little-endian integers, and the rare optional
fields as sparse lists.  It decodes into a few dozen objects whatever the number of arrays.

:func:`encode` writes the table; :func:`decode` checks its structure (column types and
lengths, indices within their tables) and returns the columns; :func:`table` validates the
decoded columns with numpy and returns the :class:`ArrayTable`, or None when in doubt.  Then
:func:`as_entries` turns the columns into the v2 entry maps, and the entry-by-entry validation
names the first bad entry with the very message it gives for a v2 manifest: the table is an
encoding, never a relaxation.

>>> from unickpt.format.table import ArrayEntry
>>> cols = encode([ArrayEntry("a.st", "w", "float32", (2, 3), 64, 24, 7),
...                ArrayEntry("a.st", "step", "int64", (), 88, 8, 9, scalar=True)], ["a.st"])
>>> cols["name"], cols["dtypes"], cols["dtype"], cols["ndim"], cols["scalar"]
(['w', 'step'], ['float32', 'int64'], b'\\x00\\x01', b'\\x02\\x00', [1])
>>> as_entries(decode(cols, ["a.st"], _fail))[1]["scalar"]
True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, NoReturn

import numpy as np

from .dtypes import UnsupportedDtype, dtype_from_name, has_byteorder
from .table import MAX_NDIM, SIZE_LIMIT, ArrayEntry, ArrayTable, any_overlap

Fail = Callable[[str], NoReturn]
_I8, _U8 = np.dtype("<i8"), np.dtype("<u8")


def index_width(k: int) -> int:
    """Bytes per index into a table of ``k`` entries.

    >>> [index_width(k) for k in (0, 256, 257, 65536, 65537)]
    [1, 1, 2, 2, 4]
    """
    return 1 if k <= 256 else 2 if k <= 65536 else 4


def _index_dtype(k: int) -> np.dtype:
    return np.dtype(f"<u{index_width(k)}")


def encode(entries: Sequence[ArrayEntry], files: Sequence[str]) -> dict:
    """The v3 array table of ``entries`` (``files``: the body's file names, in order).

    Column by column with ``map`` (no Python-level loop per entry: a save of 10^4 small
    arrays encodes its table in a few milliseconds).  An :class:`ArrayTable` (what the writer
    builds) is encoded from its column lists as they are.
    """
    t = entries if isinstance(entries, ArrayTable) else ArrayTable.from_entries(list(entries))
    n = len(t)
    cols: dict[str, Any] = {
        "name": list(t.name),
        "file": _index_column(t.file, {f: k for k, f in enumerate(files)}, len(files), n),
    }
    dtype_no = {d: k for k, d in enumerate(dict.fromkeys(t.dtype))}  # in order of first use
    cols["dtypes"] = list(dtype_no)
    cols["dtype"] = _index_column(t.dtype, dtype_no, len(dtype_no), n)
    cols["ndim"] = np.fromiter(map(len, t.shape), np.uint8, n).tobytes()
    cols["shape"] = np.fromiter(chain.from_iterable(t.shape), _I8).tobytes()
    cols["offset"] = np.array(t.offset, _I8).tobytes()
    cols["nbytes"] = np.array(t.nbytes, _I8).tobytes()
    cols["xxh3"] = np.array(t.xxh3, _U8).tobytes()
    if t.byteorder.count("<") != n:
        cols["byteorder"] = [i for i, bo in enumerate(t.byteorder) if bo != "<"]
    if True in t.scalar:
        cols["scalar"] = [i for i, sc in enumerate(t.scalar) if sc]
    heads = t.head_xxh3
    if heads.count(None) != n:
        cols["head"] = [i for i, h in enumerate(heads) if h is not None]
        cols["head_xxh3"] = np.array([h for h in heads if h is not None], _U8).tobytes()
    return cols


def _index_column(values: list, number: dict, k: int, n: int) -> bytes:
    """The index column of ``values`` (each a key of ``number``, a table of ``k``)."""
    if len(number) == 1 and values.count(next(iter(number))) == n:
        return bytes(n * index_width(k))  # one value (the common case): all zeros
    return np.fromiter(map(number.__getitem__, values), _index_dtype(k), n).tobytes()


@dataclass
class Columns:
    """A structurally sound array table: numpy views of its packed columns."""

    name: list[str]
    files: list[str]  # the body's file names
    file: np.ndarray
    dtypes: list[str]
    dtype: np.ndarray
    ndim: np.ndarray
    shape: np.ndarray  # all dimensions, entry after entry
    offset: np.ndarray
    nbytes: np.ndarray
    xxh3: np.ndarray
    byteorder: list[int]
    scalar: list[int]
    head: list[int]
    head_xxh3: np.ndarray

    def groups(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(entry numbers, their dims as rows)`` for each distinct ndim above 0: one
        vectorised gather per distinct ndim instead of a slice per entry."""
        ndim = self.ndim.astype(np.int64)
        start = np.cumsum(ndim) - ndim
        out = []
        for k in np.unique(ndim).tolist():
            if k:
                where = np.flatnonzero(ndim == k)
                out.append((where, self.shape[start[where][:, None] + np.arange(k)]))
        return out

    def shapes(self, groups: list[tuple[np.ndarray, np.ndarray]] | None = None,
               ) -> list[tuple[int, ...]]:
        """Every entry's shape, as a tuple."""
        out: list[tuple[int, ...]] = [()] * len(self.name)
        for where, rows in self.groups() if groups is None else groups:
            for i, row in zip(where.tolist(), rows.tolist()):
                out[i] = tuple(row)
        return out


def _column(cols: dict, key: str, typ: type, fail: Fail) -> Any:
    v = cols.get(key)
    if type(v) is not typ:
        fail(f"array table: column {key!r} missing or of the wrong type")
    return v


def _packed(cols: dict, key: str, dtype: np.dtype, count: int, fail: Fail) -> np.ndarray:
    raw = _column(cols, key, bytes, fail)
    if len(raw) != count * dtype.itemsize:
        fail(f"array table: column {key!r} holds {len(raw)} bytes, expected "
             f"{count * dtype.itemsize}")
    return np.frombuffer(raw, dtype)


def _indices(col: np.ndarray, table: list, what: str, fail: Fail) -> None:
    if len(col) and int(col.max()) >= len(table):
        i = int(np.flatnonzero(col >= len(table))[0])
        fail(f"array table: entry {i} refers to {what} number {int(col[i])}, beyond the "
             f"{len(table)} listed")


def _sparse(cols: dict, key: str, n: int, fail: Fail) -> list[int]:
    v = cols.get(key, [])
    if type(v) is not list:
        fail(f"array table: column {key!r} missing or of the wrong type")
    prev = -1
    for x in v:
        if type(x) is not int or not prev < x < n:
            fail(f"array table: {key!r} must list entry numbers in [0, {n}), strictly "
                 f"increasing")
        prev = x
    return v


def decode(cols: Any, files: Sequence[str], fail: Fail) -> Columns:
    """Check the table's structure; its columns (``files``: the body's file names).

    Fails on what no entry-by-entry check could name: a column missing or of the wrong type
    or length, an index beyond its table, a sparse list out of range or order.
    """
    if type(cols) is not dict:
        fail("field 'arrays' missing or of the wrong type")
    name = _column(cols, "name", list, fail)
    n = len(name)
    files = list(files)
    file = _packed(cols, "file", _index_dtype(len(files)), n, fail)
    dtypes = _column(cols, "dtypes", list, fail)
    dtype = _packed(cols, "dtype", _index_dtype(len(dtypes)), n, fail)
    ndim = _packed(cols, "ndim", np.dtype(np.uint8), n, fail)
    shape = _packed(cols, "shape", _I8, int(ndim.sum(dtype=np.int64)), fail)
    offset = _packed(cols, "offset", _I8, n, fail)
    nbytes = _packed(cols, "nbytes", _I8, n, fail)
    xxh3 = _packed(cols, "xxh3", _U8, n, fail)
    _indices(file, files, "file", fail)
    _indices(dtype, dtypes, "dtype", fail)
    byteorder = _sparse(cols, "byteorder", n, fail)
    scalar = _sparse(cols, "scalar", n, fail)
    head = _sparse(cols, "head", n, fail)
    head_xxh3 = _packed(cols, "head_xxh3", _U8, len(head), fail) if head or "head_xxh3" in cols \
        else np.zeros(0, _U8)
    return Columns(name, files, file, dtypes, dtype, ndim, shape, offset, nbytes, xxh3,
                   byteorder, scalar, head, head_xxh3)


def as_entries(c: Columns) -> list[dict]:
    """The table as v2 entry maps, for the entry-by-entry validation (its error messages)."""
    shapes = c.shapes()
    out = [{"file": c.files[f], "name": nm, "dtype": c.dtypes[d], "shape": list(s),
            "offset": o, "nbytes": b, "xxh3": x}
           for f, nm, d, s, o, b, x in zip(c.file.tolist(), c.name, c.dtype.tolist(), shapes,
                                           c.offset.tolist(), c.nbytes.tolist(),
                                           c.xxh3.tolist())]
    for i in c.byteorder:
        out[i]["byteorder"] = ">"
    for i in c.scalar:
        out[i]["scalar"] = True
    for i, h in zip(c.head, c.head_xxh3.tolist()):
        out[i]["head_xxh3"] = h
    return out


class _Doubt(Exception):
    pass


def table(c: Columns, spans: dict[str, tuple[int, int]]) -> ArrayTable | None:
    """The validated :class:`ArrayTable`, or None when any entry may be invalid (``spans``:
    file name -> (data start, size)).  Checks conditions that together imply every check of
    the entry-by-entry validation; it never accepts what that validation refuses."""
    try:
        with np.errstate(all="ignore"):
            return _table(c, spans)
    except (_Doubt, UnsupportedDtype, OverflowError, ValueError):
        return None


def _table(c: Columns, spans: dict[str, tuple[int, int]]) -> ArrayTable:
    n = len(c.name)
    if set(map(type, c.name)) - {str} or set(map(type, c.dtypes)) - {str}:
        raise _Doubt
    facts = [dtype_from_name(d) for d in c.dtypes]  # UnsupportedDtype: in doubt
    itemsize = np.array([dt.itemsize for dt in facts], np.int64)[c.dtype] if n else \
        np.zeros(0, np.int64)
    if n and int(c.ndim.max()) > MAX_NDIM:
        raise _Doubt
    dims = c.shape
    if len(dims) and (int(dims.min()) < 0 or int(dims.max()) >= SIZE_LIMIT):
        raise _Doubt
    # Element counts: exact in int64 once a float64 estimate (relative error < 2**-40 here)
    # shows that the product of the non-zero dimensions times the item size stays far below
    # 2**62; anything near the bound is left to the exact entry-by-entry check.
    groups = c.groups()
    nonzero = np.ones(n, np.float64)
    count = np.ones(n, np.int64)
    for where, rows in groups:
        nonzero[where] = np.where(rows == 0, 1.0, rows.astype(np.float64)).prod(axis=1)
    if n and float((nonzero * np.maximum(itemsize, 1)).max()) >= 2.0 ** 60:
        raise _Doubt
    for where, rows in groups:
        count[where] = rows.prod(axis=1)
    if not np.array_equal(count * itemsize, c.nbytes):
        raise _Doubt
    lo_hi = [spans[f] for f in c.files]
    if any(hi >= (1 << 63) for _, hi in lo_hi):
        raise _Doubt
    lo = np.array([a for a, _ in lo_hi], np.int64)[c.file] if n else np.zeros(0, np.int64)
    hi = np.array([b for _, b in lo_hi], np.int64)[c.file] if n else np.zeros(0, np.int64)
    off, nb = c.offset, c.nbytes
    if ((off < lo) | (off > hi) | (nb > hi - off)).any():
        raise _Doubt
    if any_overlap(c.file, off, off + nb):
        raise _Doubt
    swappable = np.array([has_byteorder(dt) for dt in facts], bool)
    if c.byteorder and not swappable[c.dtype[c.byteorder]].all():
        raise _Doubt
    if c.scalar and c.ndim[c.scalar].any():
        raise _Doubt
    files = np.array(c.files, object)[c.file].tolist() if n else []
    dtypes = np.array(c.dtypes, object)[c.dtype].tolist() if n else []
    byteorder = ["<"] * n
    for i in c.byteorder:
        byteorder[i] = ">"
    scalar = [False] * n
    for i in c.scalar:
        scalar[i] = True
    head: list[int | None] = [None] * n
    for i, h in zip(c.head, c.head_xxh3.tolist()):
        head[i] = h
    return ArrayTable(files, c.name, dtypes, c.shapes(groups), off.tolist(), nb.tolist(),
                      c.xxh3.tolist(), byteorder, scalar, head)


def _fail(msg: str) -> NoReturn:  # for the doctest
    raise ValueError(msg)


__all__ = ["Columns", "as_entries", "decode", "encode", "index_width", "table"]
