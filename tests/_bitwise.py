"""Bit-for-bit comparison of a saved state tree with what unickpt loads back (test helper)."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from unickpt.format.dtypes import dtype_name
from unickpt.tree import LazyArray, ShardedArray, format_path


def expected_array(x: Any) -> np.ndarray:
    """What an array-like leaf loads back as (lazy and sharded arrays come back as ndarrays)."""
    if isinstance(x, LazyArray):
        return x.materialize()
    if isinstance(x, ShardedArray):
        return x.assemble()
    return x


def significant_bytes(a: np.ndarray | np.generic) -> bytes:
    """The bytes that carry the value: x87 long doubles have 6 padding bytes per 16 that
    numpy leaves uninitialised when it creates a scalar, so they are not part of the value."""
    a = np.asarray(a)
    if dtype_name(a.dtype.newbyteorder("=")).endswith("float80_x87"):
        le = a.astype(a.dtype.newbyteorder("<"))
        return np.ascontiguousarray(le).view(np.uint8).reshape(-1, 16)[:, :10].tobytes()
    return a.tobytes()


def assert_bitwise_equal(expected: Any, actual: Any, path: tuple = ()) -> None:
    """Assert ``actual`` is ``expected`` bit for bit: node types, key order and types, tuple vs
    list, dtypes (byte order included), shapes, array bytes, scalar types and float bits."""
    where = format_path(path)
    if isinstance(expected, (np.ndarray, LazyArray, ShardedArray)):
        exp = expected_array(expected)
        assert type(actual) is np.ndarray, f"{where}: {type(actual)} is not an ndarray"
        assert actual.dtype == exp.dtype, f"{where}: dtype {actual.dtype} != {exp.dtype}"
        assert actual.dtype.str == exp.dtype.str, f"{where}: byte order {actual.dtype.str}"
        assert actual.shape == exp.shape, f"{where}: shape {actual.shape} != {exp.shape}"
        assert significant_bytes(actual) == significant_bytes(exp), f"{where}: bytes differ"
        return
    if isinstance(expected, np.generic):
        assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
        assert actual.dtype == expected.dtype, f"{where}: dtype {actual.dtype}"
        assert significant_bytes(actual) == significant_bytes(expected), \
            f"{where}: scalar bytes differ"
        return
    assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
    if isinstance(expected, dict):
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
        for (ka, va), ke in zip(actual.items(), expected):
            assert type(ka) is type(ke), f"{where}: key {ke!r} came back as {type(ka)}"
            assert_bitwise_equal(expected[ke], va, (*path, ke))
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{where}: length {len(actual)}"
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert_bitwise_equal(e, a, (*path, i))
    elif isinstance(expected, float):
        assert struct.pack("<d", actual) == struct.pack("<d", expected), \
            f"{where}: float bits {actual!r} != {expected!r}"
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"
