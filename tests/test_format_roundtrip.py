"""Round trips of the unickpt format: bit for bit, mmap, safetensors interop, atomic commit."""

from __future__ import annotations

import os
import struct
import tempfile

import ml_dtypes
import numpy as np
import pytest
import safetensors
from _bitwise import assert_bitwise_equal, expected_array
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import unickpt
from unickpt.api import save_recorded
from unickpt.format.dtypes import dtype_from_name, dtype_name
from unickpt.format.reader import CheckpointReader
from unickpt.testing import strategies as ust
from unickpt.tree import LazyArray, Piece, ShardedArray, iter_leaves

PROPERTY = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _entries(parent: str) -> list[str]:
    return sorted(os.listdir(parent))


@PROPERTY
@given(ust.state_trees(max_leaves=24))
def test_any_state_tree_round_trips_bit_for_bit(tree):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ck")
        unickpt.save(path, tree)
        assert _entries(d) == ["ck"]  # committed, no temp leftovers
        assert_bitwise_equal(tree, unickpt.load(path))
        mm = unickpt.load(path, mmap=True, verify=True)
        assert_bitwise_equal(tree, mm)
        assert unickpt.verify(path).ok


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(ust.keys(), ust.arrays(), min_size=1, max_size=6))
def test_mmap_load_equals_materialised_load_and_is_read_only(tree):
    with tempfile.TemporaryDirectory() as d:
        unickpt.save(d + "/ck", tree)
        full, mm = unickpt.load(d + "/ck"), unickpt.load(d + "/ck", mmap=True)
        assert_bitwise_equal(full, mm)
        for (_, a), (_, b) in zip(iter_leaves(full), iter_leaves(mm)):
            assert a.flags.writeable
            if b.nbytes and b.dtype.byteorder != ">":  # big-endian comes back as a copy
                assert not b.flags.writeable


def test_every_allow_listed_dtype_round_trips_with_its_name():
    names = set()
    with tempfile.TemporaryDirectory() as d:
        tree = {}
        for dt in ust.ARRAY_DTYPES:
            name = dtype_name(dt)
            names.add(name)
            assert dtype_from_name(name) == dt
            raw = bytes(range(256))[: 6 * dt.itemsize]
            tree[name] = np.frombuffer(raw, dt).reshape(2, 3) if dt.itemsize else np.zeros(6, dt)
        unickpt.save(d + "/ck", tree)
        assert_bitwise_equal(tree, unickpt.load(d + "/ck"))
    assert {"bfloat16", "float8_e4m3fn", "float8_e5m2", "int4", "complex128", "bool",
            "datetime64[ns]", "timedelta64[D]", "U3", "S4"} <= names


def test_long_double_is_named_by_its_bit_format():
    name = dtype_name(np.dtype(np.longdouble))
    if np.dtype(np.longdouble).itemsize == 16:
        assert name in ("float80_x87", "float128_ieee")
        assert dtype_name(np.dtype(np.clongdouble)) == "complex_" + name
    other = "float128_ieee" if name == "float80_x87" else "float80_x87"
    with pytest.raises(TypeError, match="does not exist on this platform"):
        dtype_from_name(other)


def test_python_scalars_keep_type_and_exact_bits(tmp_path):
    nan_payload = struct.unpack("<d", struct.pack("<Q", 0x7FF0000000000123))[0]  # signalling
    tree = {"neg0": -0.0, "inf": float("-inf"), "nan": nan_payload, "big": -(1 << 200),
            "u64": (1 << 64) - 1, "i64": -(1 << 63), "past": 1 << 64, "t": True, "none": None,
            "s": "ü/.", "b": b"\x00\xff", "np64": np.float64(-0.0), "npstr": np.str_("x"),
            "npbytes": np.bytes_(b"y"), "npbool": np.bool_(True), "bf": ml_dtypes.bfloat16(1.5),
            "when": np.datetime64("2024-02-29T12:00", "m"), 7: (1, [2.5, (None,)]), "": {}}
    unickpt.save(tmp_path / "ck", tree)
    out = unickpt.load(tmp_path / "ck")
    assert_bitwise_equal(tree, out)
    assert type(out["np64"]) is np.float64 and type(out["npstr"]) is np.str_
    assert struct.pack("<d", out["nan"]) == struct.pack("<Q", 0x7FF0000000000123)


def test_sharded_and_lazy_leaves_assemble_on_load(tmp_path):
    a = np.arange(24, dtype=">i4").reshape(4, 6)
    sa = ShardedArray((4, 6), a.dtype, [Piece(((2, 4), (0, 6)), a[2:]),
                                        Piece(((0, 2), (0, 6)),
                                              LazyArray((2, 6), a.dtype, lambda: a[:2].copy()))])
    unickpt.save(tmp_path / "ck", {"s": sa})
    out = unickpt.load(tmp_path / "ck")["s"]
    assert out.dtype == np.dtype(">i4") and (out == a).all()
    with CheckpointReader(tmp_path / "ck") as r:
        kept = r.tree(assemble=False)["s"]
    assert isinstance(kept, ShardedArray) and len(kept.pieces) == 2
    assert sorted(p.index for p in kept.pieces) == [((0, 2), (0, 6)), ((2, 4), (0, 6))]
    info = unickpt.inspect(tmp_path / "ck")
    assert [(lf.path, lf.kind, lf.shape, lf.nbytes) for lf in info.leaves] == \
        [("s", "sharded", (4, 6), 96)]


_NP_CODES = {"F64", "F32", "F16", "I64", "U64", "I32", "U32", "I16", "U16", "I8", "U8", "BOOL",
             "C64"}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.text(min_size=1, max_size=5), ust.arrays(), min_size=1, max_size=6))
def test_safetensors_opens_the_array_file(tree):
    from unickpt.format.dtypes import safetensors_code
    with tempfile.TemporaryDirectory() as d:
        unickpt.save(d + "/ck", tree)
        with CheckpointReader(d + "/ck") as r:
            entries = {r._leaf_name(i): e for i, e in enumerate(r.manifest.arrays)}
        with safetensors.safe_open(d + "/ck/arrays.safetensors", framework="np") as f:
            assert f.metadata()["format"] == "unickpt"
            stored = set(f.keys())
            for key, a in tree.items():
                e = entries[unickpt.format_path((key,))]
                assert e.name in stored
                code = safetensors_code(e.dtype)
                if code not in _NP_CODES:  # BF16 / F8_*: safetensors' numpy backend lacks them
                    continue
                got = f.get_tensor(e.name)
                le = a.astype(a.dtype.newbyteorder("<")) if a.dtype.byteorder == ">" else a
                if code == "U8" and e.dtype != "uint8":  # raw little-endian bytes fallback
                    assert got.dtype == np.uint8 and got.shape == (a.nbytes,)
                else:
                    assert got.shape == a.shape
                assert got.tobytes() == le.tobytes()


def test_safetensors_reads_plain_numeric_arrays_equal(tmp_path):
    tree = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([True, False]),
            "i": np.arange(5, dtype=np.int64), "f": np.asfortranarray(np.eye(3))}
    unickpt.save(tmp_path / "ck", tree)
    with safetensors.safe_open(str(tmp_path / "ck/arrays.safetensors"), framework="np") as f:
        for k, v in tree.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and np.array_equal(got, v)


def test_a_leaf_named_like_the_safetensors_metadata_key_keeps_the_file_valid(tmp_path):
    tree = {"__metadata__": np.arange(3, dtype=np.int32), "a": {"b": np.ones(1)},
            "a/b": np.zeros(1)}  # also two paths that join to the same tensor name
    unickpt.save(tmp_path / "ck", tree)
    with safetensors.safe_open(str(tmp_path / "ck/arrays.safetensors"), framework="np") as f:
        assert f.metadata() == {"format": "unickpt", "unickpt_format": "3"}
        assert sorted(f.keys()) == ["__metadata__#2", "a/b", "a/b#2"]
        assert f.get_tensor("__metadata__#2").tolist() == [0, 1, 2]
    assert_bitwise_equal(tree, unickpt.load(tmp_path / "ck"))


def test_data_is_aligned_and_header_padded(tmp_path):
    tree = {"a": np.ones(3, np.int8), "u": np.array(["abc"], "U3"), "v": np.zeros(1, "V3"),
            "b": np.ones(3, np.float64), "c": np.ones(3, np.int16),
            "d": np.ones(1, np.complex128), "s": np.array([b"x"], "S3"), "e": np.ones(5, np.int32)}
    unickpt.save(tmp_path / "ck", tree)
    with CheckpointReader(tmp_path / "ck") as r:
        (fe,) = r.manifest.files
        assert fe.data_start % 64 == 0
        offs = [(e.offset, e.nbytes, dtype_from_name(e.dtype).itemsize)
                for e in r.manifest.arrays]
    assert all(o % min(isz & -isz, 64) == 0 for o, _, isz in offs)  # natural alignment
    spans = sorted((o, o + n) for o, n, _ in offs)
    assert all(e0 == s1 for (_, e0), (s1, _) in zip(spans, spans[1:]))  # no gaps (safetensors)
    assert spans[-1][1] == fe.size
    assert sorted(o for o, _, _ in offs)[0] == fe.data_start  # no gap before the first array


# ------------------------------------------------------------------ commit / overwrite
def test_overwrite_is_refused_by_default_and_replaces_atomically(tmp_path):
    p = tmp_path / "ck"
    unickpt.save(p, {"v": 1})
    with pytest.raises(unickpt.CheckpointExistsError, match="overwrite=True"):
        unickpt.save(p, {"v": 2})
    assert unickpt.load(p) == {"v": 1}
    unickpt.save(p, {"w": np.zeros(2)}, overwrite=True)
    assert list(unickpt.load(p)) == ["w"]  # replaced, not merged
    assert _entries(tmp_path) == ["ck"]


def test_overwrite_refuses_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "precious.txt").write_text("x")
    with pytest.raises(unickpt.CheckpointExistsError, match="not a unickpt checkpoint"):
        unickpt.save(tmp_path / "ck", {"v": 1}, overwrite=True)
    assert (tmp_path / "ck" / "precious.txt").read_text() == "x"


class _Opaque:
    pass


def test_unsupported_leaf_deep_in_tree_leaves_nothing(tmp_path):
    tree = {"ok": np.ones(1000), "deep": {"a": [1, {"b": (2, _Opaque())}]}}
    with pytest.raises(unickpt.UnsupportedLeafError, match=r"deep/a/1/b/1.*_Opaque"):
        unickpt.save(tmp_path / "ck", tree)
    assert _entries(tmp_path) == []


def test_exception_while_writing_leaves_nothing(tmp_path):
    def boom():
        raise RuntimeError("device lost")

    big = {f"x{i}": np.full(1 << 18, i, np.float32) for i in range(40)}  # 40 MiB: threaded path
    for tree in ({"a": np.ones(10), "lazy": LazyArray((3,), np.dtype("f4"), boom)},
                 {**big, "lazy": LazyArray((3,), np.dtype("f4"), boom)}):
        with pytest.raises(RuntimeError, match="device lost"):
            unickpt.save(tmp_path / "ck", tree)
        assert _entries(tmp_path) == []
    # a failing overwrite keeps the old checkpoint intact
    unickpt.save(tmp_path / "ck", {"v": 1})
    with pytest.raises(RuntimeError, match="device lost"):
        unickpt.save(tmp_path / "ck", {"lazy": LazyArray((3,), np.dtype("f4"), boom)},
                     overwrite=True)
    assert _entries(tmp_path) == ["ck"] and unickpt.load(tmp_path / "ck") == {"v": 1}


def test_lazy_array_with_wrong_shape_is_refused(tmp_path):
    lz = LazyArray((3,), np.dtype("f4"), lambda: np.zeros(4, np.float32))
    with pytest.raises(ValueError, match=r"bad: lazy array produced float32\[4\]"):
        unickpt.save(tmp_path / "ck", {"bad": lz})
    assert _entries(tmp_path) == []


@pytest.mark.parametrize("tree, match", [
    ({"k": "\ud800"}, r"k: string .* not valid Unicode"),
    ({"\udc00": 1}, "not valid Unicode"),
    ({"a": np.zeros(2, dtype=object)}, r"cannot save a: .*object"),
    ({"a": np.zeros(2, dtype=[("x", "i4")])}, "structured"),
    ({(1, 2): 1}, "keys must be str or 64-bit int"),
    ({True: 1}, "keys must be str or 64-bit int"),
    ({1 << 64: 1}, "keys must be str or 64-bit int"),
    ({"a": np.zeros(2, dtype="datetime64")}, "generic time unit"),
])
def test_unstorable_values_are_refused_before_writing(tmp_path, tree, match):
    with pytest.raises(unickpt.UnsupportedLeafError, match=match):
        unickpt.save(tmp_path / "ck", tree)
    assert _entries(tmp_path) == []


def test_reference_cycles_and_too_deep_trees_are_refused(tmp_path):
    cyc: list = [1]
    cyc.append(cyc)
    with pytest.raises(unickpt.UnsupportedLeafError, match="reference cycle"):
        unickpt.save(tmp_path / "a", cyc)
    with pytest.raises(unickpt.UnsupportedLeafError, match="reference cycle"):
        unickpt.save(tmp_path / "a", {"x": [cyc]})
    deep: object = 1
    for _ in range(300):
        deep = [deep]
    with pytest.raises(unickpt.UnsupportedLeafError, match="deeper than 256 levels"):
        unickpt.save(tmp_path / "b", deep)
    ok: object = np.ones(2)
    for _ in range(255):
        ok = {"k": ok}
    unickpt.save(tmp_path / "c", ok)
    assert_bitwise_equal(ok, unickpt.load(tmp_path / "c"))
    assert _entries(tmp_path) == ["c"]


def test_metadata_and_info_round_trip_and_must_be_plain(tmp_path):
    meta = {"lr": 0.1, "tags": ["a", "b"], 3: {"nested": None}, "np": np.int64(5)}
    save_recorded(tmp_path / "ck", {"w": 1}, metadata=meta, info={"step": 7})
    info = unickpt.inspect(tmp_path / "ck")
    assert info.metadata == {"lr": 0.1, "tags": ["a", "b"], 3: {"nested": None}, "np": 5}
    assert info.info == {"step": 7} and info.format_version == 3
    with pytest.raises(unickpt.UnsupportedLeafError, match=r"metadata at x: ndarray"):
        unickpt.save(tmp_path / "ck2", {}, metadata={"x": np.ones(2)})
    assert _entries(tmp_path) == ["ck"]


def test_expected_array_helper_matches_loaded_lazy_array(tmp_path):
    lz = LazyArray((2, 2), np.dtype(">f8"), lambda: np.eye(2, dtype=">f8"))
    unickpt.save(tmp_path / "ck", [lz])
    (got,) = unickpt.load(tmp_path / "ck")
    assert got.dtype.str == ">f8" and got.tobytes() == expected_array(lz).tobytes()


# ------------------------------------------------------------------ strategies themselves
@settings(max_examples=100, deadline=None)
@given(st.integers(0, 50).flatmap(lambda n: st.tuples(st.just(n), ust.interruption_schedules(n))))
def test_interruption_schedules_are_sorted_unique_and_in_range(case):
    n, steps = case
    assert steps == sorted(set(steps)) and all(0 <= k <= n for k in steps)


def test_interruption_schedules_reach_the_edges():
    from hypothesis import find

    assert find(ust.interruption_schedules(20), lambda s: {0, 1, 19, 20} <= set(s)) \
        == [0, 1, 19, 20]
    assert find(ust.interruption_schedules(20), lambda s: True) == []
    assert find(ust.interruption_schedules(0), lambda s: s) == [0]
    with pytest.raises(ValueError, match="total_steps must be >= 0"):
        ust.interruption_schedules(-1)


def test_strategies_draw_from_the_whole_dtype_allow_list():
    from unickpt.format import dtypes

    names = {dtype_name(d) for d in ust.ARRAY_DTYPES}
    assert set(dtypes.allowed_dtypes()) <= names
    assert {"datetime64[as]", "timedelta64[Y]", "U3", "S4", "V3"} <= names


def test_state_trees_cover_every_leaf_kind():

    kinds = {
        "big-endian array": lambda x: isinstance(x, np.ndarray) and x.dtype.byteorder == ">",
        "fortran array": lambda x: isinstance(x, np.ndarray) and x.ndim > 1
        and x.flags.f_contiguous and not x.flags.c_contiguous,
        "strided view": lambda x: isinstance(x, np.ndarray) and not x.flags.contiguous,
        "empty array": lambda x: isinstance(x, np.ndarray) and x.size == 0,
        "0-d array": lambda x: isinstance(x, np.ndarray) and x.ndim == 0,
        "ml_dtypes float": lambda x: isinstance(x, np.ndarray)
        and x.dtype.name.startswith(("bfloat16", "float8", "float4", "float6")),
        "ml_dtypes int": lambda x: isinstance(x, np.ndarray)
        and x.dtype.name in ("int1", "int2", "int4", "uint1", "uint2", "uint4"),
        "datetime": lambda x: isinstance(x, np.ndarray) and x.dtype.kind in "mM",
        "unicode": lambda x: isinstance(x, np.ndarray) and x.dtype.kind == "U",
        "numpy scalar": lambda x: isinstance(x, np.generic),
        "sharded": lambda x: isinstance(x, ShardedArray) and len(x.pieces) > 1,
        "lazy": lambda x: isinstance(x, LazyArray),
        "huge int": lambda x: type(x) is int and abs(x) > 1 << 64,
        "nan payload": lambda x: isinstance(x, float) and x != x
        and struct.pack("<d", x) != struct.pack("<d", float("nan")),
        "negative zero": lambda x: isinstance(x, float) and struct.pack("<d", x)
        == struct.pack("<d", -0.0),
    }
    seen: set[str] = set()
    tree_kinds: set[str] = set()

    def walk(x, depth=0):
        yield x, depth
        if isinstance(x, dict):
            for v in x.values():
                yield from walk(v, depth + 1)
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from walk(v, depth + 1)

    @settings(max_examples=250, database=None, derandomize=True, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(ust.state_trees(), st.lists(ust.leaves(), min_size=3, max_size=3))
    def sample(tree, more):
        for leaf in more:
            seen.update(name for name, pred in kinds.items() if pred(leaf))
        for node, depth in walk(tree):
            seen.update(name for name, pred in kinds.items() if pred(node))
            if isinstance(node, dict) and any(type(k) is int for k in node):
                tree_kinds.add("int key")
            if isinstance(node, dict) and any(k in ("/", ".", "") for k in node):
                tree_kinds.add("awkward key")
            if isinstance(node, tuple):
                tree_kinds.add("tuple")
            if depth >= 2:
                tree_kinds.add("nested")

    sample()
    assert seen == set(kinds), set(kinds) - seen
    assert tree_kinds == {"int key", "awkward key", "tuple", "nested"}
