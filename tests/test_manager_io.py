"""CheckpointManager I/O behaviour: writer lock, stale temp cleanup, async saves, factory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import unickpt
from unickpt import BackgroundSaveError, CheckpointManager, ConfigError, LockedError
from unickpt.storage import LocalStorage, host_tag

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    + os.environ.get("PYTHONPATH", "").split(os.pathsep))}


def big_state(seed: int, mb: int = 4) -> dict:
    rng = np.random.default_rng(seed)
    n = mb * (1 << 20) // 4
    return {"w": rng.standard_normal(n, dtype=np.float32),
            "layers": [rng.integers(0, 2**31, 1000, dtype=np.int64) for _ in range(3)],
            "half": rng.standard_normal(300).astype(np.float16), "step": seed,
            "name": f"s{seed}"}


# ---------------------------------------------------------------- lock
def test_second_manager_fails_fast(tmp_path):
    a = CheckpointManager(tmp_path)
    a.save(1, {"x": np.ones(2)})
    b = CheckpointManager(tmp_path)
    t0 = time.monotonic()
    with pytest.raises(LockedError, match=rf"locked by another CheckpointManager \(pid="
                                          rf"{os.getpid()} host="):
        b.save(2, {"x": np.ones(2)})
    assert time.monotonic() - t0 < 1.0
    assert [c.step for c in b.checkpoints()] == [1]  # lookups need no lock
    a.close()
    assert b.save(2, {"x": np.ones(2)}) is True  # the lock is free again
    b.close()


def test_lock_held_by_another_process(tmp_path):
    code = textwrap.dedent(f"""
        import sys, numpy as np, unickpt
        m = unickpt.CheckpointManager({str(tmp_path)!r})
        m.resolve_start()
        print("ready", flush=True)
        sys.stdin.readline()
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert p.stdout.readline().strip() == "ready"
        with pytest.raises(LockedError, match=f"pid={p.pid} "):
            CheckpointManager(tmp_path).resolve_start()
    finally:
        p.communicate("\n", timeout=30)
    with CheckpointManager(tmp_path) as m:  # released when the process ended
        m.resolve_start()


# ---------------------------------------------------------------- stale temps
def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_rule(tmp_path):
    host = host_tag()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        entries = {
            f".unickpt-tmp.step_3.{host}.{dead_pid()}.aaaa0001": "removed",  # dead writer
            f".unickpt-tmp.step_4.{host}.{sleeper.pid}.aaaa0002": "kept",  # live writer
            f".unickpt-tmp.step_5.{host}.{os.getpid()}.aaaa0003": "kept",  # this process
            ".unickpt-tmp.step_6.otherhost.1.aaaa0004": "kept",  # cannot check: recent
            ".unickpt-tmp.step_7.otherhost.1.aaaa0005": "old",  # cannot check: old
            ".unickpt-tmp.garbage": "kept",
            ".unickpt-trash.step_1.aaaa0006": "removed",  # interrupted retention
        }
        for name, fate in entries.items():
            os.mkdir(tmp_path / name)
            (tmp_path / name / "arrays.safetensors").write_bytes(b"x")
            if fate == "old":
                old = time.time() - 7200
                os.utime(tmp_path / name, (old, old))
        with CheckpointManager(tmp_path, stale_temp_seconds=3600) as m:
            assert m.checkpoints() == []  # temps are never listed
            m.resolve_start()
        left = set(os.listdir(tmp_path)) - {".unickpt.lock"}
        assert left == {n for n, f in entries.items() if f == "kept"}
    finally:
        sleeper.kill()
        sleeper.wait()


def test_no_cleanup_without_the_lock(tmp_path):
    name = f".unickpt-tmp.step_3.{host_tag()}.{dead_pid()}.aaaa0001"
    os.mkdir(tmp_path / name)
    with CheckpointManager(tmp_path) as m:
        m.resolve_start()
        other = CheckpointManager(tmp_path)
        os.mkdir(tmp_path / (name + "x"))
        with pytest.raises(LockedError):
            other.resolve_start()
        assert os.path.isdir(tmp_path / (name + "x"))  # the refused manager touched nothing
    assert not os.path.exists(tmp_path / name)


# ---------------------------------------------------------------- async
def test_async_results_bit_equal_to_sync(tmp_path):
    for mode in (False, True):
        with CheckpointManager(tmp_path / str(mode), async_save=mode, keep_last=2) as m:
            for s in range(1, 5):
                st = big_state(s)
                assert m.save(s, st, metrics={"loss": float(s)}) is True
                st["w"][:] = -1.0  # mutate right away: the snapshot must not see it
                st["layers"][0][:] = 0
    for s in (3, 4):
        a = (tmp_path / "False" / f"step_{s}" / "arrays.safetensors").read_bytes()
        b = (tmp_path / "True" / f"step_{s}" / "arrays.safetensors").read_bytes()
        assert a == b
        la, lb = (unickpt.load(tmp_path / d / f"step_{s}") for d in ("False", "True"))
        assert la["w"].tobytes() == big_state(s)["w"].tobytes() == lb["w"].tobytes()
        assert la["name"] == lb["name"] == f"s{s}"
    assert sorted(os.listdir(tmp_path / "True")) == [".unickpt.lock", "latest", "step_3",
                                                     "step_4"]
    assert unickpt.inspect(tmp_path / "True" / "step_4").info["async"] is True


class FailingStorage(LocalStorage):
    def __init__(self, fail_on: str, gate: threading.Event | None = None):
        self.fail_on, self.gate = fail_on, gate

    def commit(self, temp, final, *, replace=False):
        if self.gate is not None:
            self.gate.wait(30)
        if os.path.basename(final) == self.fail_on:
            raise OSError(28, "No space left on device", final)
        super().commit(temp, final, replace=replace)


@pytest.mark.parametrize("surface", ["save", "wait", "close"])
def test_background_failure_reported_and_nothing_committed(tmp_path, surface):
    m = CheckpointManager(tmp_path, async_save=True, storage=FailingStorage("step_2"))
    assert m.save(1, big_state(1)) is True
    assert m.save(2, big_state(2)) is True  # returns before the failure happens
    with pytest.raises(BackgroundSaveError, match="step_2.*No space left.*not committed") as ei:
        if surface == "save":  # raised whether save 2 already failed or is still running
            m.save(3, big_state(3))
        elif surface == "wait":
            m.wait()
        else:
            m.close()
    assert isinstance(ei.value.__cause__, OSError)
    assert sorted(os.listdir(tmp_path)) == [".unickpt.lock", "latest", "step_1"]
    assert (tmp_path / "latest").read_text() == "step_1\n"
    m.close()  # the error was reported once; closing again is clean
    assert unickpt.load(tmp_path / "step_1")["step"] == 1


def test_failed_async_step_can_be_saved_again(tmp_path):
    storage = FailingStorage("step_2")
    with CheckpointManager(tmp_path, async_save=True, storage=storage) as m:
        m.save(2, big_state(2))
        with pytest.raises(BackgroundSaveError):
            m.wait()
        storage.fail_on = None
        assert m.save(2, big_state(2)) is True  # not mistaken for "already saved"
    assert unickpt.load(tmp_path / "step_2")["step"] == 2


def test_second_save_waits_for_the_first(tmp_path):
    gate = threading.Event()
    m = CheckpointManager(tmp_path, async_save=True, storage=FailingStorage("", gate))
    t0 = time.monotonic()
    m.save(1, big_state(1))
    assert time.monotonic() - t0 < 10 and not os.path.exists(tmp_path / "step_1")
    done = threading.Event()
    th = threading.Thread(target=lambda: (m.save(2, big_state(2)), done.set()))
    th.start()
    assert not done.wait(0.3)  # blocked behind save 1
    gate.set()
    th.join(30)
    assert done.is_set()
    m.close()
    assert [c.step for c in unickpt.CheckpointManager(tmp_path).checkpoints()] == [1, 2]


EXIT_SCRIPT = """
import sys, numpy as np, unickpt
from unickpt.storage import LocalStorage

class Slow(LocalStorage):
    def commit(self, temp, final, *, replace=False):
        import time; time.sleep(0.5)
        if sys.argv[2] == "fail":
            raise OSError(5, "Input/output error", final)
        super().commit(temp, final, replace=replace)

m = unickpt.CheckpointManager(sys.argv[1], async_save=True, storage=Slow())
m.save(7, {"w": np.arange(1 << 20, dtype=np.float32)})
print("returned", flush=True)
# exit without wait()/close(): the exit hook must flush (or warn)
"""


@pytest.mark.parametrize("outcome", ["ok", "fail"])
def test_exit_flushes_pending_save(tmp_path, outcome):
    p = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(tmp_path), outcome],
                       capture_output=True, text=True, env=ENV, timeout=60)
    assert p.stdout.strip() == "returned"
    if outcome == "ok":
        assert p.returncode == 0, p.stderr
        assert unickpt.verify(tmp_path / "step_7").ok
        assert unickpt.load(tmp_path / "step_7")["w"][-1] == (1 << 20) - 1
    else:
        assert "RuntimeWarning: unickpt: at exit, background save step_7" in p.stderr
        assert "Input/output error" in p.stderr
        assert not os.path.exists(tmp_path / "step_7")
        assert [n for n in os.listdir(tmp_path) if n.startswith(".unickpt-tmp")] == []


# ---------------------------------------------------------------- factory
class MyManager(CheckpointManager):
    pass


class NotAManager:
    def __init__(self, root, **opts):
        pass

    def save(self, step, state):
        return True


def test_create_manager_by_class_and_path(tmp_path):
    m = unickpt.create_manager(MyManager, tmp_path, keep_last=1)
    assert type(m) is MyManager and m.config.keep_last == 1
    assert isinstance(m, unickpt.ManagerProtocol)
    m2 = unickpt.create_manager("tests.test_manager_io:MyManager", tmp_path / "b")
    assert type(m2).__name__ == "MyManager"
    m3 = unickpt.create_manager("unickpt.manager.CheckpointManager", tmp_path / "c")
    assert type(m3) is CheckpointManager


@pytest.mark.parametrize("spec, msg, cause", [
    ("nonexistent_pkg_xyz:M", "module 'nonexistent_pkg_xyz' not found", ModuleNotFoundError),
    ("unickpt:Nope", "module 'unickpt' has no attribute 'Nope'", AttributeError),
    ("unickpt:__version__", "is a str, not a class", TypeError),
    ("tests.test_manager_io:NotAManager", "does not implement unickpt.ManagerProtocol: "
     "missing resolve_start, restore, checkpoints, latest, wait, close", TypeError),
    ("nocolon", "expected 'package.module:ClassName'", type(None)),
])
def test_create_manager_errors(tmp_path, spec, msg, cause):
    with pytest.raises(ConfigError, match=msg) as ei:
        unickpt.create_manager(spec, tmp_path)
    assert isinstance(ei.value.__cause__, cause)


# ---------------------------------------------------------------- the example
EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "examples", "numpy_resume.py")


def test_example_killed_and_resumed_matches_uninterrupted_run(tmp_path):
    def run(root, *extra):
        return subprocess.run([sys.executable, EXAMPLE, str(root), *extra],
                              capture_output=True, text=True, env=ENV, timeout=120)

    crashed = run(tmp_path / "a", "--crash-at", "37")
    assert crashed.returncode == -9 and "crashing at step 37" in crashed.stdout
    resumed = run(tmp_path / "a")
    assert resumed.returncode == 0, resumed.stderr
    assert "start: step 30" in resumed.stdout
    clean = run(tmp_path / "b")
    assert "start: step 0" in clean.stdout
    digest = [ln for ln in clean.stdout.splitlines() if ln.startswith("done:")]
    assert digest and digest == [ln for ln in resumed.stdout.splitlines()
                                 if ln.startswith("done:")]


def test_dropped_manager_releases_its_lock(tmp_path):
    m = CheckpointManager(tmp_path)
    m.resolve_start()
    del m  # no close(): the lock must not outlive the object
    with CheckpointManager(tmp_path) as m2:
        m2.resolve_start()


class FullDisk(LocalStorage):
    def __init__(self, fail: str):
        self.fail = fail

    def commit(self, temp, final, *, replace=False):
        if self.fail == "commit":
            raise OSError(28, "No space left on device")
        super().commit(temp, final, replace=replace)

    def write_atomic(self, path, data):
        if self.fail == "pointer":
            raise OSError(122, "Disk quota exceeded")
        super().write_atomic(path, data)


def test_disk_full_during_save_is_reported_with_the_step(tmp_path):
    storage = FullDisk("")
    with CheckpointManager(tmp_path, storage=storage, keep_last=1) as m:
        m.save(1, big_state(1, mb=1))
        storage.fail = "commit"
        with pytest.raises(OSError, match="No space left on device while saving .*step_2: "
                                          "nothing was committed") as ei:
            m.save(2, big_state(2, mb=1))
        assert ei.value.errno == 28
        storage.fail = "pointer"
        assert m.save(3, big_state(3, mb=1)) is True  # committed; the pointer is advisory
    assert sorted(n for n in os.listdir(tmp_path) if not n.startswith(".unickpt.")) == \
        ["latest", "step_3"]
    assert (tmp_path / "latest").read_text() == "step_1\n"  # stale, and the scan wins
    assert CheckpointManager(tmp_path).latest().step == 3


def test_async_step_order_and_metadata_snapshot(tmp_path):
    meta = {"tags": ["a"]}
    with CheckpointManager(tmp_path, async_save=True) as m:
        m.save(10, big_state(10, mb=1), metadata=meta)
        meta["tags"].append("changed later")
        with pytest.raises(ConfigError, match="already has the newer step_10"):
            m.save(5, big_state(5, mb=1))  # step 10 may still be in flight: still refused
    assert unickpt.inspect(tmp_path / "step_10").metadata == {"tags": ["a"]}


def test_external_resume_does_not_constrain_new_steps(tmp_path):
    with CheckpointManager(tmp_path / "pre") as m:
        m.save(7000, {"w": np.ones(2)})
    with CheckpointManager(tmp_path / "ft", resume=str(tmp_path / "pre" / "step_7000")) as m:
        r = m.restore({"w": np.zeros(2)})
        assert r.step == 7000 and r.state["w"].tolist() == [1.0, 1.0]
        assert m.save(1, r.state) is True  # fine-tuning counts its own steps


def test_create_manager_module_with_missing_dependency(tmp_path, monkeypatch):
    (tmp_path / "needs_dep_zz.py").write_text("import not_installed_dep_zz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="importing 'needs_dep_zz' failed: it needs "
                                          "'not_installed_dep_zz'") as ei:
        unickpt.create_manager("needs_dep_zz:Manager", tmp_path / "run")
    assert isinstance(ei.value.__cause__, ModuleNotFoundError)
