"""Checkpoints on object stores through fsspec: the manager's scenarios on ``memory://`` and
on a real S3 server (SeaweedFS, tests/_seaweed.py), the commit marker, the lease lock."""

from __future__ import annotations

import posixpath
import uuid

import numpy as np
import pytest

import unickpt

pytest.importorskip("fsspec")
from unickpt.errors import CheckpointExistsError, LockedError
from unickpt.manager import RunRoot
from unickpt.storage import storage_for, temp_name
from unickpt.storage.objstore import FsspecStorage


def state(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {"w": rng.standard_normal((64, 33)).astype(np.float32),
            "big": rng.standard_normal(3 << 18).astype(np.float32),  # 3 MiB: several reads
            "b": rng.integers(0, 9, 7, dtype=np.int16), "step": step}


def same(a: dict, b: dict) -> bool:
    return (a["step"] == b["step"] and a["w"].tobytes() == b["w"].tobytes()
            and a["big"].tobytes() == b["big"].tobytes()
            and a["b"].dtype == b["b"].dtype and a["b"].tobytes() == b["b"].tobytes())


@pytest.fixture(params=["memory", "file", "s3"])
def root(request, tmp_path):
    """``(root URL, storage_options)`` on each backend."""
    if request.param == "memory":
        return f"memory://unickpt-{uuid.uuid4().hex[:10]}/run", None
    if request.param == "file":  # the generic fsspec path (no rename used), on local disk
        return f"file://{tmp_path}/run", None
    return request.getfixturevalue("s3_root")


@pytest.mark.parametrize("async_save", [False, True])
def test_save_list_restore_retention(root, async_save):
    url, opts = root
    with unickpt.CheckpointManager(url, storage_options=opts, keep_last=2,
                                   async_save=async_save) as m:
        assert m.restore(state(0)).resumed is False
        for s in range(1, 5):
            assert m.save(s, state(s), metrics={"loss": 1.0 / s})
    with unickpt.CheckpointManager(url, storage_options=opts) as m:
        assert [c.step for c in m.checkpoints()] == [3, 4] and m.latest().step == 4
        r = m.restore(state(0))
    assert r.resumed and r.step == 4 and same(r.state, state(4))
    st = storage_for(url, opts)
    rr = RunRoot(url, st)
    info = rr.describe(4)
    assert info.path == st.resolve(url) + "/step_4" and info.metrics == {"loss": 0.25}
    assert info.size == st.tree_size(info.path) > (3 << 20)
    assert rr.read_pointer() == "step_4"
    assert sorted(st.list_dir(rr.path)) == ["latest", "step_3", "step_4"]  # lock released


def test_load_inspect_verify_and_damage(root):
    url, opts = root
    st = storage_for(url, opts)
    ck = url + "/ck"
    unickpt.save(ck, state(7), metadata={"note": "hi"}, storage=st)
    assert same(unickpt.load(ck, storage=st), state(7))
    assert same(unickpt.load(ck, storage=st, mmap=True), state(7))
    ins = unickpt.inspect(ck, storage=st)
    assert [lf.path for lf in ins.leaves] == ["w", "big", "b", "step"]
    assert ins.metadata == {"note": "hi"}
    assert unickpt.verify(ck, storage=st).ok
    with pytest.raises(CheckpointExistsError, match="already exists"):
        unickpt.save(ck, state(8), storage=st)
    unickpt.save(ck, state(8), storage=st, overwrite=True)  # replace: staged, then copied
    assert same(unickpt.load(ck, storage=st), state(8))
    assert st.list_dir(st.resolve(url)) == ["ck"]  # no staging left behind
    data = bytearray(st.read_bytes(ck + "/arrays.safetensors"))
    data[-1] ^= 0xFF
    st.write_atomic(ck + "/arrays.safetensors", bytes(data))
    with pytest.raises(unickpt.CorruptCheckpointError, match="damaged leaves: b"):
        unickpt.verify(ck, storage=st)


def test_archive_on_fresh_start_and_lock(root):
    url, opts = root
    with unickpt.CheckpointManager(url, storage_options=opts) as m:
        m.save(1, state(1))
        m.save(2, state(2))
        with pytest.raises(LockedError, match=r"locked by another CheckpointManager \(pid="):
            unickpt.CheckpointManager(url, storage_options=opts).resolve_start()
    with unickpt.CheckpointManager(url, storage_options=opts, resume="never") as m:
        d = m.resolve_start()
        assert d.archived_to == m.root + "/run_1" and d.archived == ("step_1", "step_2")
        assert m.checkpoints() == [] and m.latest() is None
        m.save(1, state(11))
    st = storage_for(url, opts)
    base = st.resolve(url)
    assert st.list_dir(base + "/run_1") == ["step_1", "step_2"]
    assert same(unickpt.load(base + "/run_1/step_2", storage=st), state(2))
    assert same(unickpt.load(base + "/step_1", storage=st), state(11))


def test_uncommitted_save_is_never_resumed_and_is_cleaned(root):
    """A save that died after its data went up but before its manifest: the step prefix
    holds objects, but without the commit marker it is no checkpoint, and the next manager
    removes it through its pending marker (dead pid on this host)."""
    url, opts = root
    st = storage_for(url, opts)
    with unickpt.CheckpointManager(url, storage=st) as m:
        m.save(1, state(1))
    base = st.resolve(url)
    final = base + "/step_2"
    tmp = temp_name(final).rsplit(".", 2)[0] + ".999999999.abcd1234"  # a dead writer's
    st._put(tmp + "/pending", b'{"final": "%s", "direct": true}' % final.encode())
    st._put(final + "/arrays.safetensors", b"\0" * 100)  # data, no manifest
    assert RunRoot(url, st).scan().steps == (1,)
    assert RunRoot(url, st).scan().uncommitted == ("step_2",)
    with unickpt.CheckpointManager(url, storage=st) as m:
        r = m.restore(state(0))
        assert r.step == 1 and same(r.state, state(1))
        assert sorted(st.list_dir(base)) == [".unickpt.lock", "latest", "step_1"]
        m.save(2, state(2))
    assert same(unickpt.load(final, storage=st), state(2))


def test_commit_marker_is_create_if_absent(root):
    """Two stagings of one step: the first commit wins, the second raises and commits
    nothing (its data never replaces the committed checkpoint's manifest)."""
    url, opts = root
    st = storage_for(url, opts)
    final = st.resolve(url) + "/step_1"
    tmps = [st.make_temp_dir(final) for _ in range(2)]
    for i, t in enumerate(tmps):
        h = st.create(t + "/manifest.msgpack", 1)
        h.pwrite(bytes([i]), 0)
        h.sync()
        h.close()
    st.commit(tmps[0], final)
    with pytest.raises(CheckpointExistsError, match="committed by another writer"):
        st.commit(tmps[1], final)
    assert st.read_bytes(final + "/manifest.msgpack") == b"\0"


def test_lease_of_dead_process_is_taken_over(root):
    url, opts = root
    st = storage_for(url, opts)
    base = st.resolve(url)
    st.make_dirs(base)
    import json
    import socket
    import time
    st._put(base + "/.unickpt.lock", json.dumps({"host": socket.gethostname(), "pid": 999999999,
                                                 "token": "x", "expires": time.time() + 600}
                                                ).encode())
    with unickpt.CheckpointManager(url, storage=st) as m:
        m.save(1, state(1))
    st._put(base + "/.unickpt.lock", json.dumps({"host": "elsewhere", "pid": 1, "token": "x",
                                                 "expires": time.time() + 600}).encode())
    with pytest.raises(LockedError, match="host=elsewhere"):
        unickpt.CheckpointManager(url, storage=st).resolve_start()


def test_storage_for_dispatch(tmp_path):
    assert type(storage_for(tmp_path)).__name__ == "LocalStorage"
    st = storage_for("memory://x/y")
    assert isinstance(st, FsspecStorage) and st.resolve("memory://x/y/") == "memory:///x/y"
    assert posixpath.join(st.resolve("memory://x/y"), "step_1") == "memory:///x/y/step_1"


def test_upload_memory_is_bounded_and_parallel(s3_root, monkeypatch):
    """A 96 MiB state goes up as 5 MiB parts with at most a few parts in memory at once,
    never the whole state; the restore is bitwise."""
    import unickpt.storage.objio as objio

    monkeypatch.setattr(objio, "PART_BYTES", objio.MIN_PART_BYTES)
    monkeypatch.setattr(objio, "MAX_PARTS_IN_MEMORY", 6)
    monkeypatch.setattr(objio, "BACKPRESSURE_WAIT", 120.0)
    peak = [0]
    orig = objio.PartUploader._buf

    def watched(self, k):
        buf = orig(self, k)
        peak[0] = max(peak[0], len(self._bufs))
        return buf

    monkeypatch.setattr(objio.PartUploader, "_buf", watched)
    url, opts = s3_root
    st = storage_for(url, opts)
    rng = np.random.default_rng(3)
    big = {f"a{i}": rng.standard_normal(4 << 20).astype(np.float32) for i in range(6)}
    unickpt.save(url + "/ck", big, storage=st)
    assert 2 <= peak[0] <= 6  # of 20 parts
    got = unickpt.load(url + "/ck", storage=st)
    assert all(got[k].tobytes() == v.tobytes() for k, v in big.items())


def test_delete_uncommits_first_and_a_crash_mid_delete_is_cleaned(root):
    """Retention's delete puts a trash marker, then deletes the manifest: a delete that
    stops there leaves no checkpoint (never resumed) and the next start removes the rest."""
    from unickpt.storage import trash_name

    url, opts = root
    st = storage_for(url, opts)
    with unickpt.CheckpointManager(url, storage=st) as m:
        m.save(1, state(1))
        m.save(2, state(2))
    rr = RunRoot(url, st)
    st.move_many([(rr.step_path(2), trash_name(rr.step_path(2)))])  # the first half of delete
    assert st.exists(rr.step_path(2) + "/arrays.safetensors")
    assert rr.scan().steps == (1,) and len(rr.scan().trash) == 1
    with unickpt.CheckpointManager(url, storage=st) as m:
        r = m.restore(state(0))
        assert r.step == 1 and same(r.state, state(1))
    assert sorted(st.list_dir(rr.path)) == ["latest", "step_1"]


def test_parts_shared_by_writer_threads_under_memory_pressure(s3_root, monkeypatch):
    """Parts shared by two arrays written by different threads, with the part cap so low
    that writers wait for room all the time: every byte still lands once, in place."""
    import unickpt.storage.objio as objio

    monkeypatch.setattr(objio, "PART_BYTES", objio.MIN_PART_BYTES)
    monkeypatch.setattr(objio, "MAX_PARTS_IN_MEMORY", 1)
    monkeypatch.setattr(objio, "BACKPRESSURE_WAIT", 0.05)
    url, opts = s3_root
    st = storage_for(url, opts)
    rng = np.random.default_rng(4)  # odd sizes: part boundaries fall inside arrays
    big = {f"a{i}": rng.standard_normal((1 << 20) + 977 * i).astype(np.float32)
           for i in range(8)}
    unickpt.save(url + "/ck", big, storage=st)
    got = unickpt.load(url + "/ck", storage=st)
    assert all(got[k].tobytes() == v.tobytes() for k, v in big.items())


def test_half_removed_staging_entry_is_cleaned(s3_root):
    """A writer killed while removing its staging prefix after the commit leaves an empty
    directory entry on stores with real directories: the next start removes it."""
    from fsspec.asyn import sync

    url, opts = s3_root
    st = storage_for(url, opts)
    with unickpt.CheckpointManager(url, storage=st) as m:
        m.save(1, state(1))
    base = st.resolve(url)
    tmp = temp_name(base + "/step_2").rsplit(".", 2)[0] + ".999999999.abcd1234"
    st._put(tmp + "/pending", b"{}")
    bucket, key = st._bucket_key(tmp + "/pending")
    sync(st.fs.loop, st.fs._call_s3, "delete_object", Bucket=bucket, Key=key)
    leftovers = [n for n in st.list_dir(base) if n.startswith(".unickpt-tmp.")]
    assert st.mtime(tmp) == 0.0 or leftovers == []  # an empty entry, or none on plain S3
    with unickpt.CheckpointManager(url, storage=st) as m:
        assert m.restore(state(0)).step == 1
        assert RunRoot(url, st).scan().temps == ()


def test_restore_requests_on_s3(s3_root):
    """A restore costs one LIST, one GET per opened object (its size and first 256 KiB:
    no HEAD; the array file's header and small arrays come with it), and one GET per 16 MiB
    piece of the big array, streamed straight into it."""
    import collections

    from unickpt.storage import objio

    url, opts = s3_root
    st = storage_for(url, opts)
    big = {"a": np.random.default_rng(1).standard_normal(9 << 20).astype(np.float32),
           "s": [np.arange(i, dtype=np.int64) for i in range(1, 40)], "step": 3}
    unickpt.save(url + "/ck", big, storage=st)
    calls: collections.Counter = collections.Counter()
    real_call = st.fs._call_s3

    async def counting(method, *a, **k):
        calls[method] += 1
        return await real_call(method, *a, **k)

    streamed: list[int] = []
    real_stream = objio.RangedReader._stream_into

    async def spy(self, *a):
        n = await real_stream(self, *a)
        streamed.append(n)
        return n

    st.fs._call_s3 = counting
    try:
        objio.RangedReader._stream_into = spy
        got = unickpt.load(url + "/ck", storage=st)
    finally:
        objio.RangedReader._stream_into = real_stream
        st.fs._call_s3 = real_call
    assert got["a"].tobytes() == big["a"].tobytes() and got["step"] == 3
    assert all(x.tobytes() == y.tobytes() for x, y in zip(got["s"], big["s"]))
    assert sorted(streamed) == [4 << 20, 16 << 20, 16 << 20]  # 36 MiB, no fallback
    # the manifest and the array file opened (2), the 3 pieces
    assert dict(calls) == {"list_objects_v2": 1, "get_object": 5}, calls


@pytest.mark.parametrize("replace", [False, True])
def test_another_process_writes_into_the_staging(root, replace):
    """A multi-process save: rank 0 stages, rank 1 (another FsspecStorage, as in another
    process) learns from the pending marker where its file goes, rank 0 commits both."""
    url, opts = root
    r0, r1 = storage_for(url, opts), storage_for(url, opts)
    base = r0.resolve(url)
    r0.make_dirs(base)
    final = base + "/step_1"
    if replace:  # a committed checkpoint in the way: the data is staged, copied at commit
        unickpt.save(final, state(1), storage=r0)
    tmp = r0.make_temp_dir(final)
    assert r1.is_dir(tmp)  # the shared-root check every rank makes
    for st, name, data in ((r1, "arrays-r1.safetensors", b"abc"),
                           (r0, "arrays-r0.safetensors", b"xy"),
                           (r0, "manifest.msgpack", b"hi")):
        h = st.create(tmp + "/" + name, len(data))
        h.pwrite(data, 0)
        h.sync()
        h.close()
    assert not r0.is_file(final + "/manifest.msgpack") or replace
    r0.commit(tmp, final, replace=replace)
    assert sorted(r0.list_dir(final)) == ["arrays-r0.safetensors", "arrays-r1.safetensors",
                                          "manifest.msgpack"]
    assert r0.read_bytes(final + "/arrays-r1.safetensors") == b"abc"
    assert r0.read_bytes(final + "/manifest.msgpack") == b"hi"
    assert r0.list_dir(base) == ["step_1"]  # the staging is gone
