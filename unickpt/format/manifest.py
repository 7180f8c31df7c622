"""The msgpack manifest: encoding of the tree structure and its validation on read.

The manifest file is a msgpack map ``{"unickpt": <format version>, "xxh3": <u64>, "body":
<bin>}`` whose ``body`` is itself msgpack (the manifest proper).  The outer map lets a reader
check the version before decoding anything else and detect any corruption of the body.
docs/FORMAT.md is the normative description; this module implements it.
"""

from __future__ import annotations

import math
import operator
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, cast

import msgpack
import numpy as np

from ..errors import CorruptCheckpointError, FormatVersionError
from ..tree import Path, format_path
from . import checksum, columns
from .bigint import MAX_BIG_INT_CHARS, decimal_to_int, encode_big_int, int_to_decimal
from .dtypes import UnsupportedDtype, dtype_from_name, has_byteorder
from .table import (
    MAX_NDIM,
    UINT64_MAX,
    ArrayEntry,
    ArrayTable,
    fast_table,
    optional_array_fields,
)

FORMAT_VERSION = 3  # written; v2 added the header checksum, v3 the columnar array table
READABLE_VERSIONS = (1, 2, 3)
MANIFEST_NAME = "manifest.msgpack"
MAX_MANIFEST_BYTES = 1 << 30  # 1 GiB: far above any real manifest, bounds a hostile one
MAX_DEPTH = 256  # tree nesting; the writer refuses deeper trees
_INT64_MIN, _UINT64_MAX = -(1 << 63), UINT64_MAX
_BIG_INT = re.compile(r"-?(0|[1-9][0-9]*)\Z")  # int() alone would accept "1_0", " 7", "+7"


@dataclass
class ShardedEntry:
    """A sharded array: its global shape/dtype and the array entries of its pieces."""

    dtype: str
    shape: tuple[int, ...]
    pieces: list[tuple[tuple[tuple[int, int], ...], int]]  # (index, array entry number)
    byteorder: str = "<"  # of the global array as the user gave it

    def to_msg(self) -> dict:
        d = {"dtype": self.dtype, "shape": list(self.shape),
             "pieces": [{"index": [list(b) for b in idx], "array": a} for idx, a in self.pieces]}
        if self.byteorder != "<":
            d["byteorder"] = self.byteorder
        return d


@dataclass
class FileEntry:
    """One array file: its size, where its data starts, and (v2 on) its header's checksum."""

    name: str
    size: int
    data_start: int
    header_xxh3: int | None = None  # xxh3-64 of bytes [0, data_start); None in v1 manifests

    def to_msg(self) -> dict:
        d = {"name": self.name, "size": self.size, "data_start": self.data_start}
        if self.header_xxh3 is not None:
            d["header_xxh3"] = self.header_xxh3
        return d


@dataclass
class Manifest:
    """A decoded, validated manifest."""

    format_version: int
    library_version: str
    tree: Any  # the encoded node (see encode_node)
    arrays: Sequence[ArrayEntry]  # an ArrayTable when read or written by the writer
    sharded: list[ShardedEntry]
    files: list[FileEntry]
    kinds: dict[Path, str] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """The manifest file, in ``format_version``'s encoding (v3: the array table)."""
        arrays: Any = (columns.encode(self.arrays, [f.name for f in self.files])
                       if self.format_version >= 3 else [a.to_msg() for a in self.arrays])
        body = {
            "format_version": self.format_version,
            "library_version": self.library_version,
            "checksum": "xxh3_64",
            "tree": self.tree,
            "arrays": arrays,
            "sharded": [s.to_msg() for s in self.sharded],
            "files": [f.to_msg() for f in self.files],
            "kinds": [[list(p), k] for p, k in self.kinds.items()],
            "metadata": self.metadata,
            "info": self.info,
        }
        raw = msgpack.packb(body, use_bin_type=True, strict_types=False)
        return msgpack.packb({"unickpt": self.format_version, "xxh3": checksum.digest(raw),
                              "body": raw}, use_bin_type=True)


# --------------------------------------------------------------------------- tree nodes
# A node is either a plain msgpack scalar (nil, bool, int within 64 bits, float64, str, bin),
# or a two/three-element list whose first item is a one-letter tag:
#   ["d", [k0, v0, k1, v1, ...]]   dict (keys str or int)
#   ["l", [n0, n1, ...]]           list
#   ["t", [n0, n1, ...]]           tuple
#   ["a", i]                       array entry i
#   ["s", i]                       sharded entry i
#   ["i", "<decimal>"]             int outside the 64-bit range

_PLAIN = frozenset({type(None), bool, int, float, str, bytes})  # msgpack's scalar types


def decode_node(node: Any, ctx: DecodeContext, path: Path = (), depth: int = 0) -> Any:
    """Turn an encoded node back into a tree of values, calling ``ctx`` for arrays."""
    if depth > MAX_DEPTH:
        ctx.fail(f"tree deeper than {MAX_DEPTH} levels at {format_path(path)}")
    if not isinstance(node, list):
        if node is None or isinstance(node, (bool, int, float, str, bytes)):
            return node
        ctx.fail(f"unexpected {type(node).__name__} node at {format_path(path)}")
    if len(node) != 2 or not isinstance(node[0], str):
        ctx.fail(f"malformed node at {format_path(path)}")
    tag, payload = node
    if tag == "d":
        if not isinstance(payload, list) or len(payload) % 2:
            ctx.fail(f"malformed dict node at {format_path(path)}")
        if ctx.ref is not None and depth < MAX_DEPTH:
            refs = _all_array_refs(payload, len(ctx.manifest.arrays), ctx.ref)
            if refs is not None:
                return refs
        out: dict = {}
        # The common children (scalars and array references) are decoded inline, with the
        # same checks decode_node would make: with 10^4 leaves the call per leaf shows.
        inline = depth < MAX_DEPTH
        narrays = len(ctx.manifest.arrays)
        array, ref = ctx.array, ctx.ref
        for i in range(0, len(payload), 2):
            k = payload[i]
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                ctx.fail(f"dict key of type {type(k).__name__} at {format_path(path)}")
            if k in out:
                ctx.fail(f"duplicate key {k!r} at {format_path(path)}")
            v = payload[i + 1]
            t = type(v)
            if inline and t is list and len(v) == 2 and v[0] == "a" and type(v[1]) is int \
                    and 0 <= v[1] < narrays:
                out[k] = ref(v[1]) if ref is not None else array(v[1], (*path, k))
            elif inline and t in _PLAIN:
                out[k] = v
            else:
                out[k] = decode_node(v, ctx, (*path, k), depth + 1)
        return out
    if tag in ("l", "t"):
        if not isinstance(payload, list):
            ctx.fail(f"malformed sequence node at {format_path(path)}")
        items = [decode_node(v, ctx, (*path, i), depth + 1) for i, v in enumerate(payload)]
        return items if tag == "l" else tuple(items)
    if tag == "a":
        return ctx.array(_index(payload, len(ctx.manifest.arrays), ctx, path), path)
    if tag == "s":
        return ctx.sharded(_index(payload, len(ctx.manifest.sharded), ctx, path), path)
    if tag == "i":
        if (not isinstance(payload, str) or len(payload) > MAX_BIG_INT_CHARS
                or not _BIG_INT.match(payload)):
            ctx.fail(f"malformed big int at {format_path(path)}")
        return decimal_to_int(payload)
    ctx.fail(f"unknown node tag {tag!r} at {format_path(path)}")


_first, _second = operator.itemgetter(0), operator.itemgetter(1)


def _all_array_refs(payload: list, narrays: int, ref: Callable[[int], Any]) -> dict | None:
    """A dict node whose keys are distinct str/int and whose values are all valid array
    references (a layer's parameters, an optimizer's moments), decoded with ``map`` and no
    Python-level loop; None for any other dict node (the loop in decode_node decides)."""
    first = payload[1] if payload else None
    if type(first) is not list or len(first) != 2 or first[0] != "a":
        return None  # a mixed dict (its first value is not a reference): the loop
    keys, vals = payload[0::2], payload[1::2]
    try:  # a tag that is a list or a map cannot go in a set: not an array reference
        if not vals or set(map(type, keys)) - {str, int} or set(map(type, vals)) != {list} \
                or set(map(len, vals)) != {2} or set(map(_first, vals)) != {"a"}:
            return None
    except TypeError:
        return None
    idx = list(map(_second, vals))
    if set(map(type, idx)) != {int} or min(idx) < 0 or max(idx) >= narrays:
        return None
    out = dict(zip(keys, map(ref, idx)))
    return out if len(out) == len(keys) else None  # a duplicate key: the loop names it


def _index(payload: Any, n: int, ctx: DecodeContext, path: Path) -> int:
    if isinstance(payload, bool) or not isinstance(payload, int) or not 0 <= payload < n:
        ctx.fail(f"array reference {payload!r} out of range at {format_path(path)}")
    return payload


class DecodeContext:
    """Callbacks used by :func:`decode_node`: the reader supplies the array factories.

    ``array(i, path)`` and ``sharded(i, path)`` return what stands in the tree for array entry
    ``i`` and sharded entry ``i``; ``fail`` raises the reader's ``CorruptCheckpointError``.
    ``ref(i)``, if given, stands in for ``array(i, path)`` where the caller does not need the
    path (it saves making one tuple per array; the reader finds paths later if it must).
    """

    def __init__(self, manifest: Manifest, where: object, array, sharded, ref=None):
        self.manifest, self.where = manifest, where
        self.array, self.sharded, self.ref = array, sharded, ref

    def fail(self, msg: str):
        raise CorruptCheckpointError(f"{self.where}: corrupt manifest: {msg}", path=self.where)


# --------------------------------------------------------------------------- reading
def read_manifest_bytes(raw: bytes, where: object) -> Manifest:
    """Decode and validate manifest bytes; every problem is a ``CorruptCheckpointError``."""

    def fail(msg: str):
        raise CorruptCheckpointError(f"{where}: corrupt manifest: {msg}", path=where)

    try:
        outer = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        fail(f"not a msgpack document ({type(e).__name__}: {e})")
    if not isinstance(outer, dict) or "unickpt" not in outer:
        fail("not a unickpt manifest (no 'unickpt' version field)")
    version = outer["unickpt"]
    if isinstance(version, bool) or not isinstance(version, int):
        fail("format version is not an integer")
    if version not in READABLE_VERSIONS:
        raise FormatVersionError(
            f"{where}: format version {version} is not readable by this unickpt "
            f"(reads versions {', '.join(map(str, READABLE_VERSIONS))}); upgrade unickpt to "
            "read it", path=where)
    body = outer.get("body")
    if not isinstance(body, bytes):
        fail("missing body")
    # Without xxhash the body cannot be checked; the reader warns that nothing was verified.
    if checksum.available() and outer.get("xxh3") != checksum.digest(body):
        fail("manifest checksum mismatch (the manifest file is damaged)")
    try:
        m = msgpack.unpackb(body, raw=False, strict_map_key=False,
                            use_list=True)
    except Exception as e:
        fail(f"body is not msgpack ({type(e).__name__})")
    if not isinstance(m, dict):
        fail("body is not a map")
    if m.get("format_version") != version:
        fail(f"body format_version {m.get('format_version')!r} differs from the outer {version}")
    if "tree" not in m:
        fail("field 'tree' missing")
    if m.get("checksum", "xxh3_64") != "xxh3_64":
        fail(f"unknown checksum algorithm {m.get('checksum')!r}")
    return _validate(m, fail)


_ARRAY_FIELDS = (("file", str), ("dtype", str), ("shape", list), ("nbytes", int),
                 ("offset", int), ("xxh3", int), ("name", str))
# The piece-overlap check compresses each dimension to the distinct piece boundaries and marks
# the resulting grid cells; a sharded entry whose pieces would make more cells than this is
# refused (grid-aligned shardings make exactly one cell per piece).
MAX_GRID_CELLS = 1 << 24


def _need(fail: Callable[[str], NoReturn], d: dict, key: str, typ: type, what: str) -> Any:
    v = d.get(key)
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        fail(f"{what}: field {key!r} missing or of the wrong type")
    return v


def _validate(m: dict, fail: Callable[[str], NoReturn]) -> Manifest:
    """Check every field of a decoded manifest body, one named step per section."""
    files = _validate_files(m, fail)
    arrays = _validate_arrays(m, fail, {f.name: f for f in files})
    sharded = _validate_sharded(m, fail, arrays)
    kinds = _validate_kinds(m, fail)
    metadata, info = m.get("metadata", {}), m.get("info", {})
    if not isinstance(metadata, dict) or not isinstance(info, dict):
        fail("metadata/info must be maps")
    return Manifest(
        format_version=_need(fail, m, "format_version", int, "manifest"),
        library_version=str(m.get("library_version", "")),
        tree=m.get("tree"),
        arrays=arrays, sharded=sharded, files=files, kinds=kinds, metadata=metadata, info=info)


def _validate_files(m: dict, fail: Callable[[str], NoReturn]) -> list[FileEntry]:
    files: list[FileEntry] = []
    names: set[str] = set()
    version = m.get("format_version")
    for f in _need(fail, m, "files", list, "manifest"):
        if not isinstance(f, dict):
            fail("file entry is not a map")
        name = _need(fail, f, "name", str, "file entry")
        if not _safe_file_name(name):
            fail(f"file name {name!r} is not a plain file name inside the checkpoint")
        if name in names:
            fail(f"file {name!r} listed twice")
        names.add(name)
        size, start = _need(fail, f, "size", int, name), _need(fail, f, "data_start", int, name)
        if not 8 <= start <= size and not (version == 1 and 0 <= start <= size):
            fail(f"file {name!r}: data_start {start} outside its size {size}")
        header_xxh3 = None
        if version != 1:  # v2 on: the safetensors header has its own checksum
            header_xxh3 = _need(fail, f, "header_xxh3", int, name)
            if not 0 <= header_xxh3 <= _UINT64_MAX:
                fail(f"file {name!r}: header checksum out of range")
        files.append(FileEntry(name, size, start, header_xxh3))
    return files


def _validate_arrays(m: dict, fail: Callable[[str], NoReturn],
                     file_by_name: dict[str, FileEntry]) -> ArrayTable:
    # Column by column when every entry is valid (the common case); entry by entry, naming
    # the first bad one, otherwise: the same entries and the same errors either way.
    spans = {f.name: (f.data_start, f.size) for f in file_by_name.values()}
    if m.get("format_version", 0) >= 3:  # the array table (v3): structure first
        cols = columns.decode(m.get("arrays"), list(file_by_name), fail)
        table = columns.table(cols, spans)
        if table is not None:
            return table
        raw_arrays = columns.as_entries(cols)
    else:
        raw_arrays = _need(fail, m, "arrays", list, "manifest")
        table = fast_table(raw_arrays, spans)
        if table is not None:
            return table
    return _validate_entries(raw_arrays, fail, file_by_name)


def _validate_entries(raw_arrays: list, fail: Callable[[str], NoReturn],
                      file_by_name: dict[str, FileEntry]) -> ArrayTable:
    """The entry-by-entry validation of v2 entry maps: names the first bad entry."""
    arrays: list[ArrayEntry] = []
    # Per-dtype facts, looked up once per distinct name (a manifest can hold 10^5 arrays of a
    # handful of dtypes): (dtype, item size, may be big-endian) or the refusal message.
    dtypes: dict[str, tuple[np.dtype, int, bool, int] | str] = {}
    # file -> (offsets, ends, array numbers), in array order
    spans: dict[str, tuple[list[int], list[int], list[int]]] = {}
    last_file: str | None = None
    starts: list[int] = []
    ends: list[int] = []
    numbers: list[int] = []
    uint64_max = _UINT64_MAX
    for i, a in enumerate(raw_arrays):
        if not isinstance(a, dict):
            fail(f"array entry {i} is not a map")
        # Fast path: check every field's type at once, build error labels only if one is wrong
        get: Any = a.get  # raw msgpack values (Any, not Optional): their types are checked here
        fname, dname, shape_raw = get("file"), get("dtype"), get("shape")
        nbytes, offset, xxh, tname = get("nbytes"), get("offset"), get("xxh3"), get("name")
        if not (type(fname) is str and type(dname) is str and type(shape_raw) is list
                and type(nbytes) is int and type(offset) is int and type(xxh) is int  # not bool
                and type(tname) is str):
            for key, typ in _ARRAY_FIELDS:
                _need(fail, a, key, typ, f"array {i}")
        fe = file_by_name.get(fname)
        if fe is None:
            fail(f"array {i} refers to unlisted file {fname!r}")
        facts = dtypes.get(dname)
        if facts is None:
            try:
                dt = dtype_from_name(dname)
                facts = dtypes[dname] = (dt, dt.itemsize, has_byteorder(dt),
                                         max(dt.itemsize, 1))
            except UnsupportedDtype as e:
                facts = dtypes[dname] = str(e)
        if isinstance(facts, str):  # the refusal message (a plain str)
            fail(f"array {i}: {facts}")
        dt, itemsize, swappable, itemsize1 = facts
        # _shape inlined (same checks, same order): one call less per array
        if len(shape_raw) > MAX_NDIM:
            fail(f"array {i}: {len(shape_raw)} dimensions (limit {MAX_NDIM})")
        count, nonzero = 1, 1
        for x in shape_raw:
            if type(x) is not int or not 0 <= x < (1 << 62):  # type() check also rules out bool
                fail(f"array {i}: shape {shape_raw!r} is not a list of non-negative integers")
            count *= x
            if x:
                nonzero *= x
        if nonzero * itemsize1 >= (1 << 62):
            fail(f"array {i}: shape {shape_raw!r} is absurdly large (non-zero dimensions times "
                 f"the item size reach 2**62 bytes)")
        shape = tuple(shape_raw)
        if count * itemsize != nbytes:
            fail(f"array {i}: nbytes {nbytes} does not match shape {shape} of {dt.name}")
        end = offset + nbytes
        if offset < fe.data_start or end > fe.size:
            fail(f"array {i}: bytes [{offset}, {end}) lie outside file {fname!r}")
        if not 0 <= xxh <= uint64_max:
            fail(f"array {i}: checksum out of range")
        bo, scalar, head = optional_array_fields(a, i, shape, swappable, fail)
        if fname != last_file:  # arrays of one file come in runs: one lookup per run
            last_file = fname
            starts, ends, numbers = spans.get(fname) or spans.setdefault(fname, ([], [], []))
        starts.append(offset)
        ends.append(end)
        numbers.append(i)
        arrays.append(ArrayEntry(fname, tname, dname, shape, offset, nbytes, xxh, bo, scalar,
                                 head))
    for fname, (file_starts, file_ends, file_numbers) in spans.items():
        pair = _first_overlap(file_starts, file_ends)
        if pair is not None:
            fail(f"arrays {file_numbers[pair[0]]} and {file_numbers[pair[1]]} overlap in file "
                 f"{fname!r}")
    return ArrayTable.from_entries(arrays)


def _first_overlap(starts: list[int], ends: list[int]) -> tuple[int, int] | None:
    """The first overlapping pair (positions in the lists) in (start, end, position) order.

    None if no two ranges overlap.

    Writers lay arrays out in increasing offsets mostly, and the ranges lie inside a file
    (so below 2**63): one vectorised sort and comparison instead of a tuple per array.
    """
    n = len(starts)
    if n < 2:
        return None
    if max(ends) >= (1 << 63):  # a hostile file size: the simple way, with Python ints
        sp = sorted(zip(starts, ends, range(n)))
        for (_s0, e0, i0), (s1, _e1, i1) in zip(sp, sp[1:]):
            if s1 < e0:
                return i0, i1
        return None
    s = np.array(starts, np.int64)
    e = np.array(ends, np.int64)
    order = np.lexsort((np.arange(n), e, s))  # by start, then end, then index
    s, e = s[order], e[order]
    bad = np.flatnonzero(s[1:] < e[:-1])
    if not len(bad):
        return None
    k = int(bad[0])
    return int(order[k]), int(order[k + 1])


def _validate_sharded(m: dict, fail: Callable[[str], NoReturn],
                      arrays: Sequence[ArrayEntry]) -> list[ShardedEntry]:
    sharded = []
    used: set[int] = set()  # array entries already used by a piece (each may serve one piece)
    for i, s in enumerate(_need(fail, m, "sharded", list, "manifest")):
        if not isinstance(s, dict):
            fail(f"sharded entry {i} is not a map")
        dname = _need(fail, s, "dtype", str, f"sharded {i}")
        try:
            dt = dtype_from_name(dname)
        except UnsupportedDtype as e:
            fail(f"sharded {i}: {e}")
        gshape = _shape(_need(fail, s, "shape", list, f"sharded {i}"), fail, f"sharded {i}",
                        dt.itemsize)
        pieces = []
        covered = 0
        for p in _need(fail, s, "pieces", list, f"sharded {i}"):
            if not isinstance(p, dict):
                fail(f"sharded {i}: piece is not a map")
            bounds = _piece_bounds(_need(fail, p, "index", list, f"sharded {i} piece"), gshape,
                                   fail, i)
            ai = p.get("array")
            if isinstance(ai, bool) or not isinstance(ai, int) or not 0 <= ai < len(arrays):
                fail(f"sharded {i}: piece refers to a missing array")
            if ai in used:
                fail(f"sharded {i}: array {ai} is used by more than one piece")
            used.add(ai)
            ae = arrays[ai]
            if ae.shape != tuple(b - a0 for a0, b in bounds) or ae.dtype != dname:
                fail(f"sharded {i}: piece array {ai} does not match its index/dtype")
            covered += math.prod(b - a0 for a0, b in bounds)
            pieces.append((bounds, ai))
        if covered != math.prod(gshape):
            fail(f"sharded {i}: pieces cover {covered} of {math.prod(gshape)} elements")
        check_no_overlap([b for b, _ in pieces], gshape, fail, i)
        sbo = s.get("byteorder", "<")
        if sbo not in ("<", ">") or (sbo == ">" and not has_byteorder(dt)):
            fail(f"sharded {i}: byteorder {sbo!r}")
        sharded.append(ShardedEntry(dname, gshape, pieces, sbo))
    return sharded


def _piece_bounds(idx: list, gshape: tuple[int, ...], fail: Callable[[str], NoReturn],
                  i: int) -> tuple[tuple[int, int], ...]:
    if len(idx) != len(gshape) or not all(
            isinstance(b, list) and len(b) == 2 and all(
                type(x) is int for x in b) for b in idx):
        fail(f"sharded {i}: malformed piece index")
    bounds = tuple((a0, b0) for a0, b0 in idx)
    if any(not 0 <= a0 <= b0 <= n for (a0, b0), n in zip(bounds, gshape)):
        fail(f"sharded {i}: piece index {bounds} outside global shape {gshape}")
    return bounds


def check_no_overlap(boxes: list[tuple[tuple[int, int], ...]], gshape: tuple[int, ...],
                      fail: Callable[[str], NoReturn], i: int) -> None:
    """Fail if two non-empty pieces overlap (the caller has checked that volumes add up).

    Exact and O(n log n + cells): every dimension is cut at the distinct piece boundaries,
    each piece marks the grid cells it spans, and a cell marked twice is an overlap.  Pairwise
    comparison was quadratic (4,000 pieces took ~10 s).
    """
    if len(boxes) < 2 or not gshape:  # a 0-d array has one element: the volume check sufficed
        return
    arr = np.array(boxes, np.int64).reshape(len(boxes), len(gshape), 2)  # bounds < 2**62
    keep = (arr[:, :, 0] < arr[:, :, 1]).all(axis=1)  # empty pieces cover nothing
    if not keep.all():
        arr = arr[keep]
        boxes = [b for b, k in zip(boxes, cast("list[bool]", keep.tolist())) if k]
    if len(boxes) < 2:
        return
    cuts = [_distinct(arr[:, d, :]) for d in range(len(gshape))]
    cells = math.prod(len(c) - 1 for c in cuts)
    if cells > MAX_GRID_CELLS:
        fail(f"sharded {i}: pieces cut the array into {cells} grid cells (limit "
             f"{MAX_GRID_CELLS}); save it with fewer or grid-aligned pieces")
    lo = np.stack([np.searchsorted(c, arr[:, d, 0]) for d, c in enumerate(cuts)], axis=1)
    hi = np.stack([np.searchsorted(c, arr[:, d, 1]) for d, c in enumerate(cuts)], axis=1)
    dims = [len(c) - 1 for c in cuts]
    if bool((hi - lo == 1).all()):  # one cell per piece (any grid-aligned sharding): vectorized
        flat = np.sort(np.ravel_multi_index(tuple(lo.T), dims))
        if not (flat[1:] == flat[:-1]).any():
            return
    grid = np.zeros(dims, np.uint8)
    for k, b in enumerate(boxes):
        view = grid[tuple(slice(a, z) for a, z in zip(lo[k].tolist(), hi[k].tolist()))]
        if view.any():
            fail(f"sharded {i}: piece {b} overlaps another piece")
        view[...] = 1


def _distinct(x: np.ndarray) -> np.ndarray:
    """Sorted distinct values (np.unique's hash path is several times slower here)."""
    x = np.sort(x, axis=None)
    return x[np.concatenate(([True], x[1:] != x[:-1]))]


def _validate_kinds(m: dict, fail: Callable[[str], NoReturn]) -> dict[Path, str]:
    kinds = {}
    kinds_raw = m.get("kinds", [])
    if not isinstance(kinds_raw, list):
        fail("kinds must be a list")
    for item in kinds_raw:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], list)
                and isinstance(item[1], str) and all(
                    isinstance(k, (str, int)) and not isinstance(k, bool) for k in item[0])):
            fail("malformed kinds entry")
        kinds[tuple(item[0])] = item[1]
    return kinds


def _shape(v: list, fail: Callable[[str], NoReturn], what: str | int,
           itemsize: int) -> tuple[int, ...]:
    """Validate a shape; ``what`` names its owner (an int means array entry ``what``).

    numpy refuses to build even an empty array whose non-zero dimensions times the item size
    pass its size limit (``[0, 2**61]`` of float64), so the bound applies to them too.
    """
    label = f"array {what}" if isinstance(what, int) else what
    if len(v) > MAX_NDIM:
        fail(f"{label}: {len(v)} dimensions (limit {MAX_NDIM})")
    for x in v:
        if type(x) is not int or not 0 <= x < (1 << 62):  # type() check also rules out bool
            fail(f"{label}: shape {v!r} is not a list of non-negative integers")
    if math.prod(x for x in v if x) * max(itemsize, 1) >= (1 << 62):
        fail(f"{label}: shape {v!r} is absurdly large (non-zero dimensions times the item "
             f"size reach 2**62 bytes)")
    return tuple(v)


def _safe_file_name(name: str) -> bool:
    return (bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name
            and "\x00" not in name and os.path.basename(name) == name and len(name) < 256)


def check_int_range(x: int) -> bool:
    """Whether a Python int fits a msgpack integer (else it is stored as a decimal string)."""
    return _INT64_MIN <= x <= _UINT64_MAX


__all__ = ["Manifest", "ArrayEntry", "ArrayTable", "ShardedEntry", "FileEntry", "FORMAT_VERSION",
           "READABLE_VERSIONS", "DecodeContext", "check_no_overlap", "MAX_GRID_CELLS", "MAX_BIG_INT_CHARS",
           "MANIFEST_NAME", "read_manifest_bytes", "decode_node", "check_int_range",
           "encode_big_int", "decimal_to_int", "int_to_decimal"]
