"""Write the golden checkpoints of the current format version into ``tests/golden/v<N>/<name>/``.

Golden files are written ONCE per format version and committed; they must never be
regenerated for an existing version (that would defeat their purpose: proving that files
written by an older unickpt stay readable).  The script refuses to touch an existing
checkpoint unless ``--force`` is given.  tests/test_format_golden.py rebuilds the expected
values independently and compares what it loads against them.

    python tests/golden/make_golden.py            # writes missing checkpoints only
"""

from __future__ import annotations

import os
import shutil
import struct
import sys
import tempfile

import ml_dtypes
import numpy as np

import unickpt
from unickpt.api import save_recorded
from unickpt.format import FORMAT_VERSION, groups
from unickpt.tree import LazyArray, Piece, ShardedArray

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"v{FORMAT_VERSION}")


def pat(n: int, seed: int = 0) -> bytes:
    """Deterministic bytes covering all 256 values (NaN payloads, subnormals, ...)."""
    return bytes((i * 37 + 11 + seed) % 256 for i in range(n))


def f64(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<Q", bits))[0]


def raw(dtype, shape, seed=0) -> np.ndarray:
    dt = np.dtype(dtype)
    n = int(np.prod(shape)) * dt.itemsize
    return np.frombuffer(pat(n, seed), dt).reshape(shape).copy()


def trees() -> dict[str, tuple[object, dict | None]]:
    numeric = {}
    for i, name in enumerate(["bool", "int8", "int16", "int32", "int64", "uint8", "uint16",
                              "uint32", "uint64", "float16", "float32", "float64", "complex64",
                              "complex128"]):
        numeric[name] = raw(name, (2, 3), i)
    numeric["scalars"] = [np.float32(1.5), np.int64(-7), np.bool_(True), np.uint8(255),
                          np.complex64(1 - 2j), np.float64(-0.0), np.float16(np.inf)]
    ml = {}
    for i, name in enumerate(["bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                              "float8_e5m2fnuz", "float8_e4m3b11fnuz", "int4", "uint4", "int2",
                              "uint2"]):
        ml[name] = raw(getattr(ml_dtypes, name), (5,), i)
    ml["bf16_scalar"] = ml_dtypes.bfloat16(3.25)
    base = raw("int32", (4, 6), 3)
    layouts = {
        "zero_d": np.array(42.5, np.float64),
        "empty": np.zeros((0, 3), np.float32),
        "empty_3d": np.zeros((2, 0, 4), np.int16),
        "fortran": np.asfortranarray(raw("float64", (3, 4), 5)),
        "strided": base[::2, 1::2],
        "transposed": base.T,
        "big_endian_f4": raw("float32", (2, 2), 7).astype(">f4"),
        "big_endian_i8": np.arange(3, dtype=">i8"),
        "big_endian_c16": np.array([1 + 2j, -0.0 - 1j], ">c16"),
        "lazy": LazyArray((3,), np.dtype("uint16"), lambda: np.array([1, 2, 65535], np.uint16)),
    }
    strings_times = {
        "unicode": np.array(["", "a", "ü🙂x"], "<U3"),
        "unicode_be": np.array(["ab", "c"], ">U2"),
        "bytes": np.array([b"", b"\x00\xff", b"abcd"], "S4"),
        "void": np.frombuffer(pat(6), "V3").copy(),
        "datetime_ns": np.array(["2024-02-29T12:34:56.789", "NaT"], "datetime64[ns]"),
        "datetime_D": np.array(["1970-01-01", "2262-04-11"], "datetime64[D]"),
        "timedelta_s": np.array([-1, 0, 86400], "timedelta64[s]"),
        "np_str": np.str_("scalar ü"),
        "np_bytes": np.bytes_(b"\x01\x02"),
        "np_datetime": np.datetime64("2000-01-01T00:00", "m"),
    }
    scalars = {
        "none": None, "true": True, "false": False, "zero": 0, "neg": -1,
        "i64max": (1 << 63) - 1, "i64min": -(1 << 63), "u64max": (1 << 64) - 1,
        "past_u64": 1 << 64, "below_i64": -(1 << 63) - 1, "huge": -(3 ** 200),
        "float": 1.5, "neg_zero": -0.0, "inf": float("inf"), "ninf": float("-inf"),
        "qnan_payload": f64(0x7FF8000000000001), "snan_payload": f64(0x7FF0000000000123),
        "neg_nan": f64(0xFFF8000000000000), "subnormal": f64(1), "str": "", "text": "ü/.🙂\x00",
        "bytes": b"", "bytes2": b"\x00\xff\x80",
    }
    structure = {
        "": {"/": {".": {"..": 1}}},
        "a/b": [1, (2, [3, ()]), [], {}],
        "ключ": {0: "int key", -5: "neg", (1 << 64) - 1: "u64 key", "0": "str key"},
        "tuple": (None, (True,), ("x", b"y")),
        "deep": {"l1": {"l2": {"l3": {"l4": [[[np.array([1, 2], np.int8)]]]}}}},
        "dupe_names": {"x": np.zeros(1, np.int8), "x#2": np.ones(1, np.int8)},
    }
    a = raw("float32", (4, 6), 9)
    sharded = {
        "rows": ShardedArray((4, 6), a.dtype, [Piece(((2, 4), (0, 6)), a[2:]),
                                               Piece(((0, 2), (0, 6)), a[:2])]),
        "grid": ShardedArray((4, 6), a.dtype, [
            Piece(((0, 2), (0, 3)), a[:2, :3]), Piece(((0, 2), (3, 6)), a[:2, 3:]),
            Piece(((2, 4), (0, 3)), a[2:, :3]), Piece(((2, 4), (3, 6)), a[2:, 3:])]),
        "big_endian": ShardedArray((3,), np.dtype(">i4"), [
            Piece(((0, 1),), np.array([1], ">i4")), Piece(((1, 3),), np.array([2, 3], ">i4"))]),
        "scalar_global": ShardedArray((), np.dtype("float64"),
                                      [Piece((), np.array(2.5))]),
    }
    tiny = {"w": np.array([1.0, 2.0], np.float32), "step": 7}
    out = {
        "tiny": (tiny, None),
        "scalars": (scalars, None),
        "numeric": (numeric, None),
        "ml_dtypes": (ml, None),
        "layouts": (layouts, None),
        "strings_times": (strings_times, None),
        "structure": (structure, None),
        "sharded": (sharded, None),
        "metadata": ({"x": np.arange(3, dtype=np.int64)},
                     {"lr": 0.001, "tags": ["a", "b"], "nested": {"k": None, 3: b"\x00"},
                      "big": (1 << 64) - 1}),
        "root_array": (np.arange(4, dtype=np.uint8), None),
        "root_scalar": ("just a string", None),
        "empty_tree": ({}, None),
    }
    if np.dtype(np.longdouble).itemsize == 16 and np.finfo(np.longdouble).nmant == 63:
        out["longdouble_x87"] = ({"ld": raw(np.longdouble, (2,), 1),
                                  "cld": raw(np.clongdouble, (1,), 2)}, None)
    return out


def incremental_state(step: int) -> dict:
    return {"frozen": {"w": np.arange(16400, dtype=np.float32)},  # over 64 KiB: a head_xxh3
            "train": {"a": np.array([1, 2, 3], np.float32) * step, "n": np.int64(step)},
            "step": step}


def write_incremental(path: str) -> None:
    """Step 2 of a manager run with sharing: its frozen array's file (arrays-00000) was
    shared from step 1, the trained arrays are in arrays-00001."""
    split, merge = groups.SPLIT_BYTES, groups.MERGE_BYTES
    groups.SPLIT_BYTES = groups.MERGE_BYTES = 0  # split even this small state per subtree
    try:
        with tempfile.TemporaryDirectory() as tmp:
            with unickpt.CheckpointManager(tmp) as m:
                for step in (1, 2):
                    m.save(step, incremental_state(step))
            step2 = os.path.join(tmp, "step_2")
            if unickpt.inspect(step2).info["shared_files"] != 1:
                raise RuntimeError("step 2 did not share the frozen array's file")
            shutil.copytree(step2, path)
    finally:
        groups.SPLIT_BYTES, groups.MERGE_BYTES = split, merge


def main(force: bool = False) -> None:
    os.makedirs(HERE, exist_ok=True)
    for name, (tree, metadata) in trees().items():
        path = os.path.join(HERE, name)
        if os.path.exists(path):
            if not force:
                print(f"keep    {name}")
                continue
            shutil.rmtree(path)
        info = {"step": 7, "writer": "make_golden"} if name == "metadata" else None
        save_recorded(path, tree, metadata=metadata, info=info)
        print(f"wrote   {name}")
    path = os.path.join(HERE, "incremental")
    if os.path.exists(path) and force:
        shutil.rmtree(path)
    if os.path.exists(path):
        print("keep    incremental")
    else:
        write_incremental(path)
        print("wrote   incremental")


if __name__ == "__main__":
    main(force="--force" in sys.argv[1:])
