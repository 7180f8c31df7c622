"""Check a multi-process trainer (torchrun-style ranks) with assert_resume_deterministic.

:func:`multiprocess_train` turns a *rank function* into the ``train(root, total_steps,
stop_at=None)`` callable that :func:`~unickpt.testing.assert_resume_deterministic` drives.
Each call launches ``world_size`` fresh processes, as ``torchrun`` would: every rank gets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and a free
``MASTER_PORT`` in its environment and runs::

    def rank_main(root, total_steps, stop_at=None):
        torch.distributed.init_process_group("gloo")   # env:// from the variables above
        ...  # the same training loop every rank runs, with a CheckpointManager on root
        return final_state                               # this rank's: params, RNG, ...

Given ``stop_at``, every rank returns right after that step without saving (like a crash of
the whole job).  The ranks run in one new process group under a hard ``timeout``; a rank
that fails or a job that hangs kills the whole group and raises :class:`JobFailedError` with
the tail of every rank's output.  The final state of a call is ``{"rank_0": ..., "rank_1":
...}``, so the check compares every rank's state (per-rank RNG included) with the
uninterrupted run's.  The rank function is given by dotted path (``"pkg.mod:fn"``): the
ranks are new processes that import it.

``hard_kill`` is not available for a job: interruptions are the ranks' own ``stop_at``
returns.  To SIGKILL a whole job mid-save, see docs/distributed.md (testing section).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from ..errors import UnickptError
from .hardkill import child_env, resolve_target

__all__ = ["multiprocess_train", "run_job", "JobFailedError", "ProcessGroup"]


class JobFailedError(UnickptError, RuntimeError):
    """A rank of a launched job failed, or the job did not finish within its timeout."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: str, n: int = 3000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


class ProcessGroup:
    """Processes started in one new process group; leaving the ``with`` SIGKILLs the group.

    A job's processes may hang on each other forever (a collective waiting for a dead rank),
    so whoever launches them must be able to end all of them at once, children included.

    >>> with ProcessGroup() as g:
    ...     p = g.start([sys.executable, "-c", "import time; time.sleep(60)"])
    >>> p.returncode == -signal.SIGKILL
    True
    """

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.pgid = 0

    def start(self, argv: list[str], **popen: Any) -> subprocess.Popen:
        """``subprocess.Popen(argv, **popen)`` in the group (the first one founds it)."""
        p = subprocess.Popen(argv, process_group=self.pgid, **popen)
        self.pgid = self.pgid or p.pid
        self.procs.append(p)
        return p

    def kill(self) -> None:
        """SIGKILL every process of the group (those already gone are fine)."""
        if self.pgid:
            try:
                os.killpg(self.pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:  # unkillable (D state): do not hang the caller
                pass
            if p.stdout:
                p.stdout.close()


def run_job(target: str, world_size: int, root: str | os.PathLike, total_steps: int,
            stop_at: int | None = None, *, timeout: float = 300.0) -> dict[str, Any]:
    """Run ``target(root, total_steps, stop_at)`` on ``world_size`` ranks; their states.

    Returns ``{"rank_0": state, ...}`` (each rank's return value, saved and loaded back
    through unickpt).  Raises :class:`JobFailedError` if a rank exits non-zero or the job
    outlives ``timeout`` seconds (every rank is then SIGKILLed).
    """
    resolve_target(target)  # a bad path fails here, not in every rank
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    from ..api import load

    work = tempfile.mkdtemp(prefix="unickpt-job-")
    base = {**child_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
            "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size)}
    args = json.dumps([target, os.fspath(root), total_steps, stop_at, work])
    logs = [os.path.join(work, f"rank{r}.log") for r in range(world_size)]
    try:
        with ProcessGroup() as group:  # a hung or failed job: every rank killed
            for rank in range(world_size):
                with open(logs[rank], "wb") as log:
                    group.start([sys.executable, "-m", "unickpt.testing.multiprocess", args],
                                env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                stdout=log, stderr=subprocess.STDOUT)
            procs = group.procs
            deadline = time.monotonic() + timeout
            codes = [p.poll() for p in procs]
            # wait for every rank; stop at the first failure (the others may wait on it forever)
            while None in codes and time.monotonic() < deadline and \
                    all(c in (None, 0) for c in codes):
                time.sleep(0.05)
                codes = [p.poll() for p in procs]
            if codes != [0] * world_size:
                why = ("failed" if any(c not in (None, 0) for c in codes)
                       else f"did not finish within {timeout:g}s")
                outs = "\n".join(f"--- rank {r} (exit {c}):\n{_tail(logs[r])}"
                                 for r, c in enumerate(codes))
                raise JobFailedError(
                    f"job {target} on {world_size} ranks (root {os.fspath(root)}, "
                    f"stop_at={stop_at}) {why}: exit codes {codes} (None: still running, "
                    f"killed). Output:\n{outs}")
            return {f"rank_{r}": load(os.path.join(work, f"rank{r}")) for r in range(world_size)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def multiprocess_train(target: str, world_size: int, *,
                       timeout: float = 300.0) -> Callable[..., dict[str, Any]]:
    """A ``train`` callable for assert_resume_deterministic that runs a job of ranks.

    >>> train = multiprocess_train("mypkg.train:rank_main", world_size=2)
    >>> train.__name__
    'rank_main x2'

    Then ``assert_resume_deterministic(train, 6, interruptions=[3])`` launches the job
    uninterrupted, then stopped after step 3 and resumed, and compares every rank's final
    state bit for bit.
    """
    def train(root: str, total_steps: int, stop_at: int | None = None) -> dict[str, Any]:
        return run_job(target, world_size, root, total_steps, stop_at, timeout=timeout)

    train.__name__ = f"{target.rpartition(':')[2] or target} x{world_size}"
    return train


def _rank_main() -> None:
    from ..api import save

    target, root, total_steps, stop_at, work = json.loads(sys.argv[1])
    fn = resolve_target(target)
    state = fn(root, total_steps, stop_at=stop_at)
    save(os.path.join(work, f"rank{os.environ['RANK']}"), state)


if __name__ == "__main__":
    _rank_main()
