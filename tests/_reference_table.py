"""Reference (simple, slow) codec of version 3's array table (docs/FORMAT.md 4.1.2).

Written from the spec alone, with plain loops and ``int.to_bytes``/``int.from_bytes``, so
that tests can prove the library's vectorised codec gives the same bytes, the same entries
and the same errors.  Not part of unickpt.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

# Version 3 stores the array entries as one map of columns (docs/FORMAT.md 4.1.2): "name" (a
# list of str; its length is the number of entries n), "file" and "dtype" (index columns into
# the body's files and into "dtypes"), "ndim" (uint8), "shape" (int64, sum(ndim) of them),
# "offset" and "nbytes" (int64), "xxh3" (uint64), all little-endian, then the sparse lists of
# entry numbers "byteorder" (">"), "scalar" (true) and "head" (with "head_xxh3", uint64).

def _width(k: int) -> int:
    """Bytes per index into a table of ``k`` entries."""
    if k <= 256:
        return 1
    if k <= 65536:
        return 2
    return 4


def _pack(values: list[int], size: int, signed: bool) -> bytes:
    return b"".join(v.to_bytes(size, "little", signed=signed) for v in values)


def _unpack(raw: bytes, size: int, signed: bool) -> list[int]:
    return [int.from_bytes(raw[k:k + size], "little", signed=signed)
            for k in range(0, len(raw), size)]


def encode_table(arrays: list[Any], files: list[str]) -> dict:
    """The array table of ``arrays`` (``files``: the body's file names, in order)."""
    file_number = {name: k for k, name in enumerate(files)}
    dtype_number: dict[str, int] = {}  # distinct dtype names, numbered in order of first use
    for a in arrays:
        if a.dtype not in dtype_number:
            dtype_number[a.dtype] = len(dtype_number)
    table: dict[str, Any] = {
        "name": [a.name for a in arrays],
        "file": _pack([file_number[a.file] for a in arrays], _width(len(files)), False),
        "dtypes": list(dtype_number),
        "dtype": _pack([dtype_number[a.dtype] for a in arrays], _width(len(dtype_number)),
                       False),
        "ndim": _pack([len(a.shape) for a in arrays], 1, False),
        "shape": _pack([d for a in arrays for d in a.shape], 8, True),
        "offset": _pack([a.offset for a in arrays], 8, True),
        "nbytes": _pack([a.nbytes for a in arrays], 8, True),
        "xxh3": _pack([a.xxh3 for a in arrays], 8, False),
    }
    byteorder = [i for i, a in enumerate(arrays) if a.byteorder != "<"]
    scalar = [i for i, a in enumerate(arrays) if a.scalar]
    head = [i for i, a in enumerate(arrays) if a.head_xxh3 is not None]
    if byteorder:
        table["byteorder"] = byteorder
    if scalar:
        table["scalar"] = scalar
    if head:
        table["head"] = head
        table["head_xxh3"] = _pack([arrays[i].head_xxh3 for i in head], 8, False)
    return table


def _column(table: dict, key: str, typ: type, fail: Callable[[str], NoReturn]) -> Any:
    v = table.get(key)
    if type(v) is not typ:
        fail(f"array table: column {key!r} missing or of the wrong type")
    return v


def _packed(table: dict, key: str, size: int, count: int, signed: bool,
            fail: Callable[[str], NoReturn]) -> list[int]:
    raw = _column(table, key, bytes, fail)
    if len(raw) != size * count:
        fail(f"array table: column {key!r} holds {len(raw)} bytes, expected {size * count}")
    return _unpack(raw, size, signed)


def _sparse(table: dict, key: str, n: int, fail: Callable[[str], NoReturn]) -> list[int]:
    v = table.get(key, [])
    if type(v) is not list:
        fail(f"array table: column {key!r} missing or of the wrong type")
    for k, x in enumerate(v):
        if type(x) is not int or not 0 <= x < n or (k and x <= v[k - 1]):
            fail(f"array table: {key!r} must list entry numbers in [0, {n}), strictly "
                 "increasing")
    return v


def decode_table(table: Any, files: list[str], fail: Callable[[str], NoReturn]) -> list[dict]:
    """The entries of an array table as v2 entry maps, after checking its structure: every
    column present with its type and length, every index within its table, every sparse list
    of entry numbers in range and strictly increasing.  The entries themselves are checked
    by the caller, as v2 entries are."""
    if type(table) is not dict:
        fail("field 'arrays' missing or of the wrong type")
    name = _column(table, "name", list, fail)
    n = len(name)
    file = _packed(table, "file", _width(len(files)), n, False, fail)
    dtypes = _column(table, "dtypes", list, fail)
    dtype = _packed(table, "dtype", _width(len(dtypes)), n, False, fail)
    ndim = _packed(table, "ndim", 1, n, False, fail)
    dims = _packed(table, "shape", 8, sum(ndim), True, fail)
    offset = _packed(table, "offset", 8, n, True, fail)
    nbytes = _packed(table, "nbytes", 8, n, True, fail)
    xxh3 = _packed(table, "xxh3", 8, n, False, fail)
    for what, column, listed in (("file", file, files), ("dtype", dtype, dtypes)):
        for i, k in enumerate(column):
            if k >= len(listed):
                fail(f"array table: entry {i} refers to {what} number {k}, beyond the "
                     f"{len(listed)} listed")
    byteorder = _sparse(table, "byteorder", n, fail)
    scalar = _sparse(table, "scalar", n, fail)
    head = _sparse(table, "head", n, fail)
    head_xxh3: list[int] = []
    if head or "head_xxh3" in table:
        head_xxh3 = _packed(table, "head_xxh3", 8, len(head), False, fail)
    entries = []
    start = 0
    for i in range(n):
        entries.append({"file": files[file[i]], "name": name[i], "dtype": dtypes[dtype[i]],
                        "shape": dims[start:start + ndim[i]], "offset": offset[i],
                        "nbytes": nbytes[i], "xxh3": xxh3[i]})
        start += ndim[i]
    for i in byteorder:
        entries[i]["byteorder"] = ">"
    for i in scalar:
        entries[i]["scalar"] = True
    for i, h in zip(head, head_xxh3):
        entries[i]["head_xxh3"] = h
    return entries


__all__ = ["decode_table", "encode_table"]
