"""Hostile and damaged checkpoints: every one is a typed error naming the file and the problem,
raised before any large allocation.  Nothing is ever unpickled or executed."""

from __future__ import annotations

import os
import shutil
import time
import tracemalloc

import _manifest_body as manifest_body
import msgpack
import numpy as np
import pytest
import xxhash

import unickpt
from unickpt.format.manifest import MANIFEST_NAME
from unickpt.tree import Piece, ShardedArray

DATA = "arrays.safetensors"


def _sample(tmp_path) -> str:
    a = np.arange(8, dtype=np.float64).reshape(2, 4)
    tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2], np.int64),
            "step": 3,
            "s": ShardedArray((2, 4), a.dtype, [Piece(((0, 1), (0, 4)), a[:1]),
                                                Piece(((1, 2), (0, 4)), a[1:])])}
    path = str(tmp_path / "ck")
    unickpt.save(path, tree)
    return path


def _outer(path: str) -> dict:
    with open(os.path.join(path, MANIFEST_NAME), "rb") as f:
        return msgpack.unpackb(f.read(), raw=False)


def _write_outer(path: str, outer: dict) -> None:
    with open(os.path.join(path, MANIFEST_NAME), "wb") as f:
        f.write(msgpack.packb(outer, use_bin_type=True))


def _rewrite_body(path: str, mutate) -> int:
    """Apply ``mutate(body)`` (array entries as v2 maps) and store it with a *valid* checksum
    (a crafted, not damaged, file): as the v3 table when the entries fit its columns, else as
    a v2 manifest (tests/_manifest_body.py).  Returns the version written."""
    return manifest_body.rewrite_body(path, mutate)


def _all_readers_raise(path: str, typ: type, match: str) -> None:
    """load, load(mmap), inspect and verify all refuse the checkpoint the same way."""
    for fn in (unickpt.load, lambda p: unickpt.load(p, mmap=True), unickpt.inspect,
               unickpt.verify):
        with pytest.raises(typ, match=match) as ei:
            fn(path)
        assert path in str(ei.value)  # the message names the checkpoint


# ------------------------------------------------------------------ the manifest file
@pytest.mark.parametrize("raw, match", [
    (b"", "not a msgpack document"),
    (b"\xc1\xc1garbage", "not a msgpack document"),
    (b"PK\x03\x04 this is a zip", "not a msgpack document"),
    (msgpack.packb([1, 2, 3]), "no 'unickpt' version field"),
    (msgpack.packb({"unickpt": "1"}), "format version is not an integer"),
    (msgpack.packb({"unickpt": True}), "format version is not an integer"),
    (msgpack.packb({"unickpt": 1}), "missing body"),
    (msgpack.packb({"unickpt": 1, "xxh3": 0, "body": b"\x93\x01"}), "checksum mismatch"),
    (msgpack.packb({"unickpt": 1, "xxh3": xxhash.xxh3_64_intdigest(b"\x93\x01"),
                    "body": b"\x93\x01"}), "body is not msgpack"),
    (msgpack.packb({"unickpt": 1, "xxh3": xxhash.xxh3_64_intdigest(b"\x01"),
                    "body": b"\x01"}), "body is not a map"),
])
def test_garbage_manifest(tmp_path, raw, match):
    path = _sample(tmp_path)
    with open(os.path.join(path, MANIFEST_NAME), "wb") as f:
        f.write(raw)
    _all_readers_raise(path, unickpt.CorruptCheckpointError, match)


def test_truncated_manifest(tmp_path):
    path = _sample(tmp_path)
    mpath = os.path.join(path, MANIFEST_NAME)
    with open(mpath, "rb") as f:
        raw = f.read()
    for cut in (1, len(raw) // 2, len(raw) - 1):
        with open(mpath, "wb") as f:
            f.write(raw[:cut])
        _all_readers_raise(path, unickpt.CorruptCheckpointError, "corrupt manifest")


def test_flipped_bit_in_manifest_body_fails_its_checksum(tmp_path):
    path = _sample(tmp_path)
    mpath = os.path.join(path, MANIFEST_NAME)
    with open(mpath, "rb") as f:
        raw = bytearray(f.read())
    raw[len(raw) // 2] ^= 0x04
    with open(mpath, "wb") as f:
        f.write(bytes(raw))
    _all_readers_raise(path, unickpt.CorruptCheckpointError,
                       r"manifest checksum mismatch \(the manifest file is damaged\)")


@pytest.mark.parametrize("version", [0, 4, 99, -1])
def test_unknown_format_version(tmp_path, version):
    path = _sample(tmp_path)
    outer = _outer(path)
    outer["unickpt"] = version
    _write_outer(path, outer)
    with pytest.raises(unickpt.FormatVersionError,
                       match=f"format version {version} is not readable.*upgrade unickpt"):
        unickpt.load(path)
    assert issubclass(unickpt.FormatVersionError, unickpt.CorruptCheckpointError)


def test_body_version_must_match_outer_version(tmp_path):
    path = _sample(tmp_path)
    assert _rewrite_body(path, lambda b: b.update(format_version=2)) == 3
    _all_readers_raise(path, unickpt.CorruptCheckpointError,
                       "body format_version 2 differs from the outer 3")


def test_manifest_is_a_directory(tmp_path):
    path = _sample(tmp_path)
    os.remove(os.path.join(path, MANIFEST_NAME))
    os.mkdir(os.path.join(path, MANIFEST_NAME))
    with pytest.raises(unickpt.CheckpointNotFoundError, match="is a directory, not a file"):
        unickpt.load(path)
    with pytest.raises(FileNotFoundError):
        unickpt.verify(path)


def test_fifo_or_device_in_place_of_a_file_does_not_hang(tmp_path):
    path = _sample(tmp_path)
    os.remove(os.path.join(path, DATA))
    os.mkfifo(os.path.join(path, DATA))
    with pytest.raises(unickpt.CorruptCheckpointError, match="is not a regular file"):
        unickpt.load(path)
    os.remove(os.path.join(path, DATA))
    os.symlink("/dev/zero", os.path.join(path, DATA))
    with pytest.raises(unickpt.CorruptCheckpointError, match="is not a regular file"):
        unickpt.load(path)
    os.remove(os.path.join(path, MANIFEST_NAME))
    os.mkfifo(os.path.join(path, MANIFEST_NAME))
    with pytest.raises(unickpt.CheckpointNotFoundError, match="is not a regular file"):
        unickpt.load(path)


def test_missing_manifest_and_missing_directory(tmp_path):
    path = _sample(tmp_path)
    with pytest.raises(unickpt.CheckpointNotFoundError, match="not a directory"):
        unickpt.load(tmp_path / "nope")
    os.remove(os.path.join(path, MANIFEST_NAME))
    with pytest.raises(unickpt.CheckpointNotFoundError, match="manifest.msgpack is missing"):
        unickpt.load(path)


def test_temporary_directory_is_not_a_checkpoint(tmp_path):
    path = _sample(tmp_path)
    tmp = tmp_path / ".unickpt-tmp.ck.host.123.abcd1234"
    shutil.copytree(path, tmp)  # even complete, an uncommitted directory does not exist
    with pytest.raises(unickpt.CheckpointNotFoundError, match="uncommitted"):
        unickpt.load(tmp)
    assert not unickpt.format.is_committed(tmp) and unickpt.format.is_committed(path)


# ------------------------------------------------------------------ crafted bodies
def _arr(i, **kw):
    return lambda b: b["arrays"][i].update(**kw)


def _v2(mutate):
    """A mutation only the v2 list of maps can carry (a value of the wrong type or range for
    every v3 column): the test expects a version-2 manifest, read by the v2 path."""
    mutate.v2 = True
    return mutate


@pytest.mark.parametrize("mutate, match", [
    (lambda b: b["arrays"][1].update(offset=b["arrays"][0]["offset"]), "overlap in file"),
    (lambda b: b["arrays"][0].update(offset=b["files"][0]["size"]), r"lie outside file"),
    (lambda b: b["arrays"][0].update(offset=b["files"][0]["data_start"] - 8), "outside file"),
    (lambda b: b["arrays"][0].update(offset=-5), "outside file"),
    (_arr(0, shape=[1 << 40, 1 << 40], nbytes=4), "absurdly large"),
    (_arr(0, shape=[1] * 65), r"65 dimensions \(limit 64\)"),
    (_arr(0, shape=[-1, 2]), "not a list of non-negative integers"),
    (_v2(_arr(0, shape=[2.0, 3])), "not a list of non-negative integers"),
    (_v2(_arr(0, shape="2x3")), "field 'shape' missing or of the wrong type"),
    (_arr(0, nbytes=4), "nbytes 4 does not match shape"),
    (_arr(0, dtype="object"), "unknown dtype 'object'"),
    (_arr(0, dtype="O"), "unknown dtype 'O'"),
    (_arr(0, dtype="|O8"), "unknown dtype"),
    (_arr(0, dtype="float7"), "unknown dtype 'float7'"),
    (_arr(0, dtype="[('a', '<i4')]"), "unknown dtype"),
    (_arr(0, dtype="U0"), "zero-width dtype"),
    (_v2(_arr(0, dtype=7)), "field 'dtype' missing or of the wrong type"),
    (_v2(_arr(0, file="../arrays.safetensors")), "unlisted file"),
    (lambda b: b["files"][0].update(name="../x"), "not a plain file name"),
    (lambda b: b["files"][0].update(name="/etc/passwd"), "not a plain file name"),
    (lambda b: b["files"][0].update(name=".."), "not a plain file name"),
    (lambda b: b["files"][0].update(name="a\\b"), "not a plain file name"),
    (lambda b: b["files"].append(dict(b["files"][0])), "listed twice"),
    (lambda b: b["files"][0].update(data_start=b["files"][0]["size"] + 1), "outside its size"),
    (_v2(_arr(0, xxh3=-1)), "checksum out of range"),
    (_v2(_arr(0, byteorder="|")), "byteorder"),
    (_arr(0, byteorder=">", dtype="bfloat16", nbytes=12), "byteorder '>' for dtype bfloat16"),
    (_v2(_arr(0, scalar=1)), "'scalar' must be a bool"),
    (_arr(0, scalar=True), "true only for shape"),
    (_v2(_arr(0, head_xxh3=-1)), "array 0: head_xxh3 is not a uint64"),
    (_v2(_arr(0, head_xxh3="x")), "array 0: head_xxh3 is not a uint64"),
    (lambda b: b.update(checksum="md5"), "unknown checksum algorithm 'md5'"),
    (lambda b: b.update(tree=["i", "1_000"]), "malformed big int"),
    (lambda b: b.update(tree=["i", " 7"]), "malformed big int"),
    (lambda b: b.update(tree=["a", 99]), "array reference 99 out of range"),
    (lambda b: b.update(tree=["a", True]), "array reference True out of range"),
    (lambda b: b.update(tree=["zz", 1]), "unknown node tag 'zz'"),
    (lambda b: b.update(tree=["d", ["k", 1, "k", 2]]), "duplicate key 'k'"),
    (lambda b: b.update(tree=["d", [1.5, 1]]), "dict key of type float"),
    (lambda b: b.update(tree=["d", ["k"]]), "malformed dict node"),
    (lambda b: b.update(tree=["i", "12x"]), "malformed big int"),
    (lambda b: b.update(tree=["i", "9" * 100_001]), "malformed big int"),
    (lambda b: b.update(tree=["l", [1], 3]), "malformed node"),
    (lambda b: b.update(tree={"a": 1}), "unexpected dict node"),
    (lambda b: b.pop("tree"), "field 'tree' missing"),
    (lambda b: b.pop("arrays"), "field 'arrays' missing"),
    (lambda b: b.update(kinds=[[[["x"]], "torch"]]), "malformed kinds entry"),
    (lambda b: b.update(kinds="torch"), "kinds must be a list"),
    (lambda b: b.update(metadata=[1]), "metadata/info must be maps"),
    (lambda b: b["sharded"][0]["pieces"][1].update(index=[[0, 1], [0, 4]]), "overlap"),
    (lambda b: b["sharded"][0]["pieces"].pop(), "pieces cover 4 of 8 elements"),
    (lambda b: b["sharded"][0]["pieces"][0].update(index=[[0, 1], [0, 5]]),
     "outside global shape"),
    (lambda b: b["sharded"][0]["pieces"][0].update(array=0), "does not match its index/dtype"),
    (lambda b: b["sharded"][0]["pieces"][0].update(array=50), "refers to a missing array"),
    (lambda b: b["sharded"][0].update(dtype="object"), "unknown dtype 'object'"),
])
@pytest.mark.parametrize("version", [3, 2])
def test_crafted_manifest_is_rejected(tmp_path, mutate, match, version):
    path = _sample(tmp_path)
    if version == 2:  # a v2 checkpoint (still read): the same problems, the same messages
        manifest_body.write_version(path, 2)
    # every problem the v3 array table can express is read through it
    assert _rewrite_body(path, mutate) == (2 if getattr(mutate, "v2", False) else version)
    _all_readers_raise(path, unickpt.CorruptCheckpointError, match)


def test_an_entry_of_a_file_beyond_the_list_is_refused_in_v3(tmp_path):
    # v3's counterpart of an unlisted file: a file number beyond the files listed
    path = _sample(tmp_path)
    manifest_body.rewrite_raw(path, lambda b: b["arrays"].update(file=b"\x00\x01\x00\x00"))
    _all_readers_raise(path, unickpt.CorruptCheckpointError,
                       "corrupt manifest: array table: entry 1 refers to file number 1, beyond "
                       "the 1 listed")


def test_deeply_nested_manifest_tree_is_rejected(tmp_path):
    path = _sample(tmp_path)
    node: object = 1
    for _ in range(300):
        node = ["l", [node]]
    _rewrite_body(path, lambda b: b.update(tree=node))
    _all_readers_raise(path, unickpt.CorruptCheckpointError, "deeper than 256 levels")


# ------------------------------------------------------------------ the array file
def test_huge_header_length_in_array_file(tmp_path):
    path = _sample(tmp_path)
    with open(os.path.join(path, DATA), "r+b") as f:
        f.write((1 << 60).to_bytes(8, "little"))
    tracemalloc.start()
    try:
        with pytest.raises(unickpt.CorruptCheckpointError, match="damaged safetensors header"):
            unickpt.load(path)
        assert tracemalloc.get_traced_memory()[1] < 8 << 20
    finally:
        tracemalloc.stop()
    # every array's bytes are intact; the file as a whole is damaged
    with pytest.raises(unickpt.CorruptCheckpointError,
                       match="0 damaged leaves: ; array file 'arrays.safetensors' has a "
                             "damaged safetensors header; restore") as ei:
        unickpt.verify(path)
    assert ei.value.leaves == []


def test_missing_array_file_names_every_leaf(tmp_path):
    path = _sample(tmp_path)
    os.remove(os.path.join(path, DATA))
    with pytest.raises(unickpt.CorruptCheckpointError, match="'arrays.safetensors' is missing"):
        unickpt.load(path)
    report = unickpt.verify(path, raise_on_error=False)
    assert set(report.bad) == {"w", "b", 's/"<piece 0>"', 's/"<piece 1>"'}
    with pytest.raises(unickpt.CorruptCheckpointError, match="4 damaged leaves") as ei:
        unickpt.verify(path)
    assert set(ei.value.leaves) == set(report.bad)
    # the manifest alone still describes the checkpoint
    assert [lf.path for lf in unickpt.inspect(path).leaves] == ["w", "b", "step", "s"]


@pytest.mark.parametrize("delta", [-1, -100, +3])
def test_truncated_or_extended_array_file(tmp_path, delta):
    path = _sample(tmp_path)
    fpath = os.path.join(path, DATA)
    size = os.path.getsize(fpath)
    with open(fpath, "r+b") as f:
        f.truncate(size + delta)
    msg = f"is {size + delta} bytes, the manifest says {size} \\(truncated or replaced\\)"
    for fn in (unickpt.load, lambda p: unickpt.load(p, mmap=True)):
        with pytest.raises(unickpt.CorruptCheckpointError, match=msg):
            fn(path)
    with pytest.raises(unickpt.CorruptCheckpointError, match="damaged leaves") as ei:
        unickpt.verify(path)
    report = unickpt.verify(path, raise_on_error=False)
    assert DATA in report.files and not report.ok
    if delta < 0:  # the bytes cut off belong to the last array in the file
        assert "w" in ei.value.leaves
    else:  # appended bytes damage no array: the file as a whole is refused
        assert ei.value.leaves == [] and report.bad == []


def test_one_flipped_bit_is_named_by_verify_and_caught_by_load(tmp_path):
    path = _sample(tmp_path)
    with unickpt.format.CheckpointReader(path) as r:
        e = r.manifest.arrays[1]  # leaf "b"
    with open(os.path.join(path, DATA), "r+b") as f:
        f.seek(e.offset + 3)
        byte = f.read(1)[0]
        f.seek(e.offset + 3)
        f.write(bytes([byte ^ 0x10]))
    with pytest.raises(unickpt.CorruptCheckpointError, match=r"1 damaged leaves: b;") as ei:
        unickpt.verify(path)
    assert ei.value.leaves == ["b"]
    with pytest.raises(unickpt.CorruptCheckpointError, match="leaf b: checksum mismatch") as ei:
        unickpt.load(path)
    assert ei.value.leaves == ["b"]
    with pytest.raises(unickpt.CorruptCheckpointError, match="leaf b: checksum mismatch"):
        unickpt.load(path, mmap=True, verify=True)
    # without verification the bytes come back as they are on disk (opt-out is explicit)
    assert unickpt.load(path, verify=False)["b"][0] == 1 + (0x10 << 24)


def test_flipped_bit_in_a_sharded_piece_names_the_piece(tmp_path):
    path = _sample(tmp_path)
    with unickpt.format.CheckpointReader(path) as r:
        e = r.manifest.arrays[3]
    with open(os.path.join(path, DATA), "r+b") as f:
        f.seek(e.offset)
        f.write(b"\xff")
    with pytest.raises(unickpt.CorruptCheckpointError) as ei:
        unickpt.verify(path)
    assert ei.value.leaves == ['s/"<piece 1>"']


# ------------------------------------------------------------------ bounded memory
def test_claim_of_a_terabyte_array_fails_fast_without_allocating(tmp_path):
    path = _sample(tmp_path)

    def claim(b):
        b["arrays"][0].update(shape=[1 << 38], dtype="float32", nbytes=1 << 40)
        b["arrays"][0]["offset"] = b["files"][0]["size"]
        b["files"][0]["size"] += 1 << 40
    assert _rewrite_body(path, claim) == 3
    truncated = r"the manifest says 1099511\d+ \(truncated or replaced\)"
    for fn, match in ((unickpt.load, truncated), (lambda p: unickpt.load(p, mmap=True), truncated),
                      (unickpt.verify, r"1 damaged leaves: w; array file")):
        tracemalloc.start()
        t0 = time.perf_counter()
        try:
            with pytest.raises(unickpt.CorruptCheckpointError, match=match):
                fn(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 8 << 20, peak
        assert time.perf_counter() - t0 < 2.0


def test_oversized_manifest_is_refused_before_reading(tmp_path):
    path = _sample(tmp_path)
    with open(os.path.join(path, MANIFEST_NAME), "r+b") as f:
        f.truncate((1 << 30) + 1)  # sparse: costs no disk
    tracemalloc.start()
    try:
        with pytest.raises(unickpt.CorruptCheckpointError, match=r"manifest is 1073741825 bytes"):
            unickpt.load(path)
        assert tracemalloc.get_traced_memory()[1] < 8 << 20
    finally:
        tracemalloc.stop()


def test_msgpack_length_claims_do_not_allocate(tmp_path):
    path = _sample(tmp_path)
    # bin32 / array32 / map32 headers claiming ~4 GiB followed by a few bytes
    for raw in (b"\x81\xa4body\xc6\xff\xff\xff\xf0abc", b"\xdd\xff\xff\xff\xf0\x01",
                b"\xdf\xff\xff\xff\xf0\x01\x01"):
        with open(os.path.join(path, MANIFEST_NAME), "wb") as f:
            f.write(raw)
        tracemalloc.start()
        try:
            with pytest.raises(unickpt.CorruptCheckpointError, match="not a msgpack document"):
                unickpt.load(path)
            assert tracemalloc.get_traced_memory()[1] < 8 << 20
        finally:
            tracemalloc.stop()
