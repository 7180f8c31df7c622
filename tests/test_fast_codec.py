"""The fast encoder and decoder give exactly what the simple reference ones give.

The writer's per-array hot paths (flatten, layout, tensor names, manifest entries) and the
reader's manifest decoding and validation were rewritten for speed with 10,000 small leaves.
``_reference_writer`` and ``_reference_manifest`` keep the simple versions; here both
run on hypothesis-generated state trees (awkward keys, every dtype, scalars, lazy and sharded
leaves) and must give byte-identical safetensors headers and manifests, the same decoded
manifest and tree, and, on damaged manifests, the same error with the same message.  Damage
reaches both encodings of the array entries: the v3 table's columns, and the v2 entry maps
(which the v3 reader also builds from the table to name a bad entry).
"""

from __future__ import annotations

import copy
import dataclasses

import _reference_manifest as ref_manifest
import _reference_writer as ref_writer
import msgpack
import numpy as np
import pytest
from _manifest_body import as_table, entries_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unickpt.errors import CorruptCheckpointError, UnickptError, UnsupportedLeafError
from unickpt.format import checksum
from unickpt.format import manifest as manifest_mod
from unickpt.format import writer as writer_mod
from unickpt.state import to_tree
from unickpt.testing import strategies as ust

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _encode(mod, neutral, kinds, metadata=None, info=None):
    node, jobs, sharded = mod.flatten(neutral)
    header, size = mod.layout(jobs)
    for k, j in enumerate(jobs):  # what the data writes would fill in
        digest = (k * 0x9E3779B97F4A7C15) % (1 << 64)
        if mod is writer_mod:  # the writer keeps each entry's fields on its job
            j.xxh3 = digest
        else:
            j.entry.xxh3 = digest
    if mod is writer_mod:  # the writer lists its files itself (several, when incremental)
        files = [manifest_mod.FileEntry(writer_mod.DATA_FILE, size, len(header),
                                        checksum.digest(header))]
        raw = mod._manifest_bytes(node, jobs, sharded, files, kinds, metadata, info)
    else:
        raw = mod._manifest_bytes(node, jobs, sharded, size, header, kinds, metadata, info)
    return node, header, size, raw


def _reference_and_fast(tree, metadata=None, info=None):
    neutral, kinds = to_tree(tree)
    return (_encode(ref_writer, neutral, kinds, metadata, info),
            _encode(writer_mod, neutral, kinds, metadata, info))


@SETTINGS
@given(ust.state_trees(max_leaves=24))
def test_fast_encoder_gives_the_reference_header_and_manifest_bytes(tree):
    ref, fast = _reference_and_fast(tree, {"m": [1, "x"]}, {"step": 3})
    assert fast[0] == ref[0]
    assert fast[1] == ref[1]  # safetensors header, byte for byte
    assert fast[2] == ref[2]
    assert fast[3] == ref[3]  # manifest, byte for byte


@SETTINGS
@given(st.lists(st.sampled_from(["<f4", "<f8", "<i2", "u1", ">f4", "S3", "<c8"]), min_size=1,
                max_size=40),
       st.lists(st.sampled_from(["a", "b", "a/b", "<root>", "__metadata__", "x#2", "é", '"']),
                min_size=1, max_size=6))
def test_many_arrays_with_clashing_names_and_mixed_alignment(dtypes, keys):
    # names that clash after joining ("a/b" vs a -> b), the reserved "__metadata__", names that
    # need JSON escapes, and dtypes of several alignments (the sorted layout) or one (unsorted)
    tree: dict = {}
    for i, dt in enumerate(dtypes):
        k = keys[i % len(keys)]
        sub = tree.setdefault(k, {})
        sub[keys[(i // len(keys)) % len(keys)] + str(i // (len(keys) ** 2))] = \
            np.zeros(i % 5, dtype=dt)
        tree.setdefault("a/b" if i % 3 else "a", {})[f"b{i}" if i % 2 else "b"] = np.ones(3)
    ref, fast = _reference_and_fast(tree)
    assert fast == ref


def test_a_uniform_state_of_many_small_arrays_is_byte_identical():
    rng = np.random.default_rng(0)
    tree = {f"g{g}": {f"p{p}": rng.standard_normal(256).astype(np.float32) for p in range(50)}
            for g in range(40)}
    tree["g0"]["p0"] = np.float64(3.5)  # a scalar and a second alignment among them
    ref, fast = _reference_and_fast(tree)
    assert fast == ref


@pytest.mark.parametrize("tree", [
    {"a": {"\ud800": np.ones(2)}},          # lone surrogate in a key
    {"a": [np.ones(2), object()]},          # not a leaf
    {"a": np.ones(2, dtype=object)},        # unsupported dtype
    {"a": {1.5: np.ones(2)}},               # float key
    {"a": {True: np.ones(2)}},              # bool key
    {"a": {1 << 70: np.ones(2)}},           # key outside 64 bits
])
def test_fast_flatten_refuses_what_the_reference_refuses_with_the_same_message(tree):
    with pytest.raises(UnsupportedLeafError) as ref:
        ref_writer.flatten(tree)
    with pytest.raises(UnsupportedLeafError) as fast:
        writer_mod.flatten(tree)
    assert str(fast.value) == str(ref.value)


# --------------------------------------------------------------------------- decoding
def _decode(mod, raw: bytes) -> str:
    """The decoded manifest and tree, or the error, as text (repr: NaN equals NaN, -0.0 does
    not equal 0.0)."""
    return repr(_decode_raw(mod, raw))


def _array_fields(a) -> tuple:
    """An array entry's fields; the optional ``head_xxh3`` (added for incremental saves after
    the reference copy was taken) is left out when absent, so both decoders compare."""
    fields = {f.name: getattr(a, f.name) for f in dataclasses.fields(a)}
    if fields.get("head_xxh3", 0) is None:
        del fields["head_xxh3"]
    return tuple(fields.values())


def _decode_raw(mod, raw: bytes):
    try:
        m = mod.read_manifest_bytes(raw, "ck")
        ctx = mod.DecodeContext(m, "ck", lambda i, p: ("array", i, p),
                                lambda i, p: ("sharded", i, p))
        tree = mod.decode_node(m.tree, ctx)
    except UnickptError as e:
        return ("error", type(e).__name__, str(e))
    return ("ok", m.format_version, m.library_version, m.tree,
            [_array_fields(a) for a in m.arrays],
            [dataclasses.astuple(s) for s in m.sharded],
            [dataclasses.astuple(f) for f in m.files], m.kinds, m.metadata, m.info, tree)


def _repack(body: dict, version: int | None = None) -> bytes:
    """The manifest file of ``body``, its outer version ``version`` (default: the body's)."""
    raw = msgpack.packb(body, use_bin_type=True)
    if version is None:
        version = body["format_version"]
    return msgpack.packb({"unickpt": version, "xxh3": checksum.digest(raw), "body": raw},
                         use_bin_type=True)


def _as_v2(body: dict, version: int = 2) -> dict:
    """The same manifest body in version ``version`` (2 or 1): the array table as entry maps."""
    body = copy.deepcopy(body)
    body["arrays"] = entries_of(body)
    body["format_version"] = version
    if version == 1:
        for f in body["files"]:
            f.pop("header_xxh3")
    return body


def _as_v3(body: dict) -> dict:
    """A v2 body with its entries as the array table; TypeError when a value fits no column."""
    body = copy.deepcopy(body)
    table = as_table(body["arrays"], body["files"])
    if table is None:
        raise TypeError("a value no column holds")
    body["arrays"] = table
    body["format_version"] = 3
    return body


# What a damaged v3 table column may hold instead: wrong types, bins of every length that
# matters (empty, one item short, one item long), indices beyond their tables.
def _hostile_columns(table: dict) -> list:
    out: list = [*HOSTILE, [0, 0], [1, 0], [0, 1 << 40]]
    for v in table.values():
        if isinstance(v, bytes):
            out += [v[:-1], v + b"\x00", v[:len(v) // 2], v + v, b"\xff" * len(v),
                    bytes(len(v))]
    return out


HOSTILE = [None, True, False, -1, 0, 1, 7, 1 << 63, (1 << 64) - 1, 1.5, "", "x", "<", ">",
           "float32", "uint8", "arrays.safetensors", [], [1], [-1], [True], [1 << 62], [2, 2],
           [[0, 1]], {}, {"a": 1}, b"\x00", ["a", 0], ["d", []], ["q", 1]]


@SETTINGS
@given(ust.state_trees(max_leaves=16), st.data())
def test_fast_decoder_gives_the_reference_result_or_error(tree, data):
    neutral, kinds = to_tree(tree)
    _node, _h, _s, raw = _encode(writer_mod, neutral, kinds)
    assert _decode(manifest_mod, raw) == _decode(ref_manifest, raw)
    # one damaged field, re-checksummed so that validation (not the checksum) must catch it
    body = msgpack.unpackb(msgpack.unpackb(raw, raw=False)["body"], raw=False,
                           strict_map_key=False)
    version = data.draw(st.sampled_from([3, 3, 3, 2, 1]))
    if version < 3:
        body = _as_v2(body, version)
    where = data.draw(st.sampled_from(["arrays", "files", "sharded", "tree", "kinds", "top"]))
    value = data.draw(st.sampled_from(HOSTILE))
    if where == "arrays" and version == 3:
        table = body["arrays"]
        key = data.draw(st.sampled_from(sorted(table) + ["byteorder", "scalar", "head",
                                                         "head_xxh3"]))
        hostile = data.draw(st.sampled_from(_hostile_columns(table)))
        if data.draw(st.booleans()) and key in table:
            del table[key]
        elif isinstance(table.get(key), bytes) and table[key] and data.draw(st.booleans()):
            col = bytearray(table[key])  # one byte of one packed value changed
            col[data.draw(st.integers(0, len(col) - 1))] ^= data.draw(st.integers(1, 255))
            table[key] = bytes(col)
        else:
            table[key] = hostile
    elif where == "top":
        body[data.draw(st.sampled_from(sorted(body)))] = value
    elif where == "tree":
        body["tree"] = _mutate_tree(body["tree"], value, data)
    elif body.get(where):
        items = body[where]
        k = data.draw(st.integers(0, len(items) - 1))
        if isinstance(items[k], dict) and data.draw(st.booleans()):
            field = data.draw(st.sampled_from(sorted(items[k]) + ["byteorder", "scalar"]))
            if data.draw(st.booleans()) and field in items[k]:
                del items[k][field]
            else:
                items[k][field] = value
        else:
            items[k] = value
    else:
        body[where] = value
    damaged = _repack(body, data.draw(st.sampled_from([version] * 4 + [1, 2, 3])))
    assert _decode(manifest_mod, damaged) == _decode(ref_manifest, damaged)


def _mutate_tree(node, value, data):
    if isinstance(node, list) and len(node) == 2 and isinstance(node[1], list) and node[1] \
            and data.draw(st.booleans()):
        k = data.draw(st.integers(0, len(node[1]) - 1))
        node[1][k] = _mutate_tree(node[1][k], value, data)
        return node
    if isinstance(node, list) and len(node) == 2 and data.draw(st.booleans()):
        return [node[0], value]
    return value


def test_fast_decoder_on_a_uniform_state_of_many_small_arrays():
    rng = np.random.default_rng(0)
    tree = {f"g{g}": {f"p{p}": rng.standard_normal(256).astype(np.float32) for p in range(50)}
            for g in range(40)}
    _node, _h, _s, raw = _encode(writer_mod, *to_tree(tree))
    fast = _decode(manifest_mod, raw)
    assert fast.startswith("('ok'") and fast == _decode(ref_manifest, raw)
    body = msgpack.unpackb(msgpack.unpackb(raw, raw=False)["body"], raw=False)
    offsets = np.frombuffer(body["arrays"]["offset"], "<i8").copy()
    offsets[1234] = offsets[1233]  # overlap, deep inside
    v3 = copy.deepcopy(body)
    v3["arrays"]["offset"] = offsets.tobytes()
    v2 = _as_v2(v3)
    for damaged in (v3, v2):
        fast = _decode_raw(manifest_mod, _repack(damaged))
        assert repr(fast) == _decode(ref_manifest, _repack(damaged))
        assert fast[:2] == ("error", CorruptCheckpointError.__name__)
        assert "arrays 1233 and 1234 overlap" in fast[2]


def _small_body() -> dict:
    tree = {"a": {"x": np.ones(3, np.float32), "y": np.float64(2.0), "s": "t"},
            "b": [np.zeros((2, 2), ">i4"), np.zeros(0, np.uint8)], "c": np.array(b"ab")}
    _node, _h, _s, raw = _encode(writer_mod, *to_tree(tree))
    return msgpack.unpackb(msgpack.unpackb(raw, raw=False)["body"], raw=False)


@pytest.mark.parametrize("field", ["file", "name", "dtype", "shape", "offset", "nbytes", "xxh3",
                                   "byteorder", "scalar"])
def test_every_hostile_value_in_every_array_field_gives_the_reference_outcome(field):
    """Each entry field set to each hostile value: in a v2 entry map as it is, and through the
    v3 table wherever a column can hold it (the same error either way, or the same result)."""
    n = len(_small_body()["arrays"]["name"])
    through_table = 0
    for k in range(n):
        for value in [*HOSTILE, "<delete>", -(1 << 63), [1 << 61, 8], [0, 1 << 61],
                      [1] * 65, ">f4", "bfloat16", "U3", "S0"]:
            body = _as_v2(_small_body())
            if value == "<delete>":
                body["arrays"][k].pop(field, None)
            else:
                body["arrays"][k][field] = value
            raw = _repack(body)
            v2 = _decode(manifest_mod, raw)
            assert v2 == _decode(ref_manifest, raw), (k, field, value)
            try:
                v3 = _repack(_as_v3(body))
            except TypeError:
                continue  # a value no column can hold (a str offset, a missing field)
            through_table += 1
            got = _decode(manifest_mod, v3)
            assert got == _decode(ref_manifest, v3), (k, field, value)
            # the same verdict as the entry maps (the version differs in an accepted result)
            assert got.startswith("('ok'") == v2.startswith("('ok'"), (k, field, value)
            if not got.startswith("('ok'"):
                assert got == v2, (k, field, value)
    assert through_table >= n  # every entry reached the v3 path at least once


@pytest.mark.parametrize("key", ["name", "file", "dtypes", "dtype", "ndim", "shape", "offset",
                                 "nbytes", "xxh3", "byteorder", "scalar", "head", "head_xxh3"])
def test_every_hostile_value_in_every_table_column_gives_the_reference_outcome(key):
    table = _small_body()["arrays"]
    for value in ["<delete>", *_hostile_columns(table)]:
        body = _small_body()
        if value == "<delete>":
            body["arrays"].pop(key, None)
        else:
            body["arrays"][key] = value
        raw = _repack(body)
        assert _decode(manifest_mod, raw) == _decode(ref_manifest, raw), (key, value)


@pytest.mark.parametrize("depth", [manifest_mod.MAX_DEPTH - 1, manifest_mod.MAX_DEPTH,
                                   manifest_mod.MAX_DEPTH + 1])
@pytest.mark.parametrize("leaf", [["a", 0], ["a", 1], ["a", -1], ["a", True], 5, "s", None,
                                  ["l", []], ["x", 0], [1, 2]])
def test_nesting_at_the_depth_limit_gives_the_reference_outcome(depth, leaf):
    body = _small_body()
    node = ["d", ["k", leaf, "j", ["a", 0]]]
    for d in range(depth):
        node = ["d", [d, node]] if d % 2 else ["l", [node]]
    body["tree"] = node
    raw = _repack(body)
    assert _decode(manifest_mod, raw) == _decode(ref_manifest, raw)


def test_dict_nodes_with_bad_keys_give_the_reference_outcome():
    for payload in [["k", 1, "k", 2], [True, 1], [1.5, 1], [None, ["a", 0]], ["k"],
                    [b"k", 1], [1, ["a", 0], 1, ["a", 1]], ["k", ["a", 99]]]:
        body = _small_body()
        body["tree"] = ["d", payload]
        raw = _repack(body)
        assert _decode(manifest_mod, raw) == _decode(ref_manifest, raw), payload


# --------------------------------------------------------------------------- garbage
def test_save_and_load_leave_nothing_for_the_cyclic_collector(tmp_path):
    """Every per-array object of a save or load is freed by reference counting when the call
    returns (no reference cycle keeps them), so no deferred collection has them to walk."""
    import gc

    import unickpt
    from unickpt.format import reader as reader_mod
    from unickpt.format.manifest import ArrayEntry

    tree = {f"g{g}": {f"p{p}": np.full(4, p, np.float32) for p in range(30)} for g in range(5)}
    # compared by type(): isinstance() asks some objects (torch's deprecated module
    # attributes) for __class__, which warns
    kinds = {writer_mod.Job, ArrayEntry, reader_mod._Ref, reader_mod._ShardedRef,
             reader_mod.CheckpointReader}
    gc.collect()
    gc.disable()
    try:
        # objects of these kinds that earlier tests keep alive are not this test's business
        before = {id(o) for o in gc.get_objects() if type(o) in kinds}
        unickpt.save(tmp_path / "c", tree)
        back = unickpt.load(tmp_path / "c")
        unickpt.inspect(tmp_path / "c")
        left = [type(o).__name__ for o in gc.get_objects()
                if type(o) in kinds and id(o) not in before]
    finally:
        gc.enable()
    assert left == []
    assert back["g4"]["p29"].tolist() == [29.0] * 4


@pytest.mark.parametrize("moved,offsets", [((1, 2), "same"), ((0, 2, 4), "same"),
                                           ((0, 1), "apart"), ((2,), "same")])
@pytest.mark.parametrize("version", [2, 3])
def test_overlaps_across_several_files_give_the_reference_outcome(moved, offsets, version):
    body = _as_v2(_small_body())
    f0 = body["files"][0]
    body["files"].append({**f0, "name": "b.safetensors"})
    for n, k in enumerate(moved):
        e = body["arrays"][k]
        e["file"] = "b.safetensors"
        e["offset"] = f0["data_start"] + (0 if offsets == "same" else 16 * n)
    raw = _repack(body if version == 2 else _as_v3(body))
    assert _decode(manifest_mod, raw) == _decode(ref_manifest, raw)
    # array numbers are the manifest's, not positions among the file's arrays
    overlap = "('ok'" if offsets == "apart" or len(moved) < 2 else \
        "arrays 4 and 0 overlap" if moved == (0, 2, 4) else \
        f"arrays {moved[0]} and {moved[1]} overlap in file 'b.safetensors'"
    assert overlap in _decode(manifest_mod, raw)
