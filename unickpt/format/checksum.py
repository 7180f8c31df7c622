"""xxh3-64, the format's checksum (docs/FORMAT.md), behind one switch (internal module).

Writing and verifying need the ``xxhash`` package (a core dependency).  Reading does not: a
checkpoint stays readable with numpy, msgpack and ml_dtypes alone, and without xxhash the
reader skips the checks and says so with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from ..errors import MissingDependencyError

_xxhash: Any
try:
    import xxhash as _xxhash
except ImportError:  # pragma: no cover - exercised in a subprocess test that hides xxhash
    _xxhash = None


def available() -> bool:
    """Whether checksums can be computed in this environment."""
    return _xxhash is not None


def require(what: str) -> None:
    """Raise :class:`~unickpt.MissingDependencyError` if xxhash is missing."""
    if _xxhash is None:
        raise MissingDependencyError(
            f"{what} needs the xxhash package to compute xxh3-64 checksums; "
            "install it with `pip install xxhash`")


def digest(data: Any) -> int:
    """xxh3-64 (seed 0) of a bytes-like object, as an unsigned int."""
    require("computing a checksum")
    return _xxhash.xxh3_64_intdigest(data)


def digest_function() -> Callable[[Any], int]:
    """:func:`digest` without the wrapper, for loops that hash many small buffers."""
    require("computing a checksum")
    return _xxhash.xxh3_64_intdigest


def hasher() -> Any:
    """An incremental xxh3-64 hasher (``update`` / ``intdigest``)."""
    require("computing a checksum")
    return _xxhash.xxh3_64()


def warn_unverified(where: object) -> None:
    """Say that a read went unchecked because xxhash is missing."""
    warnings.warn(f"{where}: the xxhash package is not installed, so checksums were not "
                  "checked while reading; `pip install xxhash` (or run `unickpt verify`) to "
                  "detect damaged data", RuntimeWarning, stacklevel=3)
