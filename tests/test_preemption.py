"""Save on a scheduler's stop signal, end to end: a real trainer process gets a real SIGTERM.

The trainer (tests/_preempt_trainer.py) saves on a schedule of every 5 steps and runs the
documented loop (``if mgr.preempted: break``).  It runs in lockstep with the test (it waits
for a line on stdin after each step), so the signal lands at an exact step.  Every child runs
in a session of its own, under a deadline, and is SIGKILLed with its process group on the way
out.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(__file__))
from _preempt_trainer import SAVE_EVERY, reference  # noqa: E402

from unickpt import CheckpointManager  # noqa: E402

TRAINER = os.path.join(os.path.dirname(__file__), "_preempt_trainer.py")
TOTAL = 14
EXAMPLES = int(os.environ.get("UNICKPT_PREEMPT_EXAMPLES", "3"))
TIMEOUT = 60.0


class Child:
    """One trainer process, read line by line under a deadline."""

    def __init__(self, root: str, **cfg: object):
        cfg = {"root": root, "total": TOTAL, **cfg}
        self.proc = subprocess.Popen(
            [sys.executable, TRAINER, json.dumps(cfg)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            env=dict(os.environ))
        self.deadline = time.monotonic() + TIMEOUT
        self.lines: list[str] = []
        self._buf = b""

    def readline(self) -> str:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = self.deadline - time.monotonic()
            assert left > 0, f"trainer timed out; output so far: {self.lines}"
            if select.select([fd], [], [], min(left, 1.0))[0]:
                chunk = os.read(fd, 4096)
                if not chunk:
                    line, self._buf = self._buf.decode(), b""
                    self.lines.append(line)
                    return line
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\n", 1)
        self.lines.append(raw.decode())
        return self.lines[-1]

    def until(self, prefix: str) -> str:
        while True:
            line = self.readline()
            if line.startswith(prefix):
                return line
            assert line, f"trainer ended before {prefix!r}: {self.lines}"

    def go(self) -> None:
        self.proc.stdin.write(b"\n")
        self.proc.stdin.flush()

    def finish(self) -> tuple[int, list[str]]:
        """Let it run to its end (answering lockstep prompts); its exit code and lines."""
        while True:
            line = self.readline()
            if not line:
                break
            if line.startswith("step "):
                try:
                    self.go()
                except BrokenPipeError:
                    pass
        left = max(0.1, self.deadline - time.monotonic())
        return self.proc.wait(timeout=left), self.lines

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=TIMEOUT)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except BrokenPipeError:  # an unread "go" line left in the buffer
                pass


def run(root: str, *, signal_at: int | None = None, **cfg: object) -> tuple[int, list[str]]:
    """Run the trainer; with ``signal_at``, SIGTERM it just before its save of that step."""
    child = Child(root, lockstep=signal_at is not None, **cfg)
    try:
        if signal_at is not None:
            for step in range(1, signal_at + 1):
                assert child.until("step ") == f"step {step}"
                if step == signal_at:
                    os.kill(child.proc.pid, signal.SIGTERM)
                child.go()
        return child.finish()
    finally:
        child.kill()


def final(lines: list[str]) -> dict:
    return json.loads([ln for ln in lines if ln.startswith("{")][-1])


def steps_of(root: str) -> list[int]:
    return [c.step for c in CheckpointManager(root).checkpoints()]


def check_preempted_then_resume(root: str, k: int, **cfg: object) -> list[str]:
    rc, lines = run(root, signal_at=k, **cfg)
    assert rc == 0, lines
    pre = [ln for ln in lines if ln.startswith("preempted")]
    assert pre and pre[0].startswith(f"preempted {k} "), lines  # saved within one step: k
    assert final(lines)["step"] == k
    assert max(steps_of(root)) == k  # committed before the loop broke
    rc, lines2 = run(root, **{c: v for c, v in cfg.items() if c == "async"})
    assert rc == 0, lines2
    assert lines2[0] == f"step {k + 1}", lines2  # resumed at k, no step lost
    assert final(lines2) == reference(TOTAL)  # bitwise: weights and generator state
    return pre


@settings(max_examples=EXAMPLES, deadline=None)
@given(k=st.integers(1, TOTAL - 1))
def test_sigterm_at_a_random_step_saves_it_exits_0_and_resumes_bitwise(k: int) -> None:
    with tempfile.TemporaryDirectory() as root:
        check_preempted_then_resume(root, k)


@settings(max_examples=EXAMPLES, deadline=None)
@given(j=st.integers(1, (TOTAL - 2) // SAVE_EVERY))
def test_sigterm_with_an_async_save_in_flight(j: int) -> None:
    k = j * SAVE_EVERY + 1  # the scheduled save of the step before is still being written
    with tempfile.TemporaryDirectory() as root:
        pre = check_preempted_then_resume(root, k, **{"async": True, "slow": 0.5})
        assert "inflight=1" in pre[0], pre


@pytest.mark.parametrize("async_", [False, True])
def test_a_second_sigterm_during_the_preemption_save(async_: bool) -> None:
    with tempfile.TemporaryDirectory() as root:
        pre = check_preempted_then_resume(root, 7, resignal=True, **{"async": async_})
        assert pre[0].endswith("signals=2"), pre  # both seen, one save, nothing re-entered


def test_sigkill_after_the_grace_period_leaves_the_previous_checkpoint() -> None:
    with tempfile.TemporaryDirectory() as root:
        child = Child(root, lockstep=True, hang=True, grace=0.2)
        try:
            for step in range(1, 8):
                assert child.until("step ") == f"step {step}"
                if step == 7:
                    os.kill(child.proc.pid, signal.SIGTERM)
                child.go()
            assert child.until("hanging") == "hanging step_7"
            time.sleep(0.2)  # the grace period runs out mid-save
            os.killpg(child.proc.pid, signal.SIGKILL)
            assert child.proc.wait(timeout=TIMEOUT) == -signal.SIGKILL
        finally:
            child.kill()
        assert steps_of(root) == [5]
        rc, lines = run(root)
        assert rc == 0 and lines[0] == "step 6", lines  # resumed from step 5
        assert final(lines) == reference(TOTAL)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_save_the_same_step_when_only_rank_1_is_signalled() -> None:
    pytest.importorskip("torch")
    with tempfile.TemporaryDirectory() as root:
        def ranks(**cfg: object) -> list[Child]:
            port = _free_port()
            return [Child(root, check_steps=3,  # one run root: one checkpoint per step
                          dist={"rank": r, "world": 2, "port": port}, **cfg) for r in range(2)]

        children = ranks(lockstep=6)  # then free-running: the ranks meet in collectives
        try:
            for step in range(1, 7):
                for c in children:
                    assert c.until("step ") == f"step {step}"
                if step == 6:
                    os.kill(children[1].proc.pid, signal.SIGTERM)  # rank 1 only
                for c in children:
                    c.go()
            outs = [c.finish() for c in children]
        finally:
            for c in children:
                c.kill()
        for rc, lines in outs:
            assert rc == 0, lines
            # agreement checks at steps 1, 4, 7: both ranks save step 7 and stop there
            assert [ln for ln in lines if ln.startswith("preempted")][0].startswith(
                "preempted 7 "), lines
            assert final(lines)["step"] == 7
        assert max(steps_of(root)) == 7
        children = ranks()
        try:
            outs = [c.finish() for c in children]
        finally:
            for c in children:
                c.kill()
        for rc, lines in outs:
            assert rc == 0 and lines[0] == "step 8", lines
            assert final(lines) == reference(TOTAL)
