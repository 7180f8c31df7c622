"""Crafted checkpoints from the reliability audit: each must load correctly or be refused with a
typed error by every reader (load, load(mmap), inspect, verify), fast and in bounded memory."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tracemalloc

import _manifest_body as manifest_body
import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

import unickpt
from unickpt.errors import CorruptCheckpointError
from unickpt.format.manifest import check_no_overlap, decimal_to_int, int_to_decimal

DATA = "arrays.safetensors"
EMPTY = xxhash.xxh3_64_intdigest(b"")


def _rewrite(path: str, mutate) -> int:
    """Apply ``mutate(body)`` (array entries as v2 maps) and store it with a valid checksum (a
    crafted, not damaged, file); as the v3 table when the entries fit its columns, else as v2
    (tests/_manifest_body.py).  Returns the version written."""
    return manifest_body.rewrite_body(path, mutate)


def _all_refuse(path: str, match: str) -> None:
    for fn in (unickpt.load, lambda p: unickpt.load(p, mmap=True), unickpt.inspect,
               unickpt.verify):
        with pytest.raises(unickpt.CorruptCheckpointError, match=match) as ei:
            fn(path)
        assert path in str(ei.value)


def _pieces_checkpoint(tmp_path, n: int) -> str:
    """n one-element uint8 arrays, then rewritten into one sharded entry of shape [n]."""
    path = str(tmp_path / "ck")
    unickpt.save(path, {"p": [np.array([i % 256], np.uint8) for i in range(n)]})

    def mutate(b):
        b["sharded"] = [{"dtype": "uint8", "shape": [n],
                         "pieces": [{"index": [[i, i + 1]], "array": i} for i in range(n)]}]
        b["tree"] = ["d", ["s", ["s", 0]]]
    _rewrite(path, mutate)
    return path


# ------------------------------------------------------------------ row 5: overlap check
def test_many_pieces_are_checked_fast_and_exactly(tmp_path):
    path = _pieces_checkpoint(tmp_path, 4000)
    t0 = time.perf_counter()
    out = unickpt.load(path)
    assert time.perf_counter() - t0 < 1.0  # the pairwise check took ~10 s
    assert out["s"].tobytes() == bytes(i % 256 for i in range(4000))


def test_overlapping_pieces_with_the_right_total_are_refused(tmp_path):
    path = _pieces_checkpoint(tmp_path, 4)
    # pieces [0,1) [1,2) [1,2) [3,4): the element count adds up, yet [2,3) is a hole

    def mutate(b):
        b["sharded"][0]["pieces"][2]["index"] = [[1, 2]]
    _rewrite(path, mutate)
    _all_refuse(path, r"sharded 0: piece \(\(1, 2\),\) overlaps another piece")


def test_two_dimensional_overlap_is_found(tmp_path):
    path = str(tmp_path / "ck")
    unickpt.save(path, {"p": [np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.uint8),
                              np.zeros((1, 1), np.uint8)] + [np.zeros((1, 1), np.uint8)] * 3})

    def mutate(b):  # 3x3 global: two 2x2 pieces overlapping at (1,1), five cells in all + ...
        b["sharded"] = [{"dtype": "uint8", "shape": [3, 3], "pieces": [
            {"index": [[0, 2], [0, 2]], "array": 0}, {"index": [[1, 3], [1, 3]], "array": 1},
            {"index": [[0, 1], [2, 3]], "array": 2}]}]
        b["tree"] = ["s", 0]
    _rewrite(path, mutate)
    _all_refuse(path, "overlaps another piece|cover")


# ------------------------------------------------------------------ row 6: amplification
def test_an_array_may_serve_one_piece_only(tmp_path):
    path = _pieces_checkpoint(tmp_path, 4)

    def mutate(b):
        b["sharded"][0]["pieces"][1]["array"] = 0
    _rewrite(path, mutate)
    _all_refuse(path, "sharded 0: array 0 is used by more than one piece")


def test_repeated_references_to_a_sharded_entry_are_assembled_once(tmp_path):
    path = str(tmp_path / "ck")
    a = np.arange(1 << 17, dtype=np.float64)  # 1 MiB
    unickpt.save(path, {"s": unickpt.ShardedArray(a.shape, a.dtype, [
        unickpt.Piece(((0, 1 << 16),), a[:1 << 16]),
        unickpt.Piece(((1 << 16, 1 << 17),), a[1 << 16:])])})

    def mutate(b):
        b["tree"] = ["l", [["s", 0]] * 640]
    _rewrite(path, mutate)
    tracemalloc.start()
    try:
        out = unickpt.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20  # was 640 MiB
    assert all(x is out[0] for x in out) and out[0].tobytes() == a.tobytes()


# ------------------------------------------------------------------ row 8: huge U<n>
@pytest.mark.parametrize("dtype", ["U999999999", "U536870912"])
def test_a_dtype_too_wide_for_numpy_is_a_typed_error(tmp_path, dtype):
    path = _pieces_checkpoint(tmp_path, 1)

    def mutate(b):
        b["arrays"][0].update(dtype=dtype, shape=[0], nbytes=0, xxh3=EMPTY)
        b["sharded"] = []
        b["tree"] = ["a", 0]
    assert _rewrite(path, mutate) == 3
    _all_refuse(path, f"array 0: dtype '{dtype}' is too wide")


# ------------------------------------------------------------------ row 9: long ints
def test_ints_past_the_4300_digit_limit_round_trip(tmp_path):
    tree = {"big": 10 ** 4400, "neg": -(7 ** 9000)}
    unickpt.save(tmp_path / "ck", tree)
    assert unickpt.load(tmp_path / "ck") == tree
    assert unickpt.inspect(tmp_path / "ck").leaves[0].value == 10 ** 4400


def test_a_spec_valid_long_int_is_read(tmp_path):
    path = _pieces_checkpoint(tmp_path, 1)
    digits = "9" * 99_999

    def mutate(b):
        b["sharded"], b["tree"] = [], ["i", "-" + digits]
    _rewrite(path, mutate)
    assert unickpt.load(path) == -(10 ** 99_999 - 1)


def test_an_int_longer_than_the_format_allows_is_refused_on_save(tmp_path):
    with pytest.raises(unickpt.UnsupportedLeafError, match=r"cannot save x: int with "
                       "100001 decimal characters"):
        unickpt.save(tmp_path / "ck", {"x": 10 ** 100_000})
    assert not os.path.exists(tmp_path / "ck")


def test_decimal_conversion_is_exact_at_the_chunk_edges():
    for x in [0, 1, -1, 10 ** 3999, 10 ** 4000 - 1, 10 ** 4000, -(10 ** 8000) + 1, 3 ** 20000]:
        s = int_to_decimal(x)
        assert decimal_to_int(s) == x and s.lstrip("-")[0] != "0" or x == 0


# ------------------------------------------------------------------ row 10: empty shapes
def test_empty_shape_numpy_cannot_build_is_refused_by_every_reader(tmp_path):
    path = _pieces_checkpoint(tmp_path, 1)

    def mutate(b):
        b["arrays"][0].update(dtype="float64", shape=[0, 2 ** 61], nbytes=0)
        b["sharded"], b["tree"] = [], ["a", 0]
    assert _rewrite(path, mutate) == 3
    _all_refuse(path, r"array 0: shape \[0, 2305843009213693952\] is absurdly large")


def test_a_large_but_buildable_empty_shape_loads(tmp_path):
    path = _pieces_checkpoint(tmp_path, 1)

    def mutate(b):
        b["arrays"][0].update(dtype="float64", shape=[0, 2 ** 50], nbytes=0, xxh3=EMPTY)
        b["sharded"], b["tree"] = [], ["a", 0]
    assert _rewrite(path, mutate) == 3
    for mmap in (False, True):
        a = unickpt.load(path, mmap=mmap)
        assert a.shape == (0, 2 ** 50) and a.dtype == np.float64
    assert unickpt.verify(path).ok


# ------------------------------------------------------------------ row 16: header checksum
def test_a_changed_safetensors_header_is_detected(tmp_path):
    path = str(tmp_path / "ck")
    unickpt.save(path, {"w": np.zeros((2, 3), np.float32)})
    fpath = os.path.join(path, DATA)
    with open(fpath, "rb") as f:
        data = f.read()
    assert b'"shape":[2,3]' in data
    with open(fpath, "wb") as f:  # same length: only the checksum can tell
        f.write(data.replace(b'"shape":[2,3]', b'"shape":[3,2]'))
    for fn in (unickpt.load, lambda p: unickpt.load(p, mmap=True)):
        with pytest.raises(unickpt.CorruptCheckpointError,
                           match="damaged safetensors header \\(checksum mismatch\\)"):
            fn(path)
    # the array's bytes are intact (0 damaged leaves), the file as a whole is not
    with pytest.raises(unickpt.CorruptCheckpointError,
                       match="0 damaged leaves: ; .*damaged safetensors header"):
        unickpt.verify(path)
    report = unickpt.verify(path, raise_on_error=False)
    assert not report.ok and report.bad == [] and list(report.files) == [DATA]


@pytest.mark.parametrize("version", [2, 3])
def test_a_v2_or_later_manifest_without_the_header_checksum_is_refused(tmp_path, version):
    path = _pieces_checkpoint(tmp_path, 1)
    manifest_body.write_version(path, version)
    assert _rewrite(path, lambda b: b["files"][0].pop("header_xxh3")) == version
    _all_refuse(path, "field 'header_xxh3' missing")


# ------------------------------------------------------------------ start-up: lazy ml_dtypes
def test_ml_dtypes_is_imported_only_when_a_checkpoint_needs_it(tmp_path):
    import ml_dtypes

    unickpt.save(tmp_path / "plain", {"w": np.ones(2, np.float32)})
    unickpt.save(tmp_path / "bf", {"w": np.ones(2, ml_dtypes.bfloat16)})
    code = (
        "import sys, unickpt\n"
        "assert 'ml_dtypes' not in sys.modules, 'imported at start-up'\n"
        f"unickpt.load({str(tmp_path / 'plain')!r})\n"
        "assert 'ml_dtypes' not in sys.modules, 'imported for a float32 checkpoint'\n"
        f"w = unickpt.load({str(tmp_path / 'bf')!r})['w']\n"
        "assert w.dtype.name == 'bfloat16' and w.tobytes() == b'\\x80\\x3f' * 2\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120, start_new_session=True)
    assert r.returncode == 0, r.stderr


@settings(max_examples=300, database=None, derandomize=True, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=2,
                         max_size=2), min_size=2, max_size=8))
def test_the_grid_overlap_check_agrees_with_pairwise_comparison(raw):
    boxes = [tuple((min(a, b), max(a, b)) for a, b in box) for box in raw]

    def overlap(p, q):
        return all(max(a0, c0) < min(b0, d0) for (a0, b0), (c0, d0) in zip(p, q))

    expected = any(overlap(p, q) for k, p in enumerate(boxes) for q in boxes[k + 1:])

    def fail(msg):
        raise CorruptCheckpointError(msg)

    if expected:
        with pytest.raises(CorruptCheckpointError, match="overlaps another piece"):
            check_no_overlap(boxes, (6, 6), fail, 0)
    else:
        check_no_overlap(boxes, (6, 6), fail, 0)
