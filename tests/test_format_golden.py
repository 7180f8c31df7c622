"""Golden checkpoints of every format version (tests/golden/v<N>, written once per version by
make_golden.py) stay loadable, bit for bit.  Expected values are rebuilt here independently,
never by re-saving.  Every test runs against each version's files."""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import msgpack
import numpy as np
import pytest
import xxhash
from _bitwise import assert_bitwise_equal

import unickpt

GOLDEN_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
VERSIONS = (1, 2, 3)
GOLDEN = os.path.join(GOLDEN_ROOT, "v1")


@pytest.fixture(autouse=True, params=VERSIONS, ids=[f"v{v}" for v in VERSIONS])
def version(request, monkeypatch):
    """Point GOLDEN at each version's directory in turn."""
    monkeypatch.setitem(globals(), "GOLDEN", os.path.join(GOLDEN_ROOT, f"v{request.param}"))
    return request.param


# Deliberately a copy of make_golden.pat/raw: if the generator changes, these tests must not.
def pat(n: int, seed: int = 0) -> bytes:
    return bytes((i * 37 + 11 + seed) % 256 for i in range(n))


def raw(dtype, shape, seed=0) -> np.ndarray:
    dt = np.dtype(dtype)
    return np.frombuffer(pat(int(np.prod(shape)) * dt.itemsize, seed), dt).reshape(shape)


def f64(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<Q", bits))[0]


def _load(name: str, **kw):
    path = os.path.join(GOLDEN, name)
    assert unickpt.verify(path).ok
    return unickpt.load(path, **kw)


def test_golden_set_is_complete_and_small(version):
    names = set(os.listdir(GOLDEN))
    assert {"tiny", "scalars", "numeric", "ml_dtypes", "layouts", "strings_times", "structure",
            "sharded", "metadata", "root_array", "root_scalar", "empty_tree",
            "longdouble_x87"} | ({"incremental"} if version >= 2 else set()) <= names
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(GOLDEN)
                for f in fs)
    assert total < 200_000


def test_tiny():
    assert_bitwise_equal({"w": np.array([1.0, 2.0], np.float32), "step": 7}, _load("tiny"))


def test_scalars():
    exp = {
        "none": None, "true": True, "false": False, "zero": 0, "neg": -1,
        "i64max": 9223372036854775807, "i64min": -9223372036854775808,
        "u64max": 18446744073709551615, "past_u64": 18446744073709551616,
        "below_i64": -9223372036854775809, "huge": -(3 ** 200),
        "float": 1.5, "neg_zero": -0.0, "inf": float("inf"), "ninf": float("-inf"),
        "qnan_payload": f64(0x7FF8000000000001), "snan_payload": f64(0x7FF0000000000123),
        "neg_nan": f64(0xFFF8000000000000), "subnormal": f64(1), "str": "",
        "text": "ü/.🙂\x00", "bytes": b"", "bytes2": b"\x00\xff\x80",
    }
    assert_bitwise_equal(exp, _load("scalars"))


def test_numeric_dtypes_and_numpy_scalars():
    names = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
             "float16", "float32", "float64", "complex64", "complex128"]
    exp = {n: raw(n, (2, 3), i) for i, n in enumerate(names)}
    exp["scalars"] = [np.float32(1.5), np.int64(-7), np.bool_(True), np.uint8(255),
                      np.complex64(1 - 2j), np.float64(-0.0), np.float16(np.inf)]
    assert_bitwise_equal(exp, _load("numeric"))


def test_ml_dtypes():
    names = ["bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
             "float8_e4m3b11fnuz", "int4", "uint4", "int2", "uint2"]
    exp = {n: raw(getattr(ml_dtypes, n), (5,), i) for i, n in enumerate(names)}
    exp["bf16_scalar"] = ml_dtypes.bfloat16(3.25)
    assert_bitwise_equal(exp, _load("ml_dtypes"))


@pytest.mark.parametrize("mmap", [False, True])
def test_layouts(mmap):
    base = raw("int32", (4, 6), 3)
    exp = {
        "zero_d": np.array(42.5), "empty": np.zeros((0, 3), np.float32),
        "empty_3d": np.zeros((2, 0, 4), np.int16),
        "fortran": raw("float64", (3, 4), 5), "strided": base[::2, 1::2], "transposed": base.T,
        "big_endian_f4": raw("float32", (2, 2), 7).astype(">f4"),
        "big_endian_i8": np.array([0, 1, 2], ">i8"),
        "big_endian_c16": np.array([1 + 2j, -0.0 - 1j], ">c16"),
        "lazy": np.array([1, 2, 65535], np.uint16),
    }
    got = _load("layouts", mmap=mmap)
    assert_bitwise_equal(exp, got)
    assert got["big_endian_f4"].dtype.str == ">f4"


def test_strings_and_times():
    exp = {
        "unicode": np.array(["", "a", "ü🙂x"], "<U3"), "unicode_be": np.array(["ab", "c"], ">U2"),
        "bytes": np.array([b"", b"\x00\xff", b"abcd"], "S4"),
        "void": np.frombuffer(pat(6), "V3"),
        "datetime_ns": np.array(["2024-02-29T12:34:56.789", "NaT"], "datetime64[ns]"),
        "datetime_D": np.array(["1970-01-01", "2262-04-11"], "datetime64[D]"),
        "timedelta_s": np.array([-1, 0, 86400], "timedelta64[s]"),
        "np_str": np.str_("scalar ü"), "np_bytes": np.bytes_(b"\x01\x02"),
        "np_datetime": np.datetime64("2000-01-01T00:00", "m"),
    }
    assert_bitwise_equal(exp, _load("strings_times"))


def test_structure_keys_and_containers():
    exp = {
        "": {"/": {".": {"..": 1}}},
        "a/b": [1, (2, [3, ()]), [], {}],
        "ключ": {0: "int key", -5: "neg", 18446744073709551615: "u64 key", "0": "str key"},
        "tuple": (None, (True,), ("x", b"y")),
        "deep": {"l1": {"l2": {"l3": {"l4": [[[np.array([1, 2], np.int8)]]]}}}},
        "dupe_names": {"x": np.zeros(1, np.int8), "x#2": np.ones(1, np.int8)},
    }
    assert_bitwise_equal(exp, _load("structure"))


def test_sharded_arrays_assemble():
    a = raw("float32", (4, 6), 9)
    exp = {"rows": a, "grid": a, "big_endian": np.array([1, 2, 3], ">i4"),
           "scalar_global": np.array(2.5)}
    assert_bitwise_equal(exp, _load("sharded"))
    with unickpt.format.CheckpointReader(os.path.join(GOLDEN, "sharded")) as r:
        kept = r.tree(assemble=False)
    assert [p.index for p in kept["grid"].pieces][0] == ((0, 2), (0, 3))


def test_metadata_and_info(version):
    path = os.path.join(GOLDEN, "metadata")
    assert_bitwise_equal({"x": np.array([0, 1, 2], np.int64)}, unickpt.load(path))
    ins = unickpt.inspect(path)
    assert ins.metadata == {"lr": 0.001, "tags": ["a", "b"], "nested": {"k": None, 3: b"\x00"},
                            "big": 18446744073709551615}
    assert ins.info == {"step": 7, "writer": "make_golden"}
    assert ins.format_version == version and ins.library_version == "0.1.0"


def test_roots_that_are_not_dicts():
    assert_bitwise_equal(np.array([0, 1, 2, 3], np.uint8), _load("root_array"))
    assert_bitwise_equal("just a string", _load("root_scalar"))
    assert_bitwise_equal({}, _load("empty_tree"))


def test_long_double_x87():
    path = os.path.join(GOLDEN, "longdouble_x87")
    x87 = np.dtype(np.longdouble).itemsize == 16 and np.finfo(np.longdouble).nmant == 63
    if not x87:
        with pytest.raises(unickpt.CorruptCheckpointError, match="float80_x87"):
            unickpt.load(path)
        return
    assert_bitwise_equal({"ld": raw(np.longdouble, (2,), 1), "cld": raw(np.clongdouble, (1,), 2)},
                         unickpt.load(path))


# Tests of what only some versions have take those versions alone (indirect: the autouse
# fixture still points GOLDEN at them); a skip would fail the suite in CI.
@pytest.mark.parametrize("version", [v for v in VERSIONS if v >= 2], indirect=True)
def test_incremental(version):
    """Step 2 of a manager run with sharing (v2 on): the frozen array's file (arrays-00000,
    with a head_xxh3) was shared from step 1; the trained arrays are in arrays-00001."""
    path = os.path.join(GOLDEN, "incremental")
    assert sorted(os.listdir(path)) == ["arrays-00000.safetensors", "arrays-00001.safetensors",
                                        "manifest.msgpack"]
    exp = {"frozen": {"w": np.arange(16400, dtype=np.float32)},
           "train": {"a": np.array([2, 4, 6], np.float32), "n": np.int64(2)}, "step": 2}
    assert_bitwise_equal(exp, _load("incremental"))
    assert_bitwise_equal(exp, unickpt.load(path, mmap=True))
    assert_bitwise_equal(exp, _spec_reader(path))
    ins = unickpt.inspect(path)
    assert ins.format_version == version and ins.info["shared_files"] == 1
    with unickpt.format.CheckpointReader(path) as r:
        heads = [e.head_xxh3 for e in r.manifest.arrays]
    assert heads[0] == xxhash.xxh3_64_intdigest(exp["frozen"]["w"].tobytes()[:4096])
    assert heads[1:] == [None, None]


# ------------------------------------------------------------------ the bytes themselves
TINY_MANIFEST_HEX = (
    "83a7756e69636b707401a478786833cf48e8fdb65a886523a4626f6479c4fe8aae666f726d61745f76657273"
    "696f6e01af6c6962726172795f76657273696f6ea5302e312e30a8636865636b73756da7787868335f3634a4"
    "7472656592a16494a17792a16100a47374657007a66172726179739187a466696c65b26172726179732e7361"
    "666574656e736f7273a46e616d65a177a56474797065a7666c6f61743332a573686170659102a66f66667365"
    "74cc80a66e627974657308a478786833cf4de8d78f7134f4b7a77368617264656490a566696c65739183a46e"
    "616d65b26172726179732e7361666574656e736f7273a473697a65cc88aa646174615f7374617274cc80a56b"
    "696e647390a86d6574616461746180a4696e666f80"
)


TINY_MANIFEST_HEX_V2 = (
    "83a7756e69636b707402a478786833cf3208acdcb2d989f1a4626f6479c501138aae666f726d61745f7665"
    "7273696f6e02af6c6962726172795f76657273696f6ea5302e312e30a8636865636b73756da7787868335f"
    "3634a47472656592a16494a17792a16100a47374657007a66172726179739187a466696c65b26172726179"
    "732e7361666574656e736f7273a46e616d65a177a56474797065a7666c6f61743332a57368617065910"
    "2a66f6666736574cc80a66e627974657308a478786833cf4de8d78f7134f4b7a773686172646564"
    "90a566696c65739184a46e616d65b26172726179732e7361666574656e736f7273a473697a65cc88aa6461"
    "74615f7374617274cc80ab6865616465725f78786833cfa9e5d93cd0994991a56b696e647390a86d657461"
    "6461746180a4696e666f80"
)


TINY_MANIFEST_HEX_V3 = (
    "83a7756e69636b707403a478786833cf190513d545124037a4626f6479c501308aae666f726d61745f766572"
    "73696f6e03af6c6962726172795f76657273696f6ea5302e312e30a8636865636b73756da7787868335f3634"
    "a47472656592a16494a17792a16100a47374657007a661727261797389a46e616d6591a177a466696c65c401"
    "00a664747970657391a7666c6f61743332a56474797065c40100a46e64696dc40101a57368617065c4080200"
    "000000000000a66f6666736574c4088000000000000000a66e6279746573c4080800000000000000a4787868"
    "33c408b7f434718fd7e84da77368617264656490a566696c65739184a46e616d65b26172726179732e736166"
    "6574656e736f7273a473697a65cc88aa646174615f7374617274cc80ab6865616465725f78786833cf7d96ca"
    "a1f0586236a56b696e647390a86d6574616461746180a4696e666f80"
)


def test_tiny_manifest_bytes_are_stable(version):
    """The worked example of docs/FORMAT.md, byte for byte (one per version)."""
    with open(os.path.join(GOLDEN, "tiny", "manifest.msgpack"), "rb") as f:
        assert f.read().hex() == {1: TINY_MANIFEST_HEX, 2: TINY_MANIFEST_HEX_V2,
                                  3: TINY_MANIFEST_HEX_V3}[version]


@pytest.mark.parametrize("version", [max(VERSIONS)], indirect=True)
def test_the_worked_example_of_the_spec_is_the_newest_tiny_golden(version):
    """docs/FORMAT.md 3.4 dumps tests/golden/v<newest>/tiny: its sizes and checksums."""
    spec = os.path.join(os.path.dirname(GOLDEN_ROOT), os.pardir, "docs", "FORMAT.md")
    with open(spec, encoding="utf-8") as f:
        text = f.read().split("### 3.4 Worked example")[1].split("### 3.5")[0]
    with open(os.path.join(GOLDEN, "tiny", "manifest.msgpack"), "rb") as f:
        raw_manifest = f.read()
    outer = msgpack.unpackb(raw_manifest, raw=False)
    body = msgpack.unpackb(outer["body"], raw=False)
    assert f"tests/golden/v{version}/tiny" in text
    assert f"`manifest.msgpack` ({len(raw_manifest)} bytes)" in text
    assert f"format version {version}" in text and f'"unickpt_format":"{version}"' in text
    assert f"cf {outer['xxh3']:016x}" in text and f"<{len(outer['body'])} bytes>" in text
    assert f"0x{body['files'][0]['header_xxh3']:016x}" in text
    assert f"TINY_MANIFEST_HEX_V{version}" in text


@pytest.mark.parametrize("codec", ["unickpt", "reference"])
def test_every_golden_manifest_re_encodes_byte_for_byte(version, codec):
    """Decoding a golden manifest and encoding it again in its own version gives its bytes:
    the library's codec and the simple reference codec (tests/_reference_manifest.py, which
    tests/test_fast_codec.py holds the fast one to) write every version as it was written."""
    import _reference_manifest

    from unickpt.format import manifest

    mod = manifest if codec == "unickpt" else _reference_manifest
    for name in sorted(os.listdir(GOLDEN)):
        with open(os.path.join(GOLDEN, name, "manifest.msgpack"), "rb") as f:
            raw_manifest = f.read()
        m = mod.read_manifest_bytes(raw_manifest, name)
        assert m.format_version == version
        assert m.to_bytes() == raw_manifest, name


def test_new_saves_write_the_newest_version(tmp_path):
    unickpt.save(tmp_path / "ck", {"w": np.zeros(2, np.float32)})
    assert unickpt.inspect(tmp_path / "ck").format_version == max(VERSIONS)


def _spec_reader(path: str) -> dict:
    """A minimal reader written from docs/FORMAT.md alone (msgpack + json + numpy, no unickpt)."""
    with open(os.path.join(path, "manifest.msgpack"), "rb") as f:
        outer = msgpack.unpackb(f.read(), raw=False)
    version = outer["unickpt"]
    assert version in VERSIONS
    assert outer["xxh3"] == xxhash.xxh3_64_intdigest(outer["body"])
    body = msgpack.unpackb(outer["body"], raw=False, strict_map_key=False)
    assert body["format_version"] == version
    data = {}
    for fe in body["files"]:
        with open(os.path.join(path, fe["name"]), "rb") as f:
            data[fe["name"]] = f.read()
        blob = data[fe["name"]]
        assert len(blob) == fe["size"]
        hlen = int.from_bytes(blob[:8], "little")
        assert 8 + hlen == fe["data_start"] and fe["data_start"] % 64 == 0
        if version >= 2:  # v2: the header (length prefix included) has its own checksum
            assert fe["header_xxh3"] == xxhash.xxh3_64_intdigest(blob[:fe["data_start"]])
        else:
            assert "header_xxh3" not in fe
        fe["header"] = json.loads(blob[8:8 + hlen])
        assert fe["header"]["__metadata__"] == {"format": "unickpt",
                                                "unickpt_format": str(version)}
    files = {fe["name"]: fe for fe in body["files"]}
    arrays = []
    for e in _array_entries(body) if version >= 3 else body["arrays"]:
        fe = files[e["file"]]
        chunk = data[e["file"]][e["offset"]:e["offset"] + e["nbytes"]]
        assert xxhash.xxh3_64_intdigest(chunk) == e["xxh3"]
        if "head_xxh3" in e:
            assert xxhash.xxh3_64_intdigest(chunk[:4096]) == e["head_xxh3"]
        h = fe["header"][e["name"]]
        assert fe["data_start"] + h["data_offsets"][0] == e["offset"]
        dt = np.dtype(e["dtype"]).newbyteorder("<")
        a = np.frombuffer(chunk, dt).reshape(e["shape"])
        if e.get("byteorder") == ">":
            a = a.astype(dt.newbyteorder(">"))
        arrays.append(a[()] if e.get("scalar") else a)

    def node(n):
        if not isinstance(n, list):
            return n
        tag, payload = n
        if tag == "d":
            return {payload[i]: node(payload[i + 1]) for i in range(0, len(payload), 2)}
        if tag in ("l", "t"):
            items = [node(x) for x in payload]
            return items if tag == "l" else tuple(items)
        if tag == "a":
            return arrays[payload]
        if tag == "i":
            return int(payload)
        if tag == "s":  # sharded: copy each piece into the global array
            sh = body["sharded"][payload]
            dt = np.dtype(sh["dtype"]).newbyteorder("<")
            out = np.empty(sh["shape"], dt)
            for p in sh["pieces"]:
                out[tuple(slice(a, b) for a, b in p["index"])] = arrays[p["array"]]
            if sh.get("byteorder") == ">":
                out = out.astype(dt.newbyteorder(">"))
            return out
        raise AssertionError(tag)

    return node(body["tree"])


def _index_width(k: int) -> int:
    return 1 if k <= 256 else 2 if k <= 65536 else 4


def _array_entries(body: dict) -> list[dict]:
    """The entries of a v3 array table (4.1.2), as the v2 maps (4.1.3) would hold them."""
    t = body["arrays"]
    # the exact encoding writers use: required columns in this order, optional ones only
    # when not empty, dtypes distinct in order of first use
    req = ["name", "file", "dtypes", "dtype", "ndim", "shape", "offset", "nbytes", "xxh3"]
    assert list(t)[:9] == req and set(t) <= {*req, "byteorder", "scalar", "head", "head_xxh3"}
    assert all(t[k] for k in ("byteorder", "scalar", "head") if k in t)
    assert ("head" in t) == ("head_xxh3" in t)
    n = len(t["name"])
    file = np.frombuffer(t["file"], f"<u{_index_width(len(body['files']))}")
    dtype = np.frombuffer(t["dtype"], f"<u{_index_width(len(t['dtypes']))}")
    first_use = list(dict.fromkeys(t["dtypes"][k] for k in dtype.tolist()))
    assert t["dtypes"] == first_use
    ndim = np.frombuffer(t["ndim"], np.uint8).astype(np.int64)
    dims = np.frombuffer(t["shape"], "<i8")
    offset, nbytes = np.frombuffer(t["offset"], "<i8"), np.frombuffer(t["nbytes"], "<i8")
    xxh3 = np.frombuffer(t["xxh3"], "<u8")
    assert len(file) == len(dtype) == len(ndim) == len(offset) == len(nbytes) == len(xxh3) == n
    assert len(dims) == ndim.sum()
    start = np.cumsum(ndim) - ndim
    out = [{"file": body["files"][file[i]]["name"], "name": t["name"][i],
            "dtype": t["dtypes"][dtype[i]], "shape": dims[start[i]:start[i] + ndim[i]].tolist(),
            "offset": int(offset[i]), "nbytes": int(nbytes[i]), "xxh3": int(xxh3[i])}
           for i in range(n)]
    for key, value in (("byteorder", ">"), ("scalar", True)):
        for i in t.get(key, []):
            out[i][key] = value
    heads = np.frombuffer(t.get("head_xxh3", b""), "<u8").tolist()
    assert len(heads) == len(t.get("head", []))
    for i, h in zip(t.get("head", []), heads):
        out[i]["head_xxh3"] = h
    for key in ("byteorder", "scalar", "head"):
        assert t.get(key, []) == sorted(set(t.get(key, []))) and all(
            0 <= i < n for i in t.get(key, []))
    return out


@pytest.mark.parametrize("name", ["tiny", "scalars", "numeric", "structure", "layouts",
                                  "sharded", "strings_times", "ml_dtypes", "metadata",
                                  "root_array", "empty_tree"])
def test_an_independent_reader_written_from_the_spec_agrees(name):
    path = os.path.join(GOLDEN, name)
    assert_bitwise_equal(unickpt.load(path), _spec_reader(path))


@pytest.mark.parametrize("version", [max(VERSIONS)], indirect=True)
def test_the_spec_reader_reads_wide_index_columns_of_a_new_save(version, tmp_path):
    """257 distinct dtypes: the dtype index column takes 2 bytes per entry (4.1.2)."""
    tree = {f"s{i}": np.frombuffer(pat(i + 1, i), f"S{i + 1}") for i in range(257)}
    tree["be"] = np.array([1.5, -2.0], ">f8")
    tree["scalar"] = np.int16(-3)
    unickpt.save(tmp_path / "ck", tree)
    with open(tmp_path / "ck" / "manifest.msgpack", "rb") as f:
        table = msgpack.unpackb(msgpack.unpackb(f.read())["body"])["arrays"]
    assert len(table["dtypes"]) == 259 and len(table["dtype"]) == 2 * 259
    assert len(table["file"]) == 259 and table["byteorder"] == [257]
    assert table["scalar"] == [258]
    assert_bitwise_equal(tree, _spec_reader(str(tmp_path / "ck")))
    assert_bitwise_equal(tree, unickpt.load(tmp_path / "ck"))
