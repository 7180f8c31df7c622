"""The writer lock across fork and exec (issue 18 rows 3 and 15), durable new roots (row 11)
and async snapshots of sharded arrays (row 2)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import unickpt
from unickpt import CheckpointManager, LockedError

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    + os.environ.get("PYTHONPATH", "").split(os.pathsep))}


def _run(code: str, timeout: float = 60) -> str:
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 0, err
    return out


@pytest.mark.parametrize("how", ["sys.exit", "close", "close+exit", "os._exit"])
def test_forked_child_does_not_release_the_parents_lock(tmp_path, how):
    out = _run(f"""
        import os, sys, numpy as np, unickpt
        m = unickpt.CheckpointManager({str(tmp_path)!r})
        m.save(1, {{"x": np.ones(2)}})
        pid = os.fork()
        if pid == 0:
            how = {how!r}
            if "close" in how:
                m.close()
            if how == "os._exit":
                os._exit(0)
            sys.exit(0)
        os.waitpid(pid, 0)
        try:
            unickpt.CheckpointManager({str(tmp_path)!r}).resolve_start()
            print("second manager got in")
        except unickpt.LockedError:
            print("locked")
        m.save(2, {{"x": np.ones(2)}})
        m.close()
        unickpt.CheckpointManager({str(tmp_path)!r}).resolve_start()
        print("free after close")
    """)
    assert out.split() == ["locked", "free", "after", "close"]


def test_forked_helper_outliving_a_killed_job_keeps_no_lock(tmp_path):
    code = textwrap.dedent(f"""
        import os, sys, time, unickpt
        m = unickpt.CheckpointManager({str(tmp_path)!r})
        m.resolve_start()
        pid = os.fork()
        if pid == 0:  # a data-loader-like helper that outlives its parent
            print("helper up", flush=True)  # after the fork hooks ran
            time.sleep(60)
            os._exit(0)
        print(pid, flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        lines = sorted(p.stdout.readline().strip() for _ in range(2))
        helper = int(lines[0])
        assert lines[1] == "helper up"
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        os.kill(helper, 0)  # the helper is still alive
        with CheckpointManager(tmp_path) as m:  # and the restart is not locked out
            assert m.save(1, {"x": np.ones(2)})
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        p.stdout.close()


def test_lock_descriptor_is_not_inherited_by_spawned_programs(tmp_path):
    with CheckpointManager(tmp_path) as m:
        m.resolve_start()
        fd = m.run_root._lock._fd
        assert fd is not None and not os.get_inheritable(fd)
        p = subprocess.run([sys.executable, "-c", f"import os; os.fstat({fd})"],
                           capture_output=True, close_fds=False, timeout=60)
        assert p.returncode != 0  # the child has no such descriptor
    with pytest.raises(LockedError):  # sanity: a held lock does exclude
        with CheckpointManager(tmp_path) as a, CheckpointManager(tmp_path) as b:
            a.resolve_start()
            b.resolve_start()


def test_async_save_snapshots_a_sharded_array(tmp_path):
    a = np.arange(8.0).reshape(2, 4)
    left, right = a[:, :2].copy(), a[:, 2:].copy()
    sharded = unickpt.ShardedArray((2, 4), a.dtype, [unickpt.Piece(((0, 2), (0, 2)), left),
                                                     unickpt.Piece(((0, 2), (2, 4)), right)])
    with CheckpointManager(tmp_path, async_save=True) as m:
        gate = __import__("threading").Event()
        real = m._write

        def slow(*args):  # the background write starts only after the edit below
            gate.wait(30)
            real(*args)
        m._write = slow
        m.save(1, {"s": sharded})
        left[:] = -1.0
        right[:] = -2.0
        gate.set()
        m.wait()
    got = unickpt.load(tmp_path / "step_1")["s"]
    assert np.asarray(got).tobytes() == a.tobytes()
    assert unickpt.verify(tmp_path / "step_1").ok
