"""The v3 array table (docs/FORMAT.md 4.1.2): hostile tables are typed errors naming the
checkpoint, and the table is an encoding, never a relaxation: its numpy validation
(``columns.table``) accepts exactly the tables whose entries pass the entry-by-entry
validation, and any damage gives the very message the v2 list of maps gives.

``UNICKPT_EXAMPLES=N`` runs N hypothesis examples per property (CI: a small fixed slice).
"""

from __future__ import annotations

import math
import os
import re

import _manifest_body as manifest_body
import msgpack
import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import unickpt
from unickpt.format import columns
from unickpt.format import manifest as manifest_mod
from unickpt.format.dtypes import dtype_from_name, has_byteorder
from unickpt.format.manifest import FileEntry, read_manifest_bytes
from unickpt.format.table import ArrayEntry
from unickpt.testing import strategies as ust

EXAMPLES = int(os.environ.get("UNICKPT_EXAMPLES", "0")) or 25
SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])
REQUIRED = ("name", "file", "dtypes", "dtype", "ndim", "shape", "offset", "nbytes", "xxh3")


def _fail(msg: str):
    raise AssertionError(msg)


def _sample(tmp_path) -> tuple[str, dict]:
    """A checkpoint whose table has every column, and that table."""
    tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "be": np.arange(3, dtype=">i4"),
            "big": np.zeros(16400, np.float32),  # over 64 KiB: has a head_xxh3
            "n": np.int64(7), "b": np.array([True, False])}
    path = str(tmp_path / "ck")
    unickpt.save(path, tree)
    t = manifest_body.read(path)[1]["arrays"]
    assert set(t) == {*REQUIRED, "byteorder", "scalar", "head", "head_xxh3"} and len(t["name"]) == 5
    return path, t


def _all_readers_raise(path: str, msg: str) -> None:
    """load, load(mmap), inspect and verify refuse the checkpoint with this very message."""
    for fn in (unickpt.load, lambda p: unickpt.load(p, mmap=True), unickpt.inspect,
               unickpt.verify):
        with pytest.raises(unickpt.CorruptCheckpointError,
                           match=f"^{re.escape(path)}: corrupt manifest: {re.escape(msg)}$"):
            fn(path)


def _cut(key: str):
    def mutate(t):
        n = len(t[key])
        t[key] = t[key][:-1]
        return f"array table: column {key!r} holds {n - 1} bytes, expected {n}"
    return mutate


def _set(key: str, value, msg: str):
    def mutate(t):
        t[key] = value(t) if callable(value) else value
        return msg.format(n=len(t["name"]), k=len(t["dtypes"]))
    return mutate


def _pop(key: str, msg: str | None = None):
    def mutate(t):
        t.pop(key)
        return msg or f"array table: column {key!r} missing or of the wrong type"
    return mutate


def _ndim_up(t):
    ndim = bytearray(t["ndim"])
    ndim[0] += 1
    t["ndim"] = bytes(ndim)
    return (f"array table: column 'shape' holds {len(t['shape'])} bytes, expected "
            f"{len(t['shape']) + 8}")


def _shape_up(t):
    t["shape"] += bytes(8)
    return (f"array table: column 'shape' holds {len(t['shape'])} bytes, expected "
            f"{len(t['shape']) - 8}")


def _dtypes_cut(t):  # one dtype listed: the first entry of another refers beyond the list
    t["dtypes"] = t["dtypes"][:1]
    i = next(i for i, d in enumerate(t["dtype"]) if d >= 1)
    return f"array table: entry {i} refers to dtype number {t['dtype'][i]}, beyond the 1 listed"


_WRONG = "array table: column {!r} missing or of the wrong type"
_SPARSE = "array table: {!r} must list entry numbers in [0, {{n}}), strictly increasing"
_HOSTILE = [
    *[_pop(k) for k in REQUIRED],
    *[_set(k, b"" if k in ("name", "dtypes") else [0], _WRONG.format(k)) for k in REQUIRED],
    _set("name", ("w",) * 2 + ("x",) * 4,  # one name more than the packed columns
         "array table: column 'file' holds 5 bytes, expected 6"),
    *[_cut(k) for k in ("file", "dtype", "ndim", "shape", "offset", "nbytes", "xxh3",
                        "head_xxh3")],
    _shape_up,
    _ndim_up,
    _set("file", b"\x00\x00\x00\x00\x01",
         "array table: entry 4 refers to file number 1, beyond the 1 listed"),
    _set("file", b"\x00\xff\x00\x00\x00",
         "array table: entry 1 refers to file number 255, beyond the 1 listed"),
    _set("dtype", lambda t: bytes([len(t["dtypes"])] * 5),
         "array table: entry 0 refers to dtype number {k}, beyond the {k} listed"),
    _dtypes_cut,
    *[_set(key, v, (_WRONG if v == "x" else _SPARSE).format(key))
      for key in ("byteorder", "scalar", "head")
      for v in ("x", [5], [-1], [True], ["0"], [0.0], [0, 0], [1, 0], [0, 5])],
    _set("head_xxh3", lambda t: t["head_xxh3"] + bytes(8),
         "array table: column 'head_xxh3' holds 16 bytes, expected 8"),
    _set("head_xxh3", [0], _WRONG.format("head_xxh3")),
    _pop("head_xxh3"),
    _pop("head", "array table: column 'head_xxh3' holds 8 bytes, expected 0"),
    # well formed, yet not an entry: the entry-by-entry validation names it
    _set("name", lambda t: [7] + t["name"][1:], "array 0: field 'name' missing or of the "
         "wrong type"),
]


@pytest.mark.parametrize("k", range(len(_HOSTILE)))
def test_a_structurally_hostile_table_is_a_typed_error(tmp_path, k):
    path, _ = _sample(tmp_path)
    msgs = []
    manifest_body.rewrite_raw(path, lambda b: msgs.append(_HOSTILE[k](b["arrays"])))
    _all_readers_raise(path, msgs[0])


@pytest.mark.parametrize("arrays", [[], b"\x00", None, "table"])
def test_arrays_must_be_the_table_in_v3(tmp_path, arrays):
    path, _ = _sample(tmp_path)
    manifest_body.rewrite_raw(path, lambda b: b.update(arrays=arrays))
    _all_readers_raise(path, "field 'arrays' missing or of the wrong type")
    manifest_body.rewrite_raw(path, lambda b: b.pop("arrays"))
    _all_readers_raise(path, "field 'arrays' missing or of the wrong type")


def test_the_index_width_follows_the_table_length(tmp_path):
    # 300 distinct dtypes (S1..S300): a 2-byte dtype index, and a 1-byte one is refused
    path = str(tmp_path / "ck")
    tree = {f"s{k}": np.array([b"x" * k], f"S{k}") for k in range(1, 301)}
    unickpt.save(path, tree)
    t = manifest_body.read(path)[1]["arrays"]
    assert len(t["dtypes"]) == 300 and len(t["dtype"]) == 600 and len(t["file"]) == 300
    assert sorted(np.frombuffer(t["dtype"], "<u2").tolist()) == list(range(300))
    assert unickpt.load(path)["s300"].tobytes() == b"x" * 300
    manifest_body.rewrite_raw(path, lambda b: b["arrays"].update(
        dtype=np.frombuffer(b["arrays"]["dtype"], "<u2").astype(np.uint8).tobytes()))
    _all_readers_raise(path, "array table: column 'dtype' holds 300 bytes, expected 600")


def test_index_widths_at_their_bounds():
    for k, width in ((1, 1), (256, 1), (257, 2), (65536, 2), (65537, 4)):
        files = [f"f{j}" for j in range(k)]
        entry = ArrayEntry(files[-1], "x", "uint8", (0,), 64, 0, 0)
        t = columns.encode([entry, entry], files)
        assert len(t["file"]) == 2 * width
        assert np.frombuffer(t["file"], f"<u{width}").tolist() == [k - 1] * 2
        assert columns.decode(t, files, _fail).file.tolist() == [k - 1] * 2


# ------------------------------------------------------------------ properties
def _files(maps: list[dict]) -> dict[str, FileEntry]:
    return {f["name"]: FileEntry(f["name"], f["size"], f["data_start"], f["header_xxh3"])
            for f in maps}


def _as_msg(e: ArrayEntry) -> dict:
    return {**e.to_msg(), "shape": list(e.shape)}


def _table_equals_entry_by_entry(t: dict, file_maps: list[dict]) -> None:
    """The numpy validation of table ``t`` gives exactly the ArrayTable the entry-by-entry
    validation gives, and the table re-encodes byte for byte from those entries."""
    fe = _files(file_maps)
    c = columns.decode(t, list(fe), _fail)
    fast = columns.table(c, {f.name: (f.data_start, f.size) for f in fe.values()})
    slow = manifest_mod._validate_entries(columns.as_entries(c), _fail, fe)
    assert fast is not None
    for key in type(fast).__slots__[:-1]:
        assert repr(getattr(fast, key)) == repr(getattr(slow, key)), key
    assert list(fast) == list(slow)
    assert columns.encode(list(slow), list(fe)) == t
    assert columns.as_entries(columns.decode(columns.encode(list(slow), list(fe)), list(fe),
                                             _fail)) == [_as_msg(e) for e in slow]


@SETTINGS
@given(tree=ust.state_trees(max_leaves=10))
def test_saved_tables_validate_as_their_entries(tree, tmp_path_factory):
    d = tmp_path_factory.mktemp("ck") / "c"
    unickpt.save(d, tree)
    body = manifest_body.read(d)[1]
    assert body["format_version"] == 3
    _table_equals_entry_by_entry(body["arrays"], body["files"])


DTYPES = ("bool", "int8", "uint64", "float16", "float32", "complex128", "bfloat16",
          "float8_e4m3fn", "int4", "U3", "S2", "V5", "datetime64[ns]")


@st.composite
def entry_lists(draw, min_size: int = 0) -> tuple[list[ArrayEntry], list[dict]]:
    """Valid array entries over 1-3 files (in any order, with gaps), and the file maps."""
    names = [f"arrays-{k:05d}.safetensors" for k in range(draw(st.integers(1, 3)))]
    start = [64 * draw(st.integers(1, 3)) for _ in names]
    pos = list(start)
    entries = []
    for _ in range(draw(st.integers(min_size, 10))):
        k = draw(st.integers(0, len(names) - 1))
        dname = draw(st.sampled_from(DTYPES))
        dt = dtype_from_name(dname)
        shape = tuple(draw(st.one_of(st.lists(st.integers(0, 3), max_size=3),
                                     st.sampled_from([[0, 1 << 40], [1] * 64, [2, 0, 5]]))))
        nbytes = math.prod(shape) * dt.itemsize
        offset = pos[k] + 8 * draw(st.integers(0, 2))
        pos[k] = offset + nbytes
        entries.append(ArrayEntry(
            names[k], draw(st.text(max_size=3)), dname, shape, offset, nbytes,
            draw(st.integers(0, (1 << 64) - 1)),
            ">" if has_byteorder(dt) and draw(st.booleans()) else "<",
            shape == () and draw(st.booleans()),
            draw(st.none() | st.integers(0, (1 << 64) - 1))))
    entries = draw(st.permutations(entries))
    files = [{"name": nm, "size": p + draw(st.integers(0, 16)), "data_start": s,
              "header_xxh3": 0} for nm, s, p in zip(names, start, pos)]
    return entries, files


@SETTINGS
@given(case=entry_lists())
def test_encoded_entries_validate_as_themselves(case):
    entries, files = case
    t = columns.encode(entries, [f["name"] for f in files])
    _table_equals_entry_by_entry(t, files)
    assert list(columns.table(columns.decode(t, [f["name"] for f in files], _fail),
                              {f["name"]: (f["data_start"], f["size"]) for f in files})) \
        == entries


def _outcome(version: int, arrays, files: list[dict]) -> tuple[str, object]:
    """Reading a manifest of these entries (v3: the table; v2: the list of maps)."""
    body = msgpack.packb({"format_version": version, "library_version": "t", "tree": None,
                          "arrays": arrays, "sharded": [], "files": files}, use_bin_type=True)
    raw = msgpack.packb({"unickpt": version, "xxh3": xxhash.xxh3_64_intdigest(body),
                         "body": body}, use_bin_type=True)
    try:
        return "ok", list(read_manifest_bytes(raw, "ck").arrays)
    except unickpt.CorruptCheckpointError as e:
        return "error", str(e)


_INT64 = [-1, 0, 1, 8, 63, 64, 1 << 40, (1 << 62) - 1, 1 << 62, (1 << 63) - 1, -(1 << 63)]


def _put(t: dict, key: str, dtype: str, i: int, value: int) -> None:
    col = np.frombuffer(t[key], dtype).copy()
    col[i] = value
    t[key] = col.tobytes()


def _toggle(t: dict, key: str, i: int) -> None:
    lst = sorted(set(t.get(key, [])) ^ {i})
    t[key] = lst


def _corrupt(t: dict, files: list[dict], data: st.DataObject) -> str:
    """One field of one entry of ``t`` changed to a hostile or merely different value."""
    n = len(t["name"])
    i = data.draw(st.integers(0, n - 1))
    ndim = np.frombuffer(t["ndim"], np.uint8)
    at = int(ndim[:i].sum())
    offsets = np.frombuffer(t["offset"], "<i8").tolist()
    field = data.draw(st.sampled_from(["offset", "nbytes", "shape", "ndim", "dtype", "file",
                                       "byteorder", "scalar", "head", "xxh3"]))
    if field in ("offset", "nbytes"):
        old = np.frombuffer(t[field], "<i8")[i]
        v = data.draw(st.sampled_from([*_INT64, int(old) + 1, int(old) - 1, int(old) + 8,
                                       *offsets, *[o + 1 for o in offsets],
                                       *[f["size"] for f in files]]))
        _put(t, field, "<i8", i, v)
    elif field == "shape" and ndim[i]:
        _put(t, "shape", "<i8", at + data.draw(st.integers(0, int(ndim[i]) - 1)),
             data.draw(st.sampled_from([*_INT64, 2, 3])))
    elif field == "ndim":  # one dimension more or fewer, or 65: the shape column follows
        new = data.draw(st.sampled_from([int(ndim[i]) + 1, max(int(ndim[i]) - 1, 0), 65]))
        dims = np.frombuffer(t["shape"], "<i8").tolist()
        row = (dims[at:at + ndim[i]] + [data.draw(st.sampled_from([1, 1, 0, 2]))] * 65)[:new]
        t["shape"] = np.array(dims[:at] + row + dims[at + ndim[i]:], "<i8").tobytes()
        _put(t, "ndim", "u1", i, new)
    elif field == "dtype":  # another dtype of the table, or a new (maybe unknown) name
        extra = data.draw(st.sampled_from([None, "object", "float7", "U0", *DTYPES]))
        if extra is not None and extra not in t["dtypes"]:
            t["dtypes"] = [*t["dtypes"], extra]
        assert len(t["dtypes"]) <= 256  # a one-byte index still
        _put(t, "dtype", "u1", i, data.draw(st.integers(0, len(t["dtypes"]) - 1)))
    elif field == "file":
        _put(t, "file", "u1", i, data.draw(st.integers(0, len(files) - 1)))
    elif field in ("byteorder", "scalar"):
        _toggle(t, field, i)
    elif field == "head":
        heads = dict(zip(t.get("head", []), np.frombuffer(t.get("head_xxh3", b""), "<u8")))
        if i in heads:
            del heads[i]
        else:
            heads[i] = data.draw(st.integers(0, (1 << 64) - 1))
        t["head"] = sorted(heads)
        t["head_xxh3"] = np.array([heads[h] for h in t["head"]], "<u8").tobytes()
    else:
        _put(t, "xxh3", "<u8", i, data.draw(st.integers(0, (1 << 64) - 1)))
    return field


@SETTINGS
@given(case=entry_lists(min_size=1), data=st.data())
def test_a_corrupted_table_gives_the_v2_message(case, data):
    entries, files = case
    names = [f["name"] for f in files]
    t = columns.encode(entries, names)
    assert _outcome(3, t, files) == ("ok", entries)
    _corrupt(t, files, data)
    v3 = _outcome(3, t, files)
    v2 = _outcome(2, columns.as_entries(columns.decode(t, names, _fail)), files)
    assert v3 == v2


@pytest.mark.parametrize("field, value, msg", [
    ("nbytes", 1, "array 0: nbytes 1 does not match shape (2, 3) of float32"),
    ("offset", 0, "array 0: bytes [0, 24) lie outside file 'a.st'"),
    ("offset", 72, "arrays 0 and 1 overlap in file 'a.st'"),
    ("shape", -1, "array 0: shape [-1, 3] is not a list of non-negative integers"),
    ("shape", 1 << 62, "array 0: shape [4611686018427387904, 3] is not a list of "
                       "non-negative integers"),
    ("byteorder", [1], "array 1: byteorder '>' for dtype bool"),
    ("scalar", [0], "array 0: 'scalar' must be a bool, true only for shape []"),
    ("ndim", 65, "array 0: 65 dimensions (limit 64)"),  # 2, 3 and 63 ones: nbytes matches
])
def test_a_corruption_the_numpy_check_doubts_is_named_as_in_v2(field, value, msg):
    entries = [ArrayEntry("a.st", "w", "float32", (2, 3), 64, 24, 7),
               ArrayEntry("a.st", "b", "bool", (8,), 88, 8, 9)]
    files = [{"name": "a.st", "size": 96, "data_start": 64, "header_xxh3": 0}]
    t = columns.encode(entries, ["a.st"])
    if field in ("byteorder", "scalar"):
        t[field] = value
    elif field == "ndim":
        t["shape"] = np.array([2, 3] + [1] * 63 + [8], "<i8").tobytes()
        _put(t, field, "u1", 0, value)
    else:
        _put(t, field, "<i8", 0, value)
    assert columns.table(columns.decode(t, ["a.st"], _fail), {"a.st": (64, 96)}) is None
    v3 = _outcome(3, t, files)
    assert v3 == ("error", f"ck: corrupt manifest: {msg}")
    assert v3 == _outcome(2, columns.as_entries(columns.decode(t, ["a.st"], _fail)), files)
