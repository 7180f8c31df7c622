"""The fast paths of the format give exactly what the simple paths give.

Writer: small arrays are written in batches (one pwritev each) and writeback is started chunk
by chunk; the files must be byte-identical to one-array-at-a-time writes.  Reader: small arrays
are read in batches (one preadv each); every array must equal the one-at-a-time read, and the
memory-mapped restore must equal the materialized one.  Plus a smoke run of the benchmark.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import unickpt
from unickpt.format import reader as reader_mod
from unickpt.format import writer as writer_mod
from unickpt.format.reader import CheckpointReader
from unickpt.storage import local as local_mod

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DTYPES = [np.dtype(x) for x in ("<f4", ">f4", "<f8", "<i2", ">i8", "u1", "?", "<c8", "<f2",
                                "S3", "<U2")] + [np.dtype(ml_dtypes.bfloat16)]


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    dt = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    big = draw(st.booleans()) and dt.itemsize <= 8
    if big:  # above SMALL_BYTES so the unbatched path is exercised too
        shape = (draw(st.integers(9000, 12000)), 2)
    n = int(np.prod(shape)) * dt.itemsize
    seed = draw(st.integers(0, 2**32 - 1))
    raw = np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8)
    a = raw.view(dt).reshape(shape) if n else np.zeros(shape, dt)
    if draw(st.booleans()) and a.ndim >= 2:
        a = a.T  # non-contiguous
    if draw(st.booleans()) and a.ndim == 0 and dt.kind not in "SU" and dt != np.float64:
        return a[()]  # numpy scalar (float64/bytes_/str_ scalars are Python subclasses)
    return a


trees = st.dictionaries(st.text("abc/é", min_size=1, max_size=4), arrays(), min_size=1,
                        max_size=12)


def _files(d: str) -> dict[str, bytes]:
    out = {}
    for f in sorted(os.listdir(d)):
        with open(os.path.join(d, f), "rb") as fh:
            out[f] = fh.read()
    return out


def _same(a: object, b: object) -> None:
    assert type(a) is type(b)
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(tree=trees)
def test_batched_write_is_byte_identical_to_one_array_at_a_time(tree, tmp_path, monkeypatch):
    fast = tmp_path / f"fast{len(os.listdir(tmp_path))}"
    fast.mkdir()
    writer_mod.write_tree(str(fast), tree, metadata={"m": 1})
    slow = tmp_path / f"slow{len(os.listdir(tmp_path))}"
    slow.mkdir()
    with monkeypatch.context() as m:
        m.setattr(writer_mod, "SMALL_BYTES", -1)  # every array is its own job
        m.setattr(local_mod, "_start_writeback", None)
        m.setattr(writer_mod, "CHUNK_BYTES", 4096)
        writer_mod.write_tree(str(slow), tree, metadata={"m": 1}, workers=1)
    assert _files(str(fast)) == _files(str(slow))


def _thread_pools(monkeypatch) -> list[int]:
    """Record the worker count of every thread pool the writer starts."""
    import concurrent.futures

    started: list[int] = []
    real = concurrent.futures.ThreadPoolExecutor

    class Recording(real):  # type: ignore[misc, valid-type]
        def __init__(self, n, *a, **k):
            started.append(n)
            super().__init__(n, *a, **k)

    monkeypatch.setattr(concurrent.futures, "ThreadPoolExecutor", Recording)
    return started


@pytest.mark.parametrize(("n", "size", "threads"), [
    (10_000, 256, False),  # 10 MB of 1 KiB arrays: the GIL-bound work per array dominates
    (200, 15_000, True),   # 12 MB of 60 KiB arrays: copying and hashing bytes dominates
    (2, 2_000_000, True),  # 16 MB in two big arrays
    (100, 15_000, False),  # 6 MB: under the 8 MiB worth a pool
])
def test_writer_threads_only_where_bytes_outweigh_arrays(n, size, threads, tmp_path,
                                                        monkeypatch):
    tree = {f"p{i:05d}": np.full(size, i, np.float32) for i in range(n)}
    started = _thread_pools(monkeypatch)
    d = tmp_path / "c"
    d.mkdir()
    writer_mod.write_tree(str(d), tree, workers=2)
    assert started == ([2] if threads else [])
    # the same bytes whichever way it was written
    one = tmp_path / "one"
    one.mkdir()
    writer_mod.write_tree(str(one), tree, workers=1)
    assert _files(str(d)) == _files(str(one))
    if not threads:  # and with a pool forced on, too
        monkeypatch.setattr(writer_mod, "THREAD_MIN_MEAN", 0)
        forced = tmp_path / "forced"
        forced.mkdir()
        writer_mod.write_tree(str(forced), tree, workers=2)
        assert _files(str(forced)) == _files(str(one))
        assert started[-1:] == ([2] if n * size * 4 >= 8 << 20 else [])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(tree=trees)
def test_batched_read_equals_per_array_read_and_mmap(tree, tmp_path):
    path = tmp_path / f"ck{len(os.listdir(tmp_path))}"
    unickpt.save(path, tree)
    got = unickpt.load(path)
    mapped = unickpt.load(path, mmap=True, verify=True)
    with CheckpointReader(path) as r:
        one_by_one = [r.read_array(i) for i in range(len(r.manifest.arrays))]
        by_path = {r.array_paths[i]: a for i, a in enumerate(one_by_one)}
    assert set(got) == set(tree) == set(mapped)
    for k, v in tree.items():
        _same(got[k], mapped[k])
        _same(got[k], by_path[(k,)])
        _same(got[k], v)
        if isinstance(got[k], np.ndarray):
            assert got[k].flags.writeable and got[k].flags.aligned


def test_small_arrays_share_one_read_yet_are_independent(tmp_path):
    tree = {f"p{i}": np.full(7, i, np.int32) for i in range(50)}
    unickpt.save(tmp_path / "c", tree)
    with CheckpointReader(tmp_path / "c") as r:
        assert [len(b) for b in r._small_batches(list(range(50)))] == [50]
    got = unickpt.load(tmp_path / "c")
    got["p3"][:] = -1  # views of one buffer, but disjoint ones
    assert got["p2"].tolist() == [2] * 7 and got["p4"].tolist() == [4] * 7


def test_batch_limits_split_reads_and_writes(tmp_path, monkeypatch):
    tree = {f"p{i:02d}": np.arange(100, dtype=np.float64) + i for i in range(30)}
    monkeypatch.setattr(writer_mod, "BATCH_BYTES", 2000)  # 2 arrays of 800 B per batch
    _node, jobs, _sharded = writer_mod.flatten(tree)
    writer_mod.layout(jobs)
    assert len(writer_mod._work_items(jobs)) == 15
    unickpt.save(tmp_path / "c", tree)
    monkeypatch.setattr(reader_mod, "BATCH_READ", 2000)
    with CheckpointReader(tmp_path / "c") as r:
        assert len(r._small_batches(list(range(30)))) == 15
    got = unickpt.load(tmp_path / "c")
    for k, v in tree.items():
        _same(got[k], v)


def test_corrupt_small_array_in_a_batch_is_named(tmp_path):
    tree = {"a": np.arange(5, dtype=np.int64), "b": np.arange(6, dtype=np.int64),
            "c": np.arange(7, dtype=np.int64)}
    unickpt.save(tmp_path / "c", tree)
    with CheckpointReader(tmp_path / "c") as r:
        e = r.manifest.arrays[next(i for i, p in r.array_paths.items() if p == ("b",))]
    data = tmp_path / "c" / "arrays.safetensors"
    raw = bytearray(data.read_bytes())
    raw[e.offset + 3] ^= 0x40
    data.write_bytes(bytes(raw))
    with pytest.raises(unickpt.CorruptCheckpointError, match=r"leaf b: checksum mismatch") as ei:
        unickpt.load(tmp_path / "c")
    assert ei.value.leaves == ["b"]


def test_big_array_streamed_in_chunks_with_writeback_round_trips(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_mod, "CHUNK_BYTES", 1 << 16)
    rng = np.random.default_rng(0)
    tree = {"w": rng.random((300, 1000), dtype=np.float32),  # 1.2 MB: many chunks
            "wt": rng.random((500, 700)).T,  # non-contiguous, converted block by block
            "s": np.float16(1.5)}
    unickpt.save(tmp_path / "c", tree)
    assert unickpt.verify(tmp_path / "c").ok
    got = unickpt.load(tmp_path / "c")
    for k, v in tree.items():
        _same(got[k], v)


def test_writeback_hint_is_started_over_the_big_array_data(tmp_path, monkeypatch):
    """The writeback hint is called (and succeeds) on byte ranges that tile the big arrays:
    a no-op or a wrong range would silently lose the write/disk overlap."""
    real = local_mod._writeback()
    if sys.platform.startswith("linux"):
        assert real is not None
    if real is None:
        pytest.skip("no writeback hint on this platform")
    calls: list[tuple[int, int, int]] = []

    def spy(fd: int, off: int, n: int) -> object:
        rc = real(fd, off, n)
        calls.append((off, n, rc))
        return rc

    monkeypatch.setattr(writer_mod, "CHUNK_BYTES", 1 << 16)
    monkeypatch.setattr(local_mod, "_start_writeback", spy)
    w = np.random.default_rng(1).random((300, 1000), dtype=np.float32)  # 1.2 MB
    unickpt.save(tmp_path / "c", {"w": w})
    size = os.path.getsize(tmp_path / "c" / writer_mod.DATA_FILE)
    assert len(calls) >= w.nbytes // (1 << 16) // 2, calls
    assert all(rc in (0, None) for _, _, rc in calls), calls  # sync_file_range returns 0
    spans = sorted((off, off + n) for off, n, _ in calls)
    assert all(0 <= a < b <= size for a, b in spans)
    assert all(b0 <= a1 for (_, b0), (a1, _) in zip(spans, spans[1:])), "ranges overlap"
    assert sum(b - a for a, b in spans) >= 0.9 * w.nbytes  # covers (almost) all the data
    np.testing.assert_array_equal(unickpt.load(tmp_path / "c")["w"], w)


def test_gc_state_is_restored_after_save_and_load_even_on_error(tmp_path):
    assert gc.isenabled()
    unickpt.save(tmp_path / "c", {"a": np.arange(3)})
    unickpt.load(tmp_path / "c")
    assert gc.isenabled()
    with pytest.raises(unickpt.UnsupportedLeafError, match="cannot save x"):
        unickpt.save(tmp_path / "d", {"x": object()})
    assert gc.isenabled()
    gc.disable()
    try:
        unickpt.save(tmp_path / "e", {"a": np.arange(3)})
        unickpt.load(tmp_path / "e")
        assert not gc.isenabled()  # a caller's choice to keep gc off is respected
    finally:
        gc.enable()


def test_benchmark_quick_smoke(tmp_path):
    """`benchmarks/run.py --quick` runs every importable system and writes its three outputs."""
    out = tmp_path / "bench"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT, os.path.join(ROOT, "adapters"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--quick",
                           "--repeats", "1", "--fs", "disk", "--no-startup",
                           "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert [s["state"] for s in doc["states"]] == ["big", "small", "transformer"]
    for st_ in doc["states"]:
        assert {"unickpt", "unickpt (mmap)", "raw write+fsync"} <= set(st_["runs"])
        assert all(len(r["load"]) == 1 for r in st_["runs"].values())
    assert doc["machine"]["cpu_count"] >= 1
    md = (out / "results.md").read_text()
    assert "| unickpt |" in md and "### targets" in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in os.listdir(out) if p.startswith(".bench-")]  # workdir removed


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(names=st.lists(st.text(st.characters(exclude_categories=("Cs",)), max_size=6),
                      min_size=1, max_size=6, unique=True))
def test_safetensors_header_is_exactly_json_dumps(names, tmp_path):
    """The hand-built header is byte for byte what json.dumps writes, for any tensor name."""
    d = tmp_path / f"h{len(os.listdir(tmp_path))}"
    d.mkdir()
    tree = {n: np.arange(i + 1, dtype=np.int16) for i, n in enumerate(names)}
    writer_mod.write_tree(str(d), tree)
    raw = (d / "arrays.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    text = raw[8:8 + n].rstrip(b" ")
    header = json.loads(text)
    assert text == json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
    from safetensors.numpy import load_file

    loaded = load_file(str(d / "arrays.safetensors"))
    assert len(loaded) == len(names)
    with CheckpointReader(d) as r:
        for i, e in enumerate(r.manifest.arrays):
            _same(loaded[e.name], tree[r.array_paths[i][0]])


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bufs=st.lists(st.binary(max_size=40), max_size=12),
       limits=st.lists(st.integers(1, 50), min_size=1, max_size=8), at=st.integers(0, 9))
def test_local_pwritev_completes_short_writes(bufs, limits, at, tmp_path, monkeypatch):
    # the kernel may write less than asked (a signal, a full pipe of a FUSE mount); pwritev
    # must write the rest, whichever buffer boundary (or middle) the short write ends in
    real, calls = os.pwritev, []

    def short(fd, buffers, offset):
        calls.append(offset)
        data = b"".join(bytes(b) for b in buffers)[:limits[(len(calls) - 1) % len(limits)]]
        return real(fd, [data], offset)

    monkeypatch.setattr(local_mod.os, "pwritev", short)
    path = str(tmp_path / f"f{len(os.listdir(tmp_path))}")
    fh = local_mod.LocalStorage().create(path, at)
    try:
        fh.pwritev(bufs, at)
    finally:
        fh.close()
    total = b"".join(bufs)
    with open(path, "rb") as f:
        assert f.read() == bytes(at) + total
    if total:  # one call per short write, each where the last one stopped
        assert calls[0] == at and len(calls) >= -(-len(total) // max(limits))
    else:
        assert calls == []
