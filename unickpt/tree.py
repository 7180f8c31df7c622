"""The framework-neutral state tree.

A state tree is nested ``dict`` (keys ``str`` or ``int``), ``list`` and ``tuple`` nodes whose
leaves are:

* numpy arrays of any numeric dtype (bfloat16 / float8 through ``ml_dtypes``), 0-d and empty
  included, and numpy scalars (``np.float32(1.0)``);
* Python ``bool``, ``int`` (any size), ``float`` (exact bits), ``str``, ``bytes`` and ``None``;
* :class:`ShardedArray`: a global shape plus pieces, each with the index it covers.

Paths are tuples of keys; :func:`format_path` renders them for messages.

>>> format_path(("model", "layers", 0, "weight"))
'model/layers/0/weight'
>>> format_path(("a/b", "7", ""))
'"a/b"/"7"/""'
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Path", "ShardedArray", "Piece", "LazyArray", "format_path", "iter_leaves",
           "is_scalar_leaf", "convert_scalar"]

Key = str | int
Path = tuple[Key, ...]

_PLAIN_KEY = re.compile(r"^[A-Za-z_.\-][A-Za-z0-9_.\-]*$")


def format_path(path: Sequence[Key]) -> str:
    """Render a tree path unambiguously: int keys bare, awkward str keys JSON-quoted."""
    if not path:
        return "<root>"
    parts = []
    for k in path:
        if isinstance(k, bool) or not isinstance(k, (int, str)):
            parts.append(repr(k))
        elif isinstance(k, int):
            parts.append(str(k))
        elif _PLAIN_KEY.match(k) and k not in (".", ".."):
            parts.append(k)
        else:
            import json  # only for awkward keys: json is not part of `import unickpt`

            parts.append(json.dumps(k, ensure_ascii=False))
    return "/".join(parts)


@dataclass(frozen=True)
class LazyArray:
    """An array leaf whose host copy is made only when the writer needs its bytes.

    Adapters use it for device arrays: a synchronous save then holds at most one host copy per
    writer thread instead of a copy of the whole state.

    >>> lz = LazyArray((2,), np.dtype("float32"), lambda: np.zeros(2, np.float32))
    >>> lz.materialize(("x",)).tolist()
    [0.0, 0.0]
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    fetch: Callable[[], np.ndarray]

    def materialize(self, path: Sequence[Key] = ()) -> np.ndarray:
        a = np.asarray(self.fetch())
        if tuple(a.shape) != tuple(self.shape) or a.dtype != self.dtype:
            raise ValueError(f"{format_path(path)}: lazy array produced {a.dtype}{list(a.shape)}, "
                             f"declared {self.dtype}{list(self.shape)}")
        return a


def _host(data: Any) -> np.ndarray:
    """A piece's data as a host array (lazy pieces are fetched)."""
    return data.materialize() if isinstance(data, LazyArray) else np.asarray(data)


def host_copy(data: Any) -> np.ndarray:
    """A host copy of a piece's data that nothing else views (for async snapshots)."""
    a = _host(data)
    return a if isinstance(data, LazyArray) else np.array(a, copy=True)


@dataclass(frozen=True)
class Piece:
    """One stored piece of a sharded array: ``index`` is a tuple of ``(start, stop)`` per dim."""

    index: tuple[tuple[int, int], ...]
    data: Any  # a numpy array (or a lazily materialised host copy) of the piece's shape


@dataclass(frozen=True)
class ShardedArray:
    """A global array stored as pieces, as written by a sharded (e.g. JAX) array.

    Pieces must tile the global shape without overlap (replicated copies are stored once).

    >>> a = np.arange(8.0).reshape(2, 4)
    >>> s = ShardedArray((2, 4), a.dtype, [Piece(((0, 2), (0, 2)), a[:, :2]),
    ...                                    Piece(((0, 2), (2, 4)), a[:, 2:])])
    >>> bool((s.assemble() == a).all())
    True
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    pieces: list[Piece]

    def assemble(self) -> np.ndarray:
        """Materialise the full global array on the host."""
        out = np.empty(self.shape, dtype=self.dtype)
        for p in self.pieces:
            out[tuple(slice(a, b) for a, b in p.index)] = _host(p.data)
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        # Code that expects a plain array leaf (np.asarray(leaf)) gets the assembled array.
        out = self.assemble()
        return out if dtype is None else out.astype(dtype, copy=False)

    def read(self, index: tuple[slice, ...]) -> np.ndarray:
        """Read the region ``index`` (slices with explicit bounds) from the overlapping pieces."""
        bounds = [s.indices(n)[:2] for s, n in zip(index, self.shape)]
        out = np.empty([b - a for a, b in bounds], dtype=self.dtype)
        for p in self.pieces:
            lo = [max(a, pa) for (a, _), (pa, _) in zip(bounds, p.index)]
            hi = [min(b, pb) for (_, b), (_, pb) in zip(bounds, p.index)]
            if any(h <= x for x, h in zip(lo, hi)) and out.size:
                continue
            src = tuple(slice(x - pa, h - pa) for x, h, (pa, _) in zip(lo, hi, p.index))
            dst = tuple(slice(x - a, h - a) for x, h, (a, _) in zip(lo, hi, bounds))
            out[dst] = _host(p.data)[src]
        return out


def is_scalar_leaf(x: object) -> bool:
    """True for the Python scalar leaves of a state tree."""
    return x is None or isinstance(x, (bool, int, float, str, bytes))


_SCALAR_KINDS = {bool: "b", int: "iu", float: "f"}


def convert_scalar(value: Any, like: Any) -> tuple[bool, Any]:
    """A Python scalar <-> 0-d array conversion for restoring ``value`` into ``like``.

    The rule (the same in the neutral path and both adapters; docs/jax.md, "Scalars and 0-d
    arrays"): a Python ``bool``/``int``/``float`` and a 0-d array of the same kind (bool, integer, floating)
    restore into each other; the result takes the *target's* form and dtype, and only when the
    value converts exactly (an int32 step into a Python int, an int into a 0-d int64 array;
    never a float into an int, nor 300 into uint8).  Returns ``(True, converted)`` or
    ``(False, None)``.

    >>> convert_scalar(np.array(7, np.int32), 0)
    (True, 7)
    >>> ok, v = convert_scalar(5, np.zeros((), np.int64)); ok, v.dtype, v.shape
    (True, dtype('int64'), ())
    >>> convert_scalar(np.array(1.5, np.float32), 0), convert_scalar(300, np.zeros((), np.uint8))
    ((False, None), (False, None))
    """
    if type(like) in _SCALAR_KINDS and isinstance(value, (np.ndarray, np.generic)):
        if value.shape != () or value.dtype.kind not in _SCALAR_KINDS[type(like)]:
            return False, None
        return True, type(like)(value.item())
    if (isinstance(like, (np.ndarray, np.generic)) and like.shape == ()
            and type(value) in _SCALAR_KINDS and like.dtype.kind in _SCALAR_KINDS[type(value)]):
        with np.errstate(all="ignore"):
            cast = np.asarray(value).astype(like.dtype)
        back = cast.item()
        if back != value and not (value != value and back != back):  # NaN converts to NaN
            return False, None
        return True, (cast if isinstance(like, np.ndarray) else cast[()])
    return False, None


def iter_leaves(tree: Any, path: Path = ()) -> Iterator[tuple[Path, Any]]:
    """Yield ``(path, leaf)`` for every leaf of a neutral state tree, depth first, in order."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from iter_leaves(v, (*path, k))
    elif isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        for i, v in enumerate(tree):
            yield from iter_leaves(v, (*path, i))
    else:
        yield path, tree

