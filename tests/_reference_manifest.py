"""Reference (simple, slow) manifest codec: the manifest module as it was before its fast paths.

Kept verbatim so tests can prove the fast encoder/decoder give the same bytes, the same
decoded manifest and the same errors.  Not part of unickpt.  Version 3's array table
(docs/FORMAT.md 4.1.2) is written and read by ``_reference_table``, from the spec alone: its
structure is checked there and it is turned into the v2 entry maps, which the unchanged
entry-by-entry validation here then checks.  The optional ``head_xxh3`` (4.1.1) is kept and
checked too.

The msgpack manifest: encoding of the tree structure and its validation on read.

The manifest file is a msgpack map ``{"unickpt": <format version>, "xxh3": <u64>, "body":
<bin>}`` whose ``body`` is itself msgpack (the manifest proper).  The outer map lets a reader
check the version before decoding anything else and detect any corruption of the body.
docs/FORMAT.md is the normative description; this module implements it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import msgpack
import numpy as np
from _reference_table import decode_table, encode_table

from unickpt.errors import CorruptCheckpointError, FormatVersionError
from unickpt.format import checksum
from unickpt.format.bigint import MAX_BIG_INT_CHARS, decimal_to_int, encode_big_int, int_to_decimal
from unickpt.format.dtypes import UnsupportedDtype, dtype_from_name, has_byteorder
from unickpt.tree import Path, format_path

FORMAT_VERSION = 3  # written; v2 added the header checksum (header_xxh3), v3 the array table
READABLE_VERSIONS = (1, 2, 3)
MANIFEST_NAME = "manifest.msgpack"
MAX_MANIFEST_BYTES = 1 << 30  # 1 GiB: far above any real manifest, bounds a hostile one
MAX_NDIM = 64
MAX_DEPTH = 256  # tree nesting; the writer refuses deeper trees
_INT64_MIN, _UINT64_MAX = -(1 << 63), (1 << 64) - 1
_BIG_INT = re.compile(r"-?(0|[1-9][0-9]*)\Z")  # int() alone would accept "1_0", " 7", "+7"


@dataclass
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
    head_xxh3: int | None = None  # xxh3-64 of the first 4096 bytes; optional

    def to_msg(self) -> dict:
        d = {"file": self.file, "name": self.name, "dtype": self.dtype, "shape": list(self.shape),
             "offset": self.offset, "nbytes": self.nbytes, "xxh3": self.xxh3}
        if self.byteorder != "<":
            d["byteorder"] = self.byteorder
        if self.scalar:
            d["scalar"] = True
        if self.head_xxh3 is not None:
            d["head_xxh3"] = self.head_xxh3
        return d


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
    arrays: list[ArrayEntry]
    sharded: list[ShardedEntry]
    files: list[FileEntry]
    kinds: dict[Path, str] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        body = {
            "format_version": self.format_version,
            "library_version": self.library_version,
            "checksum": "xxh3_64",
            "tree": self.tree,
            "arrays": (encode_table(self.arrays, [f.name for f in self.files])
                       if self.format_version >= 3 else [a.to_msg() for a in self.arrays]),
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
        out: dict = {}
        for i in range(0, len(payload), 2):
            k = payload[i]
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                ctx.fail(f"dict key of type {type(k).__name__} at {format_path(path)}")
            if k in out:
                ctx.fail(f"duplicate key {k!r} at {format_path(path)}")
            out[k] = decode_node(payload[i + 1], ctx, (*path, k), depth + 1)
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


def _index(payload: Any, n: int, ctx: DecodeContext, path: Path) -> int:
    if isinstance(payload, bool) or not isinstance(payload, int) or not 0 <= payload < n:
        ctx.fail(f"array reference {payload!r} out of range at {format_path(path)}")
    return payload


class DecodeContext:
    """Callbacks used by :func:`decode_node`: the reader supplies the array factories.

    ``array(i, path)`` and ``sharded(i, path)`` return what stands in the tree for array entry
    ``i`` and sharded entry ``i``; ``fail`` raises the reader's ``CorruptCheckpointError``.
    """

    def __init__(self, manifest: Manifest, where: object, array, sharded):
        self.manifest, self.where = manifest, where
        self.array, self.sharded = array, sharded

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
                     file_by_name: dict[str, FileEntry]) -> list[ArrayEntry]:
    if m["format_version"] >= 3:  # the array table: its structure, then every entry as in v2
        raw_arrays = decode_table(m.get("arrays"), list(file_by_name), fail)
    else:
        raw_arrays = _need(fail, m, "arrays", list, "manifest")
    arrays = []
    spans: dict[str, list[tuple[int, int, int]]] = {}
    for i, a in enumerate(raw_arrays):
        if not isinstance(a, dict):
            fail(f"array entry {i} is not a map")
        # Fast path for the common case (a manifest can hold 10^5 arrays): check every field's
        # type at once and build error labels only when something is wrong.  `type(x) is int`
        # also rules out bools.
        fname, dname, shape_raw = a.get("file"), a.get("dtype"), a.get("shape")
        nbytes, offset, xxh, tname = a.get("nbytes"), a.get("offset"), a.get("xxh3"), a.get("name")
        if not (type(fname) is str and type(dname) is str and type(shape_raw) is list
                and type(nbytes) is int and type(offset) is int and type(xxh) is int
                and type(tname) is str):
            for key, typ in _ARRAY_FIELDS:
                _need(fail, a, key, typ, f"array {i}")
        if fname not in file_by_name:
            fail(f"array {i} refers to unlisted file {fname!r}")
        try:
            dt = dtype_from_name(dname)
        except UnsupportedDtype as e:
            fail(f"array {i}: {e}")
        shape = _shape(shape_raw, fail, i, dt.itemsize)
        if math.prod(shape) * dt.itemsize != nbytes:
            fail(f"array {i}: nbytes {nbytes} does not match shape {shape} of {dt.name}")
        fe = file_by_name[fname]
        if offset < fe.data_start or offset + nbytes > fe.size:
            fail(f"array {i}: bytes [{offset}, {offset + nbytes}) lie outside file {fname!r}")
        if not 0 <= xxh <= _UINT64_MAX:
            fail(f"array {i}: checksum out of range")
        bo = a.get("byteorder", "<")
        if bo != "<" and (bo != ">" or not has_byteorder(dt)):
            fail(f"array {i}: byteorder {bo!r} for dtype {a['dtype']}")
        scalar = a.get("scalar", False)
        if scalar is not False and (scalar is not True or shape != ()):
            fail(f"array {i}: 'scalar' must be a bool, true only for shape []")
        head = a.get("head_xxh3")
        if head is not None and (type(head) is not int or not 0 <= head <= _UINT64_MAX):
            fail(f"array {i}: head_xxh3 is not a uint64")
        spans.setdefault(fname, []).append((offset, offset + nbytes, i))
        arrays.append(ArrayEntry(fname, tname, dname, shape, offset, nbytes, xxh, bo, scalar,
                                 head))
    for fname, sp in spans.items():
        sp.sort()
        for (_s0, e0, i0), (s1, _e1, i1) in zip(sp, sp[1:]):
            if s1 < e0:
                fail(f"arrays {i0} and {i1} overlap in file {fname!r}")
    return arrays


def _validate_sharded(m: dict, fail: Callable[[str], NoReturn],
                      arrays: list[ArrayEntry]) -> list[ShardedEntry]:
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
        boxes = [b for b, k in zip(boxes, keep.tolist()) if k]
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


__all__ = ["Manifest", "ArrayEntry", "ShardedEntry", "FileEntry", "FORMAT_VERSION",
           "READABLE_VERSIONS", "DecodeContext", "check_no_overlap", "MAX_GRID_CELLS", "MAX_BIG_INT_CHARS",
           "MANIFEST_NAME", "read_manifest_bytes", "decode_node", "check_int_range",
           "encode_big_int", "decimal_to_int", "int_to_decimal"]
