"""State tree -> array jobs: the walk that classifies and validates every leaf of a save.

:func:`flatten` encodes the tree's structure for the manifest and makes one :class:`Job`
per array, refusing anything that cannot be saved (an unknown object, an unsupported dtype,
a key that is not a str or 64-bit int, an invalid string, a cycle) before a byte is written.
The writer (:mod:`unickpt.format.writer`) lays the jobs out and writes them.

>>> import numpy as np
>>> node, jobs, sharded = flatten({"w": np.zeros(2, np.float32), "step": 3})
>>> node, [(j.path, j.nbytes) for j in jobs]
(['d', ['w', ['a', 0], 'step', 3]], [(('w',), 8)])
"""

from __future__ import annotations

import math
from typing import Any, cast

import numpy as np

from ..errors import UnsupportedLeafError
from ..tree import LazyArray, Path, ShardedArray, format_path
from .dtypes import UnsupportedDtype, dtype_name, safetensors_code
from .gcpause import gc_paused
from .manifest import MAX_DEPTH, ArrayEntry, check_int_range, encode_big_int

HEADER_ALIGN = 64

class Job:
    """One array to write: where it sits in the tree and (after layout) where its bytes go.

    A plain class with slots, not a dataclass: one is made per array, so with 10,000 small
    leaves its construction is part of every save.  The writer keeps an array's manifest
    entry as fields of its job (``name``, ``file`` and ``offset`` set by layout, ``xxh3`` and
    ``head_xxh3`` by the write) and builds the manifest's columns from them, with no
    :class:`ArrayEntry` object per array; :attr:`entry` makes one when asked.
    """

    __slots__ = ("path", "array", "dtype", "shape", "scalar", "info", "nbytes", "prehash",
                 "key", "name", "file", "offset", "xxh3", "head_xxh3")

    def __init__(self, path: Path, array: Any, dtype: np.dtype, shape: tuple[int, ...],
                 scalar: bool, info: tuple[str, str, bool, str, int], nbytes: int,
                 key: str | None = None):
        # (every argument given by the caller, nothing computed here: flatten makes one
        # job per array, inline for the common leaf, and _job for the others)
        self.path = path
        self.array = array  # np.ndarray, or a zero-arg callable returning one (lazy host copy)
        self.dtype = dtype
        self.shape = shape
        self.scalar = scalar
        self.info = info  # dtype_info(dtype)
        self.nbytes = nbytes
        # the path joined with "/" when flatten had it at hand (None: layout joins it)
        self.key = key
        self.prehash: int | None = None  # full xxh3, when a sharing check already computed it
        # name, file, offset: set by layout() before anything reads them; xxh3 by the write
        # (slots left unset until then: no stores per array here)
        self.head_xxh3: int | None = None

    # declared for type checkers; the values live in the slots above
    name: str
    file: str
    offset: int
    xxh3: int

    @property
    def entry(self) -> ArrayEntry:
        """This array's manifest entry (a new object per call; after layout and write)."""
        return ArrayEntry(self.file, self.name, self.info[0], self.shape, self.offset,
                          self.nbytes, self.xxh3, self.info[3], self.scalar, self.head_xxh3)


def flatten(tree: Any) -> tuple[Any, list[Job], list]:
    """Encode the structure of ``tree`` and collect its arrays, validating every leaf.

    Returns ``(node, jobs, sharded)`` where ``sharded`` holds ``(ShardedArray, [job idx])``.
    """
    with gc_paused():
        return _flatten(tree)


def _flatten(tree: Any) -> tuple[Any, list[Job], list]:
    jobs: list[Job] = []
    sharded: list[tuple[ShardedArray, list[int]]] = []
    seen: set[int] = set()

    def add_array(arr: Any, path: Path, scalar: bool = False) -> int:
        jobs.append(_job(arr, path, scalar))
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
            check_utf8(x, path)
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
                    # the tensor-name prefix of this dict's arrays, joined once per dict
                    pre = "/".join(map(str, path)) + "/" if path else ""
                    for k, v in x.items():
                        if type(k) is str and k.isascii():  # the common key: valid UTF-8
                            flat.append(k)
                            # the common leaf, as enc and add_array would take it, inline
                            if type(v) is np.ndarray and (info := _INFO.get(v.dtype)):
                                jobs.append(Job((*path, k), v, v.dtype, v.shape, False, info,
                                                 v.nbytes, pre + k))
                                flat.append(["a", len(jobs) - 1])
                            else:
                                flat.append(enc(v, (*path, k)))
                            continue
                        _check_key(k, path)
                        flat.append(k)
                        flat.append(enc(v, (*path, k)))
                    return ["d", flat]
                if type(x) not in (list, tuple):
                    raise _not_a_leaf(x, path)
                return ["l" if isinstance(x, list) else "t",
                        [enc(v, (*path, i)) for i, v in enumerate(x)]]
            finally:
                seen.discard(id(x))
        raise _not_a_leaf(x, path)

    try:
        return enc(tree, ()), jobs, sharded
    finally:  # enc's closure cell refers to enc: clear it, so refcounting frees the jobs
        enc = add_array = cast(Any, None)  # noqa: F841


def _job(arr: Any, path: Path, scalar: bool) -> Job:
    """The job of one array leaf (ndarray or LazyArray); refuses an unsupported dtype."""
    dt = arr.dtype
    info = _INFO.get(dt)  # per-dtype facts, cached: a dict lookup per array
    if info is None:
        try:
            info = dtype_info(dt)
        except UnsupportedDtype as e:
            raise UnsupportedLeafError(f"cannot save {format_path(path)}: {e}") from None
    if type(arr) is np.ndarray:  # shape already a tuple of ints; nbytes = size * itemsize
        return Job(path, arr, dt, arr.shape, scalar, info, arr.nbytes)
    shape = tuple(map(int, arr.shape))
    return Job(path, arr, dt, shape, scalar, info, math.prod(shape) * dt.itemsize)


def _not_a_leaf(x: Any, path: Path) -> UnsupportedLeafError:
    """The error for a value nothing can save (a list/tuple subclass, an unknown object)."""
    if isinstance(x, (list, tuple)):
        return UnsupportedLeafError(
            f"cannot save {format_path(path)}: {type(x).__name__} is a "
            f"{'tuple' if isinstance(x, tuple) else 'list'} subclass; no adapter "
            "claims it (convert it to a plain tuple/dict, or register an adapter)")
    return UnsupportedLeafError(
        f"cannot save {format_path(path)}: value of type {type(x).__module__}."
        f"{type(x).__qualname__} is not a state-tree leaf and no adapter claims it. Use "
        "numpy arrays / Python scalars, give the object state_dict()/load_state_dict(), or "
        "install the adapter for its framework")


def _check_key(k: Any, path: Path) -> None:
    """Dict keys are str (valid Unicode) or 64-bit ints."""
    if isinstance(k, bool) or not isinstance(k, (str, int)) or (
            isinstance(k, int) and not check_int_range(k)):
        raise UnsupportedLeafError(
            f"cannot save {format_path(path)}: dict key {k!r} of type "
            f"{type(k).__name__} (keys must be str or 64-bit int)")
    if isinstance(k, str):
        check_utf8(k, path)


def check_utf8(s: str, path: Path) -> None:
    """Strings are stored as UTF-8: refuse lone surrogates before anything is written."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsupportedLeafError(
            f"cannot save {format_path(path)}: string {s[:40]!r} is not valid Unicode (lone "
            "surrogate); store it as bytes") from None


_INFO: dict[np.dtype, tuple[str, str, bool, str, int]] = {}


def dtype_info(dt: np.dtype) -> tuple[str, str, bool, str, int]:
    """(manifest name, safetensors code, header keeps the shape, byte order, alignment)."""
    info = _INFO.get(dt)
    if info is None:
        name = dtype_name(dt)  # raises UnsupportedDtype: nothing is cached then
        code = safetensors_code(name)
        info = (name, code, code != "U8" or name == "uint8", ">" if dt.byteorder == ">" else "<",
                _align(dt.itemsize))
        if len(_INFO) < 1024:  # bounded: structured/void dtypes can be many
            _INFO[dt] = info
    return info


def _align(itemsize: int) -> int:
    return min(itemsize & -itemsize, HEADER_ALIGN) if itemsize else HEADER_ALIGN


def plain_data(x: Any, what: str, path: Path = ()) -> Any:
    """Check that user metadata is plain msgpack data (no arrays, no objects); a copy."""
    if x is None or isinstance(x, (bool, bytes, float)):
        return x
    if isinstance(x, str):
        check_utf8(x, path)
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
                check_utf8(k, path)
            out[k] = plain_data(v, what, (*path, k))
        return out
    if isinstance(x, (list, tuple)):
        return [plain_data(v, what, (*path, i)) for i, v in enumerate(x)]
    raise UnsupportedLeafError(
        f"{what} at {format_path(path)}: {type(x).__name__} is not plain data "
        "(use str, numbers, bool, None, bytes, lists and dicts)")



__all__ = ["Job", "flatten", "dtype_info", "check_utf8", "plain_data", "HEADER_ALIGN"]
