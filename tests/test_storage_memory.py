"""A storage backend that keeps bytes in a dict, written against docs/storage.md alone, and
the manager's scenarios run on it: nothing may reach the local filesystem."""

from __future__ import annotations

import os
import posixpath
import time

import numpy as np
import pytest

import unickpt
from unickpt.errors import CheckpointExistsError, LockedError
from unickpt.manager import RunRoot
from unickpt.storage import Storage, temp_name

# ----------------------------------------------------------------- the backend (~80 lines)


class MemFile:  # a WriteHandle and a ReadHandle over one preallocated bytearray
    def __init__(self, buf: bytearray): self.buf, self.size = buf, len(buf)
    def pwrite(self, data, offset): self.buf[offset:offset + len(data)] = data
    def pwritev(self, bufs, offset): self.pwrite(b"".join(bufs), offset)
    def hint_written(self, offset, nbytes): pass
    def sync(self): pass  # nothing to make durable: "stable storage" is this dict
    def close(self): pass
    def buffer(self): return memoryview(bytes(self.buf))

    def pread_into(self, buf, offset):
        n = max(0, min(len(buf), self.size - offset))
        buf[:n] = self.buf[offset:offset + n]
        return n


class MemLock:  # a real backend would take a lease (docs/storage.md)
    def __init__(self, held: set, root: str): self.held, self.root, self.mine = held, root, False
    def release(self): self.mine = self.mine and self.held.discard(self.root)

    def acquire(self):
        if not self.mine and self.root in self.held:
            raise LockedError(f"run root {self.root} is locked by another CheckpointManager")
        self.held.add(self.root)
        self.mine = True


class MemoryStorage:
    def __init__(self): self.files, self.dirs, self.held = {}, {"/"}, set()
    def resolve(self, path): return posixpath.normpath(posixpath.join("/", os.fspath(path)))
    def is_dir(self, path): return path in self.dirs
    def is_file(self, path): return path in self.files
    def exists(self, path): return path in self.dirs or path in self.files
    def mtime(self, path): return time.time() if self.exists(path) else self.open(path)
    def lock(self, root): return MemLock(self.held, root)
    def write_atomic(self, path, data): self.files[path] = bytearray(data)
    def remove_file(self, path): self.files.pop(path, None)
    def read_bytes(self, path): return bytes(self.open(path).buf)
    def _under(self, p): return [k for k in (*self.files, *self.dirs) if k == p or k.startswith(p + "/")]

    def list_dir(self, path):
        return sorted({k[len(path) + 1:].split("/")[0] for k in self._under(path) if k != path})

    def make_dirs(self, path):
        while path not in self.dirs:
            self.dirs.add(path)
            path = posixpath.dirname(path)

    def make_temp_dir(self, final):
        self.make_dirs(tmp := temp_name(final))
        return tmp

    def commit(self, temp, final, *, replace=False):  # atomic: one step of this (locked) test
        if self.exists(final) and not replace:
            raise CheckpointExistsError(f"{final} already exists")
        self.remove_tree(final)
        self.move_many([(temp, final)])

    def create(self, path, size=0):
        if self.exists(path):
            raise FileExistsError(path)
        return MemFile(self.files.setdefault(path, bytearray(size)))

    def share(self, src, dst):  # optional (incremental saves): the same bytes, like a hard link
        if self.exists(dst):
            raise FileExistsError(dst)
        self.files[dst] = self.files[src]  # committed files are never written again
        return True

    def open(self, path):
        if path in self.dirs:
            raise IsADirectoryError(path)
        if path not in self.files:
            raise FileNotFoundError(path)
        return MemFile(self.files[path])

    def remove_tree(self, path):
        for k in self._under(path):
            self.files.pop(k, None)
            self.dirs.discard(k)

    def move_many(self, pairs):
        for src, dst in pairs:
            if self.exists(dst):
                raise CheckpointExistsError(f"cannot move {src} to {dst}: destination exists")
            for k in self._under(src):
                if k in self.files:
                    self.files[dst + k[len(src):]] = self.files.pop(k)
                else:
                    self.dirs.discard(k)
                    self.dirs.add(dst + k[len(src):])

    def tree_size(self, path):
        return sum(len(v) for k, v in self.files.items() if posixpath.dirname(k) == path)


# ----------------------------------------------------------------- scenarios

ROOT = "/mem/run"


def state(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {"w": rng.standard_normal((64, 33)).astype(np.float32),
            "b": rng.integers(0, 9, 7, dtype=np.int16), "step": step}


def same(a: dict, b: dict) -> bool:
    return (a["step"] == b["step"] and a["w"].tobytes() == b["w"].tobytes()
            and a["b"].dtype == b["b"].dtype and a["b"].tobytes() == b["b"].tobytes())


@pytest.fixture
def mem(monkeypatch):
    m = MemoryStorage()
    assert isinstance(m, Storage)
    yield m
    assert not os.path.exists(ROOT) and not os.path.exists("/mem")  # no byte went local


@pytest.mark.parametrize("async_save", [False, True])
def test_save_list_restore_retention(mem, async_save):
    with unickpt.CheckpointManager(ROOT, storage=mem, keep_last=2, async_save=async_save) as m:
        assert m.restore(state(0)).resumed is False
        for s in range(1, 5):
            assert m.save(s, state(s), metrics={"loss": 1.0 / s})
    with unickpt.CheckpointManager(ROOT, storage=mem) as m:
        assert [c.step for c in m.checkpoints()] == [3, 4] and m.latest().step == 4
        r = m.restore(state(0))
    assert r.resumed and r.step == 4 and same(r.state, state(4))
    info = RunRoot(ROOT, mem).describe(4)
    assert info.path == "/mem/run/step_4" and info.metrics == {"loss": 0.25}
    assert info.size == mem.tree_size("/mem/run/step_4") > 64 * 33 * 4
    assert RunRoot(ROOT, mem).read_pointer() == "step_4"
    assert sorted(mem.list_dir(ROOT)) == ["latest", "step_3", "step_4"]


def test_verify_inspect_load_and_damage(mem):
    unickpt.save("/mem/ck", state(7), metadata={"note": "hi"}, storage=mem)
    assert same(unickpt.load("/mem/ck", storage=mem), state(7))
    assert same(unickpt.load("/mem/ck", storage=mem, mmap=True), state(7))
    ins = unickpt.inspect("/mem/ck", storage=mem)
    assert [lf.path for lf in ins.leaves] == ["w", "b", "step"] and ins.metadata == {"note": "hi"}
    assert unickpt.verify("/mem/ck", storage=mem).ok
    with pytest.raises(CheckpointExistsError, match="already exists"):
        unickpt.save("/mem/ck", state(8), storage=mem)
    data = mem.files["/mem/ck/arrays.safetensors"]
    data[-1] ^= 0xFF  # the last array byte: every read must see it through the storage
    with pytest.raises(unickpt.CorruptCheckpointError, match="damaged leaves: b"):
        unickpt.verify("/mem/ck", storage=mem)


def test_archive_on_fresh_start_and_lock(mem):
    with unickpt.CheckpointManager(ROOT, storage=mem) as m:
        m.save(1, state(1))
        m.save(2, state(2))
        with pytest.raises(LockedError, match="locked"):
            unickpt.CheckpointManager(ROOT, storage=mem).resolve_start()
    with unickpt.CheckpointManager(ROOT, storage=mem, resume="never") as m:
        d = m.resolve_start()
        assert d.archived_to == "/mem/run/run_1" and d.archived == ("step_1", "step_2")
        assert m.checkpoints() == [] and m.latest() is None
        m.save(1, state(11))
    assert mem.list_dir("/mem/run/run_1") == ["step_1", "step_2"]
    assert same(unickpt.load("/mem/run/run_1/step_2", storage=mem), state(2))
    assert same(unickpt.load("/mem/run/step_1", storage=mem), state(11))


def test_stale_temp_of_dead_writer_removed(mem):
    mem.make_dirs(ROOT)
    dead = temp_name(f"{ROOT}/step_5").rsplit(".", 2)[0] + ".999999999.abcd1234"
    mem.make_dirs(dead)
    with unickpt.CheckpointManager(ROOT, storage=mem) as m:
        m.resolve_start()
    assert mem.list_dir(ROOT) == []
