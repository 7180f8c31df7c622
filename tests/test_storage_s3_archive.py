"""The archive on object stores, killed at every point.

Object stores have no rename: the archive of ``step_*`` into ``run_<K>/`` copies each
checkpoint (manifest last), then deletes the source (manifest first), first into the staging
prefix ``.unickpt-archive.run_<K>/``, then from there into ``run_<K>/``.  The writer is
killed before each of those object operations in turn (every kill point, on ``memory://``:
the same code as on S3; a few on the real server); the next start must never resume a
wrong or damaged checkpoint, must finish with every old checkpoint committed, whole, in
exactly one place, and must leave no leftovers in the root.
"""

from __future__ import annotations

import json
import os
import uuid

import numpy as np
import pytest

import unickpt

pytest.importorskip("fsspec")
from unickpt.storage import storage_for  # noqa: E402
from unickpt.storage.objstore import FsspecStorage  # noqa: E402

KILLS = int(os.environ.get("UNICKPT_S3_ARCHIVE_KILLS", "2"))


def state(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {"w": rng.standard_normal((16, 9)).astype(np.float32), "step": step}


def same(a: dict, b: dict) -> bool:
    return a["step"] == b["step"] and a["w"].tobytes() == b["w"].tobytes()


class Killed(BaseException):
    """The process dies here: nothing of the library's error handling runs."""


class Dying(FsspecStorage):
    """Dies before its ``n``-th object-changing operation (copy, delete, put)."""

    def __init__(self, url: str, opts: dict | None, n: int):
        super().__init__(url, opts)
        self.n, self.ops = n, 0

    def _tick(self) -> None:
        self.ops += 1
        if self.ops == self.n:
            raise Killed()

    def _copy(self, src: str, dst: str) -> None:
        self._tick()
        super()._copy(src, dst)

    def remove_file(self, path: str) -> None:
        self._tick()
        super().remove_file(path)

    def _rm_prefix(self, path: str) -> None:
        self._tick()
        super()._rm_prefix(path)


def old_run(url: str, opts: dict | None) -> None:
    with unickpt.CheckpointManager(url, storage_options=opts, keep_last=3) as m:
        for s in (1, 2, 3):
            m.save(s, state(s))


def archive_killed_at(url: str, opts: dict | None, n: int) -> bool:
    """A fresh-start manager (archives the old run) killed before operation ``n``; True if
    the kill happened (False: the archive needs fewer operations)."""
    st = Dying(url, opts, n)
    m = unickpt.CheckpointManager(url, storage=st, resume="never")
    try:
        m.resolve_start()
    except Killed:
        # the process is gone: its lease stops being renewed and expires
        lock = m.run_root._lock
        lock._stop.set()
        lock.token = None
        m._closed = True
        st.write_atomic(lock.path, json.dumps({"host": "gone", "pid": 1, "token": "x",
                                               "expires": 0}).encode())
        return True
    st.n = 0  # the archive finished before operation n: nothing more to kill
    m.close()
    return False


def check_next_start(url: str, opts: dict | None) -> None:
    st = storage_for(url, opts)
    base = st.resolve(url)
    # a resume="auto" start first: whatever it finds must be an intact old checkpoint
    with unickpt.CheckpointManager(url, storage=st) as m:
        r = m.restore(state(0))
        if r.resumed:
            assert r.step == 3 and same(r.state, state(3))
    with unickpt.CheckpointManager(url, storage=st, resume="never") as m:
        d = m.resolve_start()
        assert m.checkpoints() == [] and not m.restore(state(0)).resumed, d
    names = [n for n in st.list_dir(base) if n != ".unickpt.lock"]
    assert names == ["run_1"], names  # no staging, no half-moved step, one run directory
    assert st.list_dir(base + "/run_1") == ["step_1", "step_2", "step_3"]
    for s in (1, 2, 3):
        ck = f"{base}/run_1/step_{s}"
        assert same(unickpt.load(ck, storage=st), state(s))
        assert sorted(st.list_dir(ck)) == ["arrays.safetensors", "manifest.msgpack"]


def run_kill_points(url_of, opts: dict | None, points) -> int:
    done = 0
    for n in points:
        url = url_of()
        old_run(url, opts)
        if not archive_killed_at(url, opts, n):
            break
        check_next_start(url, opts)
        done += 1
    return done


def test_archive_killed_at_every_point_memory():
    ran = run_kill_points(lambda: f"memory://unickpt-{uuid.uuid4().hex[:10]}/run", None,
                          range(1, 200))
    assert ran >= 24  # 3 checkpoints x (2 copies, 2 deletes) x 2 moves, and more


def test_archive_killed_on_s3(s3_root):
    url, opts = s3_root
    rng = np.random.default_rng(int(os.environ.get("UNICKPT_SEED", "0")))
    points = sorted(rng.choice(np.arange(1, 24), size=KILLS, replace=False).tolist())
    roots = iter(f"{url}-{i}" for i in range(len(points)))
    assert run_kill_points(lambda: next(roots), opts, points) == len(points)
