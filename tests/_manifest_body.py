"""Crafting manifests in tests: the body with its array entries as v2 maps, written back validly.

:func:`rewrite_body` reads a checkpoint's manifest body, turns a v3 array table (docs/FORMAT.md
4.1.2) into the v2 list of entry maps (4.1.3, with :func:`unickpt.format.columns.decode` and
:func:`~unickpt.format.columns.as_entries`), lets the test mutate the body (``arrays``, ``files``,
``tree``, ...), and writes it back with a *valid* checksum: a crafted, not a damaged, file.

Which encoding it writes (the choice every hostile test depends on):

- **the v3 table**, whenever the mutated entries can be encoded as columns: every entry a map
  of the known keys only, ``file`` a name of ``files`` (or of the file that stood at the same
  position before the mutation: v3 refers to files by number, so renaming a file entry keeps
  its arrays), ``name`` and ``dtype`` str, ``shape`` a list of at most 255 ints in int64,
  ``offset`` and ``nbytes`` ints in int64, ``xxh3`` and ``head_xxh3`` ints in uint64,
  ``byteorder`` ``"<"``/``">"`` and ``scalar`` a bool.  Values that are invalid but fit these
  columns (a negative offset, 65 dimensions, an unknown dtype name, overlapping arrays) thus
  reach the v3 reader: the numpy validation and then the entry-by-entry one;
- **a version-2 manifest** (outer ``unickpt`` and body ``format_version`` 2, the list of maps)
  otherwise: a field of the wrong type (``shape`` as a string, ``scalar`` as ``1``), an int
  outside its column's range (``xxh3`` = -1), an unlisted file name, an unknown key.  Only the
  list encoding can carry such a value, and the v2 reader path gives the same messages.

:func:`rewrite_body` returns the version it wrote, and tests assert it, so that a case meant
for the v3 path cannot silently fall back to v2.  :func:`rewrite_raw` mutates the body as it
is stored (the table itself, for structural damage of the v3 encoding).

>>> import tempfile, numpy as np, unickpt
>>> p = tempfile.mkdtemp() + "/ck"
>>> _ = unickpt.save(p, {"w": np.zeros(2, np.float32)})
>>> rewrite_body(p, lambda b: b["arrays"][0].update(nbytes=4))
3
>>> rewrite_body(p, lambda b: b["arrays"][0].update(nbytes="4"))
2
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NoReturn

import msgpack
import xxhash

from unickpt.format import columns
from unickpt.format.manifest import MANIFEST_NAME
from unickpt.format.table import ArrayEntry

_KEYS = frozenset({"file", "name", "dtype", "shape", "offset", "nbytes", "xxh3", "byteorder",
                   "scalar", "head_xxh3"})
_I64 = (-(1 << 63), (1 << 63) - 1)
_U64 = (0, (1 << 64) - 1)


def _fail(msg: str) -> NoReturn:
    raise AssertionError(f"the checkpoint under test has a bad array table: {msg}")


def read(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(outer map, body)`` of the manifest as stored (``body["arrays"]`` as encoded)."""
    with open(os.path.join(os.fspath(path), MANIFEST_NAME), "rb") as f:
        outer = msgpack.unpackb(f.read(), raw=False)
    return outer, msgpack.unpackb(outer["body"], raw=False, strict_map_key=False)


def write(path: str | os.PathLike, outer: dict, body: Any) -> None:
    """Store ``body`` under ``outer`` with a valid checksum."""
    outer["body"] = msgpack.packb(body, use_bin_type=True)
    outer["xxh3"] = xxhash.xxh3_64_intdigest(outer["body"])
    with open(os.path.join(os.fspath(path), MANIFEST_NAME), "wb") as f:
        f.write(msgpack.packb(outer, use_bin_type=True))


def entries_of(body: dict) -> list[dict]:
    """The array entries of a decoded body as v2 maps, whatever its version."""
    arrays = body["arrays"]
    if body.get("format_version", 0) < 3:
        return arrays
    return columns.as_entries(columns.decode(arrays, [f["name"] for f in body["files"]], _fail))


def _int(v: Any, bounds: tuple[int, int]) -> bool:
    return type(v) is int and bounds[0] <= v <= bounds[1]


def _entry(a: Any, file_no: dict[str, int]) -> ArrayEntry | None:
    """``a`` as an ArrayEntry whose ``file`` is its file number, or None if no column fits."""
    if type(a) is not dict or not a.keys() <= _KEYS or not _KEYS - a.keys() <= {
            "byteorder", "scalar", "head_xxh3"}:
        return None
    shape, head = a["shape"], a.get("head_xxh3")
    if not (type(a["file"]) is str and a["file"] in file_no and type(a["name"]) is str
            and type(a["dtype"]) is str and type(shape) in (list, tuple) and len(shape) < 256
            and all(_int(x, _I64) for x in shape) and _int(a["offset"], _I64)
            and _int(a["nbytes"], _I64) and _int(a["xxh3"], _U64)
            and (head is None or _int(head, _U64))
            and a.get("byteorder", "<") in ("<", ">") and type(a.get("scalar", False)) is bool):
        return None
    return ArrayEntry(str(file_no[a["file"]]), a["name"], a["dtype"], tuple(shape), a["offset"],
                      a["nbytes"], a["xxh3"], a.get("byteorder", "<"), a.get("scalar", False),
                      head)


def as_table(arrays: Any, files: Any, before: list[str] | None = None) -> dict | None:
    """The v3 table of the entry maps ``arrays``, or None when a value fits no column.

    ``files``: the body's ``files``; ``before``: the file names before a mutation (a name no
    longer listed refers to the file now at its former position)."""
    if type(arrays) is not list or type(files) is not list or not all(
            type(f) is dict and type(f.get("name")) is str for f in files):
        return None
    names = [f["name"] for f in files]
    file_no: dict[str, int] = {}
    for k, nm in enumerate(before or []):
        if k < len(names):
            file_no[nm] = k
    for k, nm in reversed(list(enumerate(names))):
        file_no[nm] = k
    entries = [_entry(a, file_no) for a in arrays]
    if any(e is None for e in entries):
        return None
    return columns.encode(entries, [str(k) for k in range(len(names))])  # type: ignore[arg-type]


def rewrite_body(path: str | os.PathLike, mutate: Callable[[dict], Any]) -> int:
    """Apply ``mutate(body)`` to the body with its entries as v2 maps; write it back, as a v3
    table when the entries fit its columns, else as a v2 manifest (see the module docstring).
    A v1 or v2 checkpoint stays in its version.  Returns the version written."""
    outer, body = read(path)
    version = outer["unickpt"]
    before = [f["name"] for f in body["files"]]
    body["arrays"] = entries_of(body)
    mutate(body)
    if version >= 3 and "arrays" in body:
        table = as_table(body["arrays"], body.get("files"), before)
        if table is not None:
            body["arrays"] = table
        else:
            version = outer["unickpt"] = 2
            if body.get("format_version") == 3:
                body["format_version"] = 2
    write(path, outer, body)
    return version


def rewrite_raw(path: str | os.PathLike, mutate: Callable[[dict], Any]) -> None:
    """Apply ``mutate(body)`` to the body as stored (a v3 body's ``arrays`` is the table)."""
    outer, body = read(path)
    mutate(body)
    write(path, outer, body)


def write_version(path: str | os.PathLike, version: int) -> None:
    """Rewrite the manifest in the encoding of ``version`` (2 or 3), nothing else changed."""
    outer, body = read(path)
    before = [f["name"] for f in body["files"]]
    entries = entries_of(body)
    body["arrays"] = entries if version < 3 else as_table(entries, body["files"], before)
    outer["unickpt"] = body["format_version"] = version
    write(path, outer, body)
