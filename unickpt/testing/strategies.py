"""Hypothesis strategies for state trees and interruption schedules.

Every leaf kind the unickpt format stores is generated: arrays of every dtype on the format's
allow-list that numpy can build (bfloat16, float8, int4, ... through ``ml_dtypes``; complex;
long double; datetime64/timedelta64; fixed-width ``U``/``S``/``V``), in every memory layout
(0-d, empty, C, Fortran, strided views, big-endian), with arbitrary bit patterns (NaN payloads,
-0.0, subnormals); numpy scalars; Python ``bool``, ``int`` of any size, ``float`` with exact bits,
``str``, ``bytes``, ``None``; :class:`~unickpt.LazyArray` and :class:`~unickpt.ShardedArray`;
all nested in dicts (awkward ``str`` keys such as ``"/"``, ``"."``, ``""``, non-ASCII, and
``int`` keys), lists and tuples.

Needs ``hypothesis`` (a test dependency, not a core one).

>>> from hypothesis import given, settings
>>> import tempfile, unickpt
>>> @settings(max_examples=5, deadline=None)
... @given(state_trees())
... def roundtrip(tree):
...     path = tempfile.mkdtemp() + "/ckpt"
...     unickpt.save(path, tree)
...     unickpt.load(path)
>>> roundtrip()
"""

from __future__ import annotations

import functools
import struct
from typing import Any

import numpy as np
from hypothesis import strategies as st

from ..format import dtypes as _dtypes
from ..tree import LazyArray, Piece, ShardedArray

__all__ = [
    "ARRAY_DTYPES",
    "dtypes",
    "arrays",
    "numpy_scalars",
    "python_scalars",
    "floats_exact",
    "keys",
    "sharded_arrays",
    "lazy_arrays",
    "leaves",
    "state_trees",
    "interruption_schedules",
]

_TIME_UNITS = ("Y", "M", "W", "D", "h", "m", "s", "ms", "us", "ns", "ps", "fs", "as")


def _all_dtypes() -> list[np.dtype]:
    out = list(dict.fromkeys(_dtypes.allowed_dtypes().values()))  # every allow-listed fixed dtype
    out += [np.dtype(f"{k}[{u}]") for k in ("datetime64", "timedelta64") for u in _TIME_UNITS]
    out += [np.dtype(s) for s in ("<U1", "<U3", "S1", "S4", "V1", "V3")]
    return out


#: Every dtype the strategies draw from (the format's allow-list as numpy builds it here).
ARRAY_DTYPES: tuple[np.dtype, ...] = tuple(_all_dtypes())


def dtypes() -> st.SearchStrategy[np.dtype]:
    """Any storable dtype, native byte order."""
    return st.sampled_from(ARRAY_DTYPES)


_shapes = st.one_of(
    st.just(()),                                   # 0-d
    st.sampled_from([(0,), (3, 0), (0, 2, 2)]),    # empty
    st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple),
)


def _filled(draw, dt: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A C-ordered array of ``shape`` with arbitrary bits (valid code points for ``U``)."""
    n = int(np.prod(shape, dtype=np.int64))
    if dt.itemsize == 0:
        return np.zeros(shape, dt)
    if dt.kind == "U":
        nchars = n * (dt.itemsize // 4)
        chars = draw(st.lists(st.characters(codec="utf-8"), min_size=nchars, max_size=nchars))
        raw = "".join(chars).encode("utf-32-le")
    else:
        raw = draw(st.binary(min_size=n * dt.itemsize, max_size=n * dt.itemsize))
    return np.frombuffer(raw, dtype=dt).reshape(shape).copy()


@st.composite
def arrays(draw, dtype: np.dtype | None = None) -> np.ndarray:
    """An array with arbitrary bits in an arbitrary layout (C, Fortran, strided, big-endian)."""
    dt = draw(dtypes()) if dtype is None else np.dtype(dtype)
    shape = draw(_shapes)
    layout = draw(st.sampled_from(["c", "fortran", "strided", "transposed", "big"]))
    if layout == "strided" and shape:
        base_shape = (shape[0] * 2, *shape[1:])
    else:
        base_shape = shape
    a = _filled(draw, dt, base_shape)
    if layout == "strided" and shape:
        a = a[::2]
    elif layout == "fortran":
        a = np.asfortranarray(a)
    elif layout == "transposed" and a.ndim > 1:
        a = np.ascontiguousarray(a.T).T  # same values' layout reversed: a non-C view
    elif layout == "big" and _dtypes.has_byteorder(dt):
        a = a.astype(dt.newbyteorder(">"))  # same values, big-endian bytes in memory
    return a


def numpy_scalars() -> st.SearchStrategy[np.generic]:
    """numpy scalars (``np.float32(...)``, ``np.str_``, ``np.datetime64``, bfloat16, ...)."""
    return dtypes().flatmap(lambda dt: arrays(dt).filter(lambda a: a.size > 0)).map(
        lambda a: a.reshape(-1)[0])


def floats_exact() -> st.SearchStrategy[float]:
    """Python floats from all 2**64 bit patterns: -0.0, inf, subnormals, NaN with payloads."""
    special = st.sampled_from([0x8000000000000000, 0x7FF0000000000000, 0xFFF0000000000000,
                               0x7FF8000000000000, 0x7FF0000000000001, 0xFFFFFFFFFFFFFFFF,
                               0x0000000000000001])
    bits = st.one_of(special, st.integers(0, (1 << 64) - 1))
    return bits.map(lambda b: struct.unpack("<d", struct.pack("<Q", b))[0])


def python_scalars() -> st.SearchStrategy[Any]:
    """``None``, ``bool``, ``int`` of any size, exact ``float``, ``str``, ``bytes``."""
    edge_ints = st.sampled_from([0, -1, (1 << 63) - 1, -(1 << 63), 1 << 63, (1 << 64) - 1,
                                 1 << 64, -(1 << 63) - 1, 10 ** 40, -(10 ** 40)])
    return st.one_of(
        st.none(), st.booleans(), edge_ints, st.integers(),
        st.integers(min_value=-(1 << 300), max_value=1 << 300),
        floats_exact(), st.text(max_size=12), st.binary(max_size=12))


def keys() -> st.SearchStrategy[str | int]:
    """Dict keys: awkward strings ("/", ".", "", non-ASCII, look-alikes of ints) and ints."""
    awkward = st.sampled_from(["/", ".", "..", "", "a/b", "a.b", "7", "-1", " ", "ü", "键",
                               "🙂", "<root>", "<piece 0>", "x#2", "\x00", "\"q\"",
                               "__metadata__"])
    return st.one_of(awkward, st.text(max_size=6),
                     st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1))


@st.composite
def sharded_arrays(draw) -> ShardedArray:
    """A :class:`ShardedArray` cut into 1-4 pieces along its first axis (pieces may be lazy)."""
    dt = draw(dtypes())
    shape = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple))
    whole = _filled(draw, dt, shape)
    if _dtypes.has_byteorder(dt) and draw(st.booleans()):
        whole = whole.astype(dt.newbyteorder(">"))
        dt = whole.dtype
    cuts = sorted(draw(st.sets(st.integers(1, shape[0] - 1), max_size=3))) if shape[0] > 1 else []
    bounds = list(zip([0, *cuts], [*cuts, shape[0]]))
    pieces = []
    for a0, b0 in bounds:
        part = whole[a0:b0]
        data: np.ndarray | LazyArray = part
        if draw(st.booleans()):
            data = LazyArray(part.shape, part.dtype, functools.partial(np.asarray, part))
        pieces.append(Piece(((a0, b0), *((0, k) for k in shape[1:])), data))
    if draw(st.booleans()):
        pieces.reverse()  # piece order is free
    return ShardedArray(shape, dt, pieces)


def lazy_arrays() -> st.SearchStrategy[LazyArray]:
    """:class:`LazyArray` leaves whose fetch returns a generated array."""
    return arrays().map(lambda a: LazyArray(tuple(a.shape), a.dtype, lambda: a))


def leaves() -> st.SearchStrategy[Any]:
    """Any single leaf of a state tree."""
    # Pick the kind first (uniformly) so that arrays are not crowded out by the many
    # branches of python_scalars(); arrays get two shares, being the leaves that matter most.
    kinds = [arrays(), arrays(), numpy_scalars(), lazy_arrays(), sharded_arrays(),
             python_scalars()]
    return st.sampled_from(kinds).flatmap(lambda s: s)


def state_trees(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """Nested dicts (str and int keys), lists and tuples over :func:`leaves`.

    A bare leaf is a valid tree too (the root may be anything).
    """
    def containers(children: st.SearchStrategy) -> st.SearchStrategy:
        return st.one_of(
            st.lists(children, max_size=4),
            st.lists(children, max_size=4).map(tuple),
            st.dictionaries(keys(), children, max_size=4),
        )

    return st.recursive(leaves(), containers, max_leaves=max_leaves)


def interruption_schedules(total_steps: int, *, max_size: int | None = None
                           ) -> st.SearchStrategy[list[int]]:
    """Sorted, unique lists of steps in ``[0, total_steps]`` at which a run is interrupted.

    Step ``k`` means "killed after completing k steps, then resumed".  Edge steps (0, 1,
    ``total_steps - 1``, ``total_steps``) are drawn often; the empty schedule (never
    interrupted) is included.

    >>> from hypothesis import given, settings
    >>> @settings(max_examples=20)
    ... @given(interruption_schedules(5))
    ... def check(s):
    ...     assert s == sorted(set(s)) and all(0 <= k <= 5 for k in s)
    >>> check()
    """
    if total_steps < 0:
        raise ValueError(f"total_steps must be >= 0, got {total_steps}")
    edges = sorted({0, min(1, total_steps), max(total_steps - 1, 0), total_steps})
    step = st.one_of(st.sampled_from(edges), st.integers(0, total_steps))
    return st.lists(step, unique=True, max_size=max_size if max_size is not None
                    else min(total_steps + 1, 8)).map(sorted)
