"""The fast load path gives what the simple one gives, and still catches every corruption.

The load of many small arrays works on columns: the manifest's array entries are validated
column by column (``columns.table`` for the v3 array table, ``table.fast_table`` for a v2 list
of maps; each falls back to the entry-by-entry validation when in doubt), dict nodes made only of array references are decoded at once, the tree paths of the
arrays are found only when needed, and batched reads hash and build their arrays with ``map``.
Each is checked here against the simple path it replaces, on hypothesis-generated states.
"""

from __future__ import annotations

import dataclasses
import os

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import unickpt
from unickpt.format import columns
from unickpt.format import manifest as manifest_mod
from unickpt.format import reader as reader_mod
from unickpt.format import table as table_mod
from unickpt.format.reader import CheckpointReader
from unickpt.testing import strategies as ust

EXAMPLES = int(os.environ.get("UNICKPT_EXAMPLES", "0")) or 30
SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


def _body(path) -> dict:
    with open(os.path.join(path, manifest_mod.MANIFEST_NAME), "rb") as f:
        outer = msgpack.unpackb(f.read(), raw=False)
    return msgpack.unpackb(outer["body"], raw=False, strict_map_key=False)


def _read(raw: bytes, path, monkeypatch, *, slow: bool) -> manifest_mod.Manifest:
    """The manifest ``raw``, read with the column validations on, or (``slow``) both off."""
    with monkeypatch.context() as m:
        if slow:
            m.setattr(manifest_mod, "fast_table", lambda *a: None)
            m.setattr(columns, "table", lambda *a: None)
        return manifest_mod.read_manifest_bytes(raw, path)


def _fail(msg: str):
    raise AssertionError(msg)


def _same(a: object, b: object) -> None:
    assert type(a) is type(b), (type(a), type(b))
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _paths_by_decoding(r: CheckpointReader) -> dict:
    """Array entry -> path, recorded while decoding (how the reader found them before)."""
    paths: dict = {}

    def array(i, p):
        paths.setdefault(i, p)
        return ("a", i)

    def sharded(i, p):
        for k, (_, a) in enumerate(r.manifest.sharded[i].pieces):
            paths.setdefault(a, (*p, f"<piece {k}>"))
        return ("s", i)

    manifest_mod.decode_node(r.manifest.tree,
                             manifest_mod.DecodeContext(r.manifest, r.path, array, sharded))
    return paths


def _many(draw: st.DrawFn) -> dict:
    """Groups of small arrays of mixed dtypes and shapes, some groups all arrays (the fast
    dict path), some mixed with scalars, sub-dicts and lists (the loop)."""
    dtypes = st.sampled_from(["<f4", "<i4", "<f2", "u1", "<f8", "S3", ">i2", "?"])
    out: dict = {}
    for g in range(draw(st.integers(1, 4))):
        grp = out.setdefault(f"g{g}", {})
        for k in range(draw(st.integers(0, 12))):
            shape = tuple(draw(st.lists(st.integers(0, 4), max_size=2)))
            dt = np.dtype(draw(dtypes))
            n = int(np.prod(shape)) * dt.itemsize
            raw = np.random.default_rng(k + 31 * g).integers(0, 256, n, dtype=np.uint8)
            grp[f"p{k}"] = raw.view(dt).reshape(shape) if n else np.zeros(shape, dt)
        if draw(st.booleans()):
            grp["step"] = draw(st.integers(-5, 5))
            grp["scalar"] = np.float32(1.5)
            grp["list"] = [np.arange(3), "x"]
    return out


@SETTINGS
@given(tree=st.one_of(ust.state_trees(max_leaves=16), st.composite(_many)()))
def test_fast_paths_equal_the_simple_ones(tree, tmp_path_factory, monkeypatch):
    d = tmp_path_factory.mktemp("ck") / "c"
    unickpt.save(d, tree)
    with open(os.path.join(d, manifest_mod.MANIFEST_NAME), "rb") as f:
        raw = f.read()
    with CheckpointReader(d) as r:
        # the column validation of the v3 table accepts every valid manifest, and gives the
        # entries the entry-by-entry validation gives
        body = _body(d)
        assert body["format_version"] == 3 and type(body["arrays"]) is dict
        files = {f.name: (f.data_start, f.size) for f in r.manifest.files}
        fast = columns.table(columns.decode(body["arrays"], list(files), _fail), files)
        assert fast is not None
        simple = list(_read(raw, d, monkeypatch, slow=True).arrays)
        assert list(r.manifest.arrays) == list(fast) == simple
        # the same for the v2 list of maps (fast_table) of the same manifest
        raw2 = dataclasses.replace(r.manifest, format_version=2).to_bytes()
        body2 = msgpack.unpackb(msgpack.unpackb(raw2)["body"], strict_map_key=False)
        assert body2["format_version"] == 2 and type(body2["arrays"]) is list
        assert table_mod.fast_table(body2["arrays"], files) is not None
        assert list(_read(raw2, d, monkeypatch, slow=False).arrays) == simple
        assert list(_read(raw2, d, monkeypatch, slow=True).arrays) == simple
        # paths found lazily = paths recorded while decoding
        assert r.array_paths == _paths_by_decoding(r)
        # batched reads = one read per array, bit for bit
        got = [None] * len(r.arrays)
        for batch in r._small_batches([i for i, n in enumerate(r.arrays.nbytes)
                                       if 0 < n <= reader_mod.SMALL_READ]):
            for i, a in zip(batch, r._read_batch(batch, True)):
                got[i] = a
        for i, a in enumerate(got):
            if a is not None:
                _same(a, r.read_array(i))
                if isinstance(a, np.ndarray):
                    assert a.flags.aligned and a.flags.writeable
    back = unickpt.load(d)
    mapped = unickpt.load(d, mmap=True, verify=True)
    assert repr(back) == repr(mapped)


def test_mapped_small_arrays_are_read_only_views_of_the_file(tmp_path):
    tree = {"g": {f"p{k}": np.arange(k + 1, dtype="<f4") for k in range(40)},
            "b": np.arange(3, dtype=">i2"), "s": np.float32(2.0), "e": np.zeros(0)}
    unickpt.save(tmp_path / "c", tree)
    with CheckpointReader(tmp_path / "c") as r:
        mapped = r.tree(mmap=True)
        mm = r._mapped("arrays.safetensors")
        lo = np.frombuffer(mm, np.uint8).ctypes.data
        for k, a in mapped["g"].items():
            _same(a, tree["g"][k])
            assert not a.flags.writeable and lo <= a.ctypes.data < lo + len(mm)
    _same(mapped["b"], tree["b"])  # converted back to big-endian: a copy
    _same(mapped["s"], tree["s"])
    _same(mapped["e"], tree["e"])


@SETTINGS
@given(tree=st.composite(_many)(), data=st.data())
def test_a_flipped_byte_in_any_array_is_caught_and_named(tree, data, tmp_path_factory):
    d = tmp_path_factory.mktemp("ck") / "c"
    unickpt.save(d, tree)
    with CheckpointReader(d) as r:
        nonempty = [i for i, n in enumerate(r.arrays.nbytes) if n]
        if not nonempty:
            return
        i = data.draw(st.sampled_from(nonempty))
        e, name = r.manifest.arrays[i], r._leaf_name(i)
    pos = e.offset + data.draw(st.integers(0, e.nbytes - 1))
    f = d / e.file
    raw = bytearray(f.read_bytes())
    raw[pos] ^= 1 << data.draw(st.integers(0, 7))
    f.write_bytes(bytes(raw))
    with pytest.raises(unickpt.CorruptCheckpointError, match="checksum mismatch") as ei:
        unickpt.load(d)
    assert ei.value.leaves == [name]
    assert f"leaf {name}: checksum mismatch" in str(ei.value)
    assert unickpt.load(d, verify=False) is not None  # verify=False reads it anyway


def test_a_manifest_of_10000_entries_takes_the_column_path(tmp_path, monkeypatch):
    tree = {f"g{g}": {f"p{p}": np.full(4, p, np.float32) for p in range(100)}
            for g in range(100)}
    unickpt.save(tmp_path / "c", tree)
    calls = []
    slow = manifest_mod.optional_array_fields  # called per entry by the slow validation only

    def spy(*a):
        calls.append(a[1])
        return slow(*a)

    monkeypatch.setattr(manifest_mod, "optional_array_fields", spy)
    as_entries = columns.as_entries  # the v3 table's way to that validation

    def entries_spy(c):
        calls.append("as_entries")
        return as_entries(c)

    monkeypatch.setattr(columns, "as_entries", entries_spy)
    with CheckpointReader(tmp_path / "c") as r:
        assert isinstance(r.manifest.arrays, table_mod.ArrayTable)
        assert r._paths is None  # no path made by a plain open
        back = r.tree()
        assert r._paths is None  # nor by a load
    assert calls == []
    assert back["g99"]["p7"].tolist() == [7.0] * 4


@pytest.mark.parametrize("damage", ["dup key", "bool key", "out of range", "bool index",
                                    "not a ref", "float key", "list tag", "map tag"])
def test_dict_of_array_refs_refuses_what_the_loop_refuses(damage, tmp_path):
    """The all-references dict path hands anything unusual to the loop: same errors."""
    unickpt.save(tmp_path / "c", {"a": np.zeros(2), "b": np.ones(2)})
    body = _body(tmp_path / "c")
    payload = body["tree"][1]
    payload[0], payload[1], payload[2], payload[3] = {
        "dup key": ("a", ["a", 0], "a", ["a", 1]),
        "bool key": (True, ["a", 0], "b", ["a", 1]),
        "out of range": ("a", ["a", 0], "b", ["a", 2]),
        "bool index": ("a", ["a", 0], "b", ["a", True]),
        "not a ref": ("a", ["a", 0], "b", ["x", 1]),
        "float key": (1.5, ["a", 0], "b", ["a", 1]),
        "list tag": ("a", ["a", 0], "b", [["a", 1], 1]),
        "map tag": ("a", [{"a": 1}, 0], "b", ["a", 1])}[damage]
    with_ref = manifest_mod.DecodeContext(None, "ck", None, None, ref=int)
    without = manifest_mod.DecodeContext(None, "ck", lambda i, p: i, None)

    class M:
        arrays = [None, None]
        sharded: list = []

    with_ref.manifest = without.manifest = M  # type: ignore[assignment]
    outcomes = []
    for ctx in (with_ref, without):
        try:
            outcomes.append(("ok", manifest_mod.decode_node(body["tree"], ctx)))
        except unickpt.CorruptCheckpointError as e:
            outcomes.append(("error", str(e)))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0] == "error" or damage == "not a ref"
