"""Bit-for-bit comparison of state trees, with a report that names every differing leaf.

:func:`assert_trees_equal` compares two states *after* converting both to neutral state trees
(:func:`unickpt.state.to_tree`), so it accepts plain nested dicts of numpy arrays as well as
framework objects (torch modules and optimizers, JAX pytrees, ``unickpt.RNG()``...) through
their adapters.  Arrays are compared through integer views of their bits, so ``NaN`` equals
the same ``NaN`` (same payload), and ``-0.0`` differs from ``0.0``.

>>> import numpy as np
>>> assert_trees_equal({"w": np.float32([1, np.nan])}, {"w": np.float32([1, np.nan])})
>>> try:
...     assert_trees_equal({"w": np.float32([1, 2]), "step": 3},
...                        {"w": np.float32([1, 2.5]), "step": 4})
... except AssertionError as e:
...     print(e)
trees differ: 2 of 2 leaves differ (bit for bit)
  step: int: a=3, b=4
  w: float32[2]: 1 of 2 elements differ, max |a-b| = 0.5, first at [1]: a=2.0, b=2.5
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..state import to_tree
from ..tree import LazyArray, Path, ShardedArray, format_path, is_scalar_leaf

__all__ = ["assert_trees_equal", "diff_trees", "TreeDifference", "TreesDifferError"]

_ARRAY_TYPES = (np.ndarray, np.generic, ShardedArray, LazyArray)
_EXACT = ("int", "bool", "str", "bytes", "NoneType")


@dataclass(frozen=True)
class TreeDifference:
    """One difference between two state trees.

    Attributes:
        path: the leaf's tree path, rendered by :func:`unickpt.format_path`.
        kind: ``"value"`` (same kind of leaf, different content), ``"type"`` (different leaf
            kinds, dtypes or shapes), ``"missing"`` (only in ``a``) or ``"extra"`` (only in
            ``b``).
        detail: the human-readable line of the report (without the path).
        count, max_abs, first_index: for differing arrays, the same facts as numbers.
        leaf: what the leaf is: a dtype name for arrays (``"float32"``), the type name for
            scalars (``"int"``), ``"mixed"`` when the two sides are of different kinds.
    """

    path: str
    kind: str
    detail: str
    leaf: str = "mixed"
    count: int | None = None  # arrays: how many elements differ
    max_abs: float | None = None  # arrays: largest finite |a - b| among them (numeric dtypes)
    first_index: tuple[int, ...] | None = None  # arrays: index of the first differing element

    @property
    def exact(self) -> bool:
        """True for integer, bool, str and bytes leaves: counters, positions, RNG states.

        Such leaves never drift by rounding, so one that differs after a resume was almost
        always not saved or not restored: the likely culprit of the divergence.
        """
        return self.leaf in _EXACT or self.leaf.startswith(("int", "uint"))


class TreesDifferError(AssertionError):
    """Raised by :func:`assert_trees_equal`; ``differences`` lists every difference by path."""

    def __init__(self, message: str, differences: Sequence[TreeDifference]):
        super().__init__(message)
        self.differences = list(differences)

    @property
    def paths(self) -> list[str]:
        """The tree paths of every differing, missing or extra leaf, sorted."""
        return [d.path for d in self.differences]


def _neutral(x: Any) -> Any:
    """A neutral state tree for ``x`` (framework objects go through their adapters)."""
    tree, _kinds = to_tree(x, purpose="compare")
    return tree


def _as_array(x: Any, path: Path) -> np.ndarray:
    if isinstance(x, LazyArray):
        return x.materialize(path)
    if isinstance(x, ShardedArray):
        return x.assemble()
    return np.asarray(x)


def _fmt_float(x: float) -> str:
    return repr(float(x)) if math.isfinite(x) else str(float(x))


def _elem(a: np.ndarray, idx: int) -> str:
    v = a[idx]
    if _is_floaty(a.dtype) and a.dtype.kind != "c":
        return str(v)  # numpy prints the shortest repr that round-trips in v's own dtype
    if isinstance(v, np.generic) and a.dtype.kind in "biuc":
        return repr(v.item())
    return repr(v)


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _is_floaty(dt: np.dtype) -> bool:
    """Floating dtypes, numpy's and ml_dtypes' (bfloat16, float8...: their kind is 'V')."""
    if dt.kind in "fc":
        return True
    if dt.kind != "V" or dt.names is not None:
        return False
    try:
        import ml_dtypes

        ml_dtypes.finfo(dt)
        return True
    except (TypeError, ValueError):
        return False


def _bit_differs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Boolean mask of elements whose bits differ (a and b have equal dtype and shape)."""
    dt = a.dtype
    if dt.kind in "fc" and dt.itemsize > 8 and dt.itemsize // (2 if dt.kind == "c" else 1) > 8:
        # long double: x87 80-bit values padded to 16 bytes, and the padding bytes are
        # undefined; compare values, sign of zero and NaN-ness instead of raw bytes.
        parts = [(a.real, b.real), (a.imag, b.imag)] if dt.kind == "c" else [(a, b)]
        diff = np.zeros(a.shape, dtype=bool)
        for x, y in parts:
            same = (x == y) & (np.signbit(x) == np.signbit(y))
            same |= np.isnan(x) & np.isnan(y)
            diff |= ~same
        return diff
    a = np.ascontiguousarray(a)
    b = np.ascontiguousarray(b)
    if dt.itemsize in (1, 2, 4, 8):
        view = np.dtype(f"u{dt.itemsize}")
        return a.view(view) != b.view(view)
    if a.size == 0 or dt.itemsize == 0:
        return np.zeros(a.shape, dtype=bool)
    ua = a.view(np.uint8).reshape(*a.shape, dt.itemsize)
    ub = b.view(np.uint8).reshape(*b.shape, dt.itemsize)
    return (ua != ub).any(axis=-1)


def _numeric(a: np.ndarray) -> np.ndarray | None:
    """``a`` as float64/complex128 for reporting differences, or None if not numeric."""
    dt = a.dtype
    try:
        if dt.kind == "c":
            return a.astype(np.complex128)
        # ml_dtypes (bfloat16, float8, int4...) have kind "V" but convert like numbers
        if dt.kind in "biuf" or (dt.kind == "V" and dt.names is None and dt.itemsize <= 2):
            return a.astype(np.float64)
    except (TypeError, ValueError):
        return None
    return None


def _compare_arrays(a: np.ndarray, b: np.ndarray, rtol: float | None, atol: float | None,
                    names: tuple[str, str] = ("a", "b")
                    ) -> tuple[str, int, float | None, tuple[int, ...]] | None:
    """``(report line, count, max |a-b|, first index)`` for two arrays of equal dtype and
    shape, or None if they are equal."""
    shape = a.shape
    a, b = a.reshape(-1), b.reshape(-1)  # 1-d: 0-d arrays would make masks numpy scalars
    tolerant = (rtol is not None or atol is not None) and _is_floaty(a.dtype)
    fa = fb = None
    if tolerant:
        fa, fb = _numeric(a), _numeric(b)
        assert fa is not None and fb is not None
        both_nan = np.isnan(fa) & np.isnan(fb)
        with np.errstate(invalid="ignore", over="ignore"):
            close = np.abs(fa - fb) <= (atol or 0.0) + (rtol or 0.0) * np.abs(fb)
        # == also catches equal infinities, whose difference is NaN
        differs = ~(close | both_nan | (fa == fb))
    else:
        differs = _bit_differs(a, b)
    n = int(np.count_nonzero(differs))
    if n == 0:
        return None
    flat_first = int(np.flatnonzero(differs)[0])
    first = tuple(int(i) for i in np.unravel_index(flat_first, shape))
    na, nb = names
    parts = [f"{n} of {a.size} elements differ"]
    top: float | None = None
    if fa is None:
        fa, fb = _numeric(a), _numeric(b)
    if fa is not None and fb is not None:
        with np.errstate(invalid="ignore", over="ignore"):
            d = np.abs(fa[differs] - fb[differs])
        finite = d[np.isfinite(d)]
        nan_a = int(np.count_nonzero(np.isnan(fa[differs])))
        nan_b = int(np.count_nonzero(np.isnan(fb[differs])))
        if finite.size:
            top = float(finite.max())
            note = (" (equal values, different bits: sign of zero or NaN payload)"
                    if top == 0.0 and not (nan_a or nan_b) else "")
            parts.append(f"max |{na}-{nb}| = {_fmt_float(top)}{note}")
        if nan_a or nan_b:
            parts.append(f"NaN in {na}: {nan_a}, NaN in {nb}: {nan_b}")
    where = "[" + ", ".join(map(str, first)) + "]"
    parts.append(f"first at {where}: {na}={_elem(a, flat_first)}, {nb}={_elem(b, flat_first)}")
    return ", ".join(parts), n, top, first


def _short(x: Any, limit: int = 120) -> str:
    """repr of a scalar leaf, cut short: a report line must stay readable for long strings."""
    r = repr(x)
    return r if len(r) <= limit else f"{r[:limit]}... ({len(r)} chars)"


def _describe(x: Any) -> str:
    if isinstance(x, (ShardedArray, LazyArray)):
        return f"{np.dtype(x.dtype)}{list(x.shape)}"
    if isinstance(x, (np.ndarray, np.generic)):
        return f"{x.dtype}{list(np.shape(x))}"
    if isinstance(x, dict):
        return f"dict({len(x)} keys)"
    if isinstance(x, (list, tuple)):
        return f"{type(x).__name__}({len(x)} items)"
    return f"{type(x).__name__} {_short(x)}"


def _leaf_kind(x: Any) -> str:
    if isinstance(x, _ARRAY_TYPES):
        return str(np.dtype(x.dtype))
    return type(x).__name__


def _scalar_equal(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return _float_bits(a) == _float_bits(b)
    return a == b


class _Walker:
    def __init__(self, rtol: float | None, atol: float | None,
                 names: tuple[str, str] = ("a", "b"), exact_structure: bool = False):
        self.rtol, self.atol = rtol, atol
        self.names = names
        self.exact_structure = exact_structure
        self.diffs: list[tuple[Path, TreeDifference]] = []
        self.nleaves = 0

    def add(self, path: Path, kind: str, detail: str, leaf: str = "mixed",
            numbers: tuple = (None, None, None)) -> None:
        self.diffs.append((path, TreeDifference(format_path(path), kind, detail, leaf,
                                                *numbers)))

    def leaves_only_in(self, tree: Any, path: Path, kind: str) -> None:
        from ..tree import iter_leaves

        for p, leaf in iter_leaves(tree, path):
            self.nleaves += 1
            where = self.names[0] if kind == "missing" else self.names[1]
            self.add(p, kind, f"only in {where}: {_describe(leaf)}", _leaf_kind(leaf))

    def walk(self, a: Any, b: Any, path: Path) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            if self.exact_structure and list(a) != list(b) and set(a) == set(b):
                self.add(path, "type", "same keys in a different order")
            for k in a:
                if k in b:
                    self.walk(a[k], b[k], (*path, k))
                else:
                    self.leaves_only_in(a[k], (*path, k), "missing")
            for k in b:
                if k not in a:
                    self.leaves_only_in(b[k], (*path, k), "extra")
            return
        seq = (list, tuple)
        # A tuple saved and loaded back is a list: sequences compare by items, not by type.
        if type(a) in seq and type(b) in seq:
            if self.exact_structure and type(a) is not type(b):
                self.add(path, "type", f"{self.names[0]} is a {type(a).__name__}, "
                                       f"{self.names[1]} is a {type(b).__name__}")
            for i in range(min(len(a), len(b))):
                self.walk(a[i], b[i], (*path, i))
            for i in range(len(b), len(a)):
                self.leaves_only_in(a[i], (*path, i), "missing")
            for i in range(len(a), len(b)):
                self.leaves_only_in(b[i], (*path, i), "extra")
            return
        self.nleaves += 1
        container = (dict, list, tuple)
        if isinstance(a, container) or isinstance(b, container):
            self.add(path, "type",
                     f"{self.names[0]} is {_describe(a)}, {self.names[1]} is {_describe(b)}")
            return
        a_arr, b_arr = isinstance(a, _ARRAY_TYPES), isinstance(b, _ARRAY_TYPES)
        if a_arr and b_arr:
            # numpy scalars (np.float32(1)) and 0-d arrays are the same leaf to the format.
            x, y = _as_array(a, path), _as_array(b, path)
            if x.dtype != y.dtype or x.shape != y.shape:
                self.add(path, "type",
                         f"{self.names[0]} is {_describe(x)}, {self.names[1]} is {_describe(y)}")
                return
            found = _compare_arrays(x, y, self.rtol, self.atol, self.names)
            if found is not None:
                line, *numbers = found
                self.add(path, "value", f"{_describe(x)}: {line}", str(x.dtype), tuple(numbers))
            return
        if is_scalar_leaf(a) and is_scalar_leaf(b) and type(a) is type(b):
            if isinstance(a, float) and (self.rtol is not None or self.atol is not None):
                if a == b or (math.isnan(a) and math.isnan(b)) or abs(a - b) <= (
                        (self.atol or 0.0) + (self.rtol or 0.0) * abs(b)):
                    return
            elif _scalar_equal(a, b):
                return
            self.add(path, "value",
                     f"{type(a).__name__}: {self.names[0]}={_short(a)}, {self.names[1]}={_short(b)}",
                     type(a).__name__)
            return
        self.add(path, "type", f"{self.names[0]} is {_describe(a)}, {self.names[1]} is {_describe(b)}")


def diff_trees(a: Any, b: Any, *, rtol: float | None = None, atol: float | None = None,
               names: tuple[str, str] = ("a", "b"),
               exact_structure: bool = False) -> list[TreeDifference]:
    """Every difference between two states, sorted by path (empty when they are equal).

    Both states are converted to neutral trees first, so framework objects are accepted.
    Without ``rtol``/``atol`` the comparison is bit for bit; with them, floating-point arrays
    and floats compare with ``|a - b| <= atol + rtol * |b|`` (NaN equals NaN), everything else
    stays exact.  A tuple and a list with equal items are equal (a tuple restored through a
    framework may come back as a list) unless ``exact_structure``, which also reports dicts
    whose keys are in a different order (what ``unickpt diff`` uses for checkpoints).

    >>> import numpy as np
    >>> [d.path for d in diff_trees({"x": 1, "y": np.zeros(2)}, {"y": np.ones(2), "z": 2})]
    ['x', 'y', 'z']
    """
    w = _Walker(rtol, atol, names, exact_structure)
    w.walk(_neutral(a), _neutral(b), ())
    w.diffs.sort(key=lambda pd: (pd[1].path, pd[1].kind))
    return [d for _p, d in w.diffs]


def assert_trees_equal(a: Any, b: Any, *, rtol: float | None = None, atol: float | None = None,
                       names: tuple[str, str] = ("a", "b"), max_report: int = 50,
                       header: str | None = None) -> None:
    """Assert two states are equal bit for bit (or within ``rtol``/``atol``).

    ``a`` and ``b`` may be neutral state trees or anything :func:`unickpt.save` accepts
    (framework objects are converted by their adapters).  On mismatch raises
    :class:`TreesDifferError` (an ``AssertionError``) listing every differing leaf sorted by
    path (at most ``max_report`` lines, then a count): its dtype and shape, how many elements
    differ, the largest absolute difference, the first differing index with both values,
    leaves present on one side only, and both values of differing scalars.  ``names`` replaces
    "a" and "b" in the report (e.g. ``("reference", "resumed")``).

    >>> import numpy as np
    >>> assert_trees_equal({"x": np.float64([0.0])}, {"x": np.float64([-0.0])})
    Traceback (most recent call last):
    ...
    unickpt.testing.compare.TreesDifferError: trees differ: 1 of 1 leaves differ (bit for bit)
      x: float64[1]: 1 of 1 elements differ, max |a-b| = 0.0 (equal values, different bits: sign of zero or NaN payload), first at [0]: a=0.0, b=-0.0
    """
    w = _Walker(rtol, atol, names)
    w.walk(_neutral(a), _neutral(b), ())
    if not w.diffs:
        return
    w.diffs.sort(key=lambda pd: (pd[1].path, pd[1].kind))
    diffs = [d for _p, d in w.diffs]
    mode = "bit for bit" if rtol is None and atol is None else f"rtol={rtol}, atol={atol}"
    counts = [f"{sum(d.kind in ('value', 'type') for d in diffs)} of {w.nleaves} leaves differ"]
    missing = sum(d.kind == "missing" for d in diffs)
    extra = sum(d.kind == "extra" for d in diffs)
    if missing:
        counts.append(f"{missing} only in {names[0]}")
    if extra:
        counts.append(f"{extra} only in {names[1]}")
    lines = [f"{header + ': ' if header else ''}trees differ: {', '.join(counts)} ({mode})"]
    for d in diffs[:max_report]:
        lines.append(f"  {d.path}: {d.detail}")
    if len(diffs) > max_report:
        lines.append(f"  ... and {len(diffs) - max_report} more differing leaves")
    raise TreesDifferError("\n".join(lines), diffs)

