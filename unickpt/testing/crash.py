"""Crash and disk-full injection at every I/O call of a save, retention, archive or overwrite.

A scenario's I/O runs in a forked child whose file-system calls (``open``, ``write``,
``pwrite``, ``pwritev``, ``ftruncate``, ``fsync``, ``mkdir``, ``rename``, ``replace``,
``unlink``, ``rmdir`` and the atomic exchange of the local storage) are counted.  At call
``k`` the child either dies on the spot (``os._exit(137)``: no ``finally``, no ``atexit``,
as after SIGKILL or a power cut of the process) or gets ``OSError(ENOSPC)`` (disk full).
A first run without injection counts the calls; ``k`` then ranges over all of them (or a
fixed-seed sample, see :func:`crash_points`).  After each injected run the parent
relaunches, as a user would, and checks the scenario's promise:

* the restart resumes the last step whose ``save()`` returned, or a newer attempted one,
  bitwise equal to what was saved;
* nothing is left behind for ever (no temp, trash or staging entry survives the restart);
* an archive never splits the old run over two ``run_<K>`` directories; an overwrite never
  loses the checkpoint (the old or the new copy is there, complete).

>>> from unickpt.testing.crash import sweep_isolated
>>> import tempfile
>>> report = sweep_isolated("save", tempfile.mkdtemp(), points=3)
>>> report.points, report.failures
(3, [])

(:func:`sweep` runs in the calling process; :func:`sweep_isolated` in a fresh interpreter,
which a process running threads, such as one that imported JAX, needs: fork and threads do
not mix.)

Third-party storage backends run the same scenarios with ``storage=`` (a factory).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import select
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["OPS", "CrashScenario", "CrashOutcome", "SweepReport", "SCENARIOS", "inject",
           "count_calls", "run_injected", "crash_points", "sweep", "state_for",
           "default_points", "sweep_isolated"]

OPS = ("open", "write", "pwrite", "pwritev", "ftruncate", "fsync", "mkdir", "rename",
       "replace", "unlink", "rmdir")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT
CHILD_TIMEOUT = 60.0


def default_points(fallback: int) -> int | None:
    """``UNICKPT_CRASH_POINTS`` (``all`` or a number) or ``fallback``; None means all."""
    v = os.environ.get("UNICKPT_CRASH_POINTS", "").strip().lower()
    if v == "all":
        return None
    return int(v) if v.isdigit() else fallback


# ------------------------------------------------------------------ the injector
class _Counter:
    def __init__(self, at: int | None, mode: str, report: Callable[[str], None]):
        self.n, self.at, self.mode, self.report = 0, at, mode, report
        self.lock = threading.Lock()

    def hit(self, op: str, args: tuple) -> None:
        with self.lock:
            self.n += 1
            n = self.n
        if n != self.at:
            return
        what = f"{op}{_short(args)}"
        if self.mode == "kill":
            self.report(f"crash {n} {what}")
            os._exit(137)
        self.report(f"enospc {n} {what}")
        raise OSError(errno.ENOSPC, "No space left on device (injected)")


def _short(args: tuple) -> str:
    parts = []
    for a in args[:2]:
        s = os.path.basename(a) if isinstance(a, str) else (
            f"<{len(a)} bytes>" if isinstance(a, (bytes, memoryview)) else repr(a))
        parts.append(s[:60])
    return "(" + ", ".join(parts) + ")"


@contextlib.contextmanager
def inject(at: int | None = None, *, mode: str = "kill",
           report: Callable[[str], None] = lambda _m: None,
           exchange: bool = True) -> Iterator[_Counter]:
    """Count the file-system calls made inside the block; fail call ``at`` (1-based).

    ``mode="kill"`` exits the process at that call (use only in a child process);
    ``mode="enospc"`` raises ``OSError(ENOSPC)`` from it (only calls that can fill a disk
    are counted then: writes, creating opens, ``mkdir``, renames, ``fsync``).
    ``exchange=False`` makes the local storage behave as on a filesystem without atomic
    exchange (overwrite by two renames).
    """
    import shutil  # noqa: F401  (rmtree looks os.unlink/os.rmdir up at call time)

    from ..storage import local

    counter = _Counter(at, mode, report)
    saved = {op: getattr(os, op) for op in OPS}
    real_exchange = local._exchange

    def wrap(op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kw: Any) -> Any:
            if mode == "enospc" and (op in ("unlink", "rmdir") or (
                    op == "open" and not (args[1] if len(args) > 1 else kw.get("flags", 0))
                    & _WRITE_FLAGS)):
                return fn(*args, **kw)
            counter.hit(op, args)
            return fn(*args, **kw)
        return counted

    def exchange_fn(a: str, b: str) -> bool:
        counter.hit("exchange", (a, b))
        return real_exchange(a, b) if exchange else False

    try:
        for op, fn in saved.items():
            setattr(os, op, wrap(op, fn))
        local._exchange = exchange_fn
        yield counter
    finally:
        for op, fn in saved.items():
            setattr(os, op, fn)
        local._exchange = real_exchange


# ------------------------------------------------------------------ scenarios
def state_for(step: int, seed: int = 0) -> dict:
    """The deterministic state saved at ``step`` (bitwise comparable after a restart)."""
    rng = np.random.default_rng(seed * 100_003 + step)
    return {"w": rng.standard_normal(2048).astype(np.float32),
            "layers": [rng.integers(0, 1 << 40, 64, dtype=np.int64) for _ in range(2)],
            "half": rng.standard_normal(33).astype(np.float16),
            "step": step, "tag": f"s{step}-{seed}"}


@dataclass(frozen=True)
class CrashScenario:
    """One interrupted operation and the promise checked after it.

    Attributes:
        name: how reports name it.
        setup: ``setup(root, storage)`` prepares the root in the parent (not counted).
        run: ``run(root, storage, done)`` is the counted I/O; it calls ``done(step)`` once
            the save of ``step`` has returned (is durable).
        check: ``check(root, storage, outcome)`` relaunches and raises AssertionError
            saying what broke.
        exchange: False to run as on a filesystem without atomic exchange.
    """

    name: str
    setup: Callable[[str, Any], None]
    run: Callable[[str, Any, Callable[[int], None]], None]
    check: Callable[[str, Any, CrashOutcome], None]
    exchange: bool = True


@dataclass
class CrashOutcome:
    """What one injected run did: the call it failed (``at``, ``op``), the steps whose save
    returned, whether it was killed, the error it raised (disk full)."""

    at: int | None
    mode: str
    done: list[int] = field(default_factory=list)
    killed: bool = False
    op: str = ""
    error: str = ""
    calls: int = 0

    def describe(self) -> str:
        how = "killed" if self.killed else ("failed with " + self.error if self.error
                                           else "finished")
        return (f"{self.mode} at call {self.at} ({self.op or '-'}): {how}; saves returned "
                f"for steps {self.done}")


def _manager(root: str, storage: Any, **kw: Any) -> Any:
    from ..manager import CheckpointManager
    return CheckpointManager(root, storage=storage, **kw)


def _fill(root: str, storage: Any, steps: range, seed: int = 0, **kw: Any) -> None:
    with _manager(root, storage, **kw) as m:
        for s in steps:
            m.save(s, state_for(s, seed))


def _assert_state(got: Any, step: int, seeds: tuple[int, ...], where: str) -> int:
    from .compare import diff_trees
    for seed in seeds:
        if not diff_trees(got, state_for(step, seed)):
            return seed
    raise AssertionError(f"{where}: restored data of step {step} matches no saved state")


def _assert_clean(root: str, storage: Any, where: str) -> None:
    from ..manager import RunRoot
    from ..storage import ARCHIVE_PREFIX
    listing = RunRoot(root, storage).scan()
    left = [*listing.temps, *listing.trash, *listing.uncommitted,
            *(n for n in listing.other if n.startswith(ARCHIVE_PREFIX) or ".damaged-" in n)]
    assert not left, f"{where}: leftovers after the restart: {left}"


def _resume_check(kw: dict, seeds: tuple[int, ...] = (0,)) -> Callable[..., None]:
    def check(root: str, storage: Any, out: CrashOutcome) -> None:
        where = out.describe()
        last = max(out.done, default=0)
        with _manager(root, storage, **kw) as m:
            r = m.restore(state_for(0, seeds[0]))
            assert r.step >= last, f"{where}: resumed step {r.step}, older than {last}"
            if r.resumed:
                _assert_state(r.state, r.step, seeds, where)
            _assert_clean(root, storage, where)
            m.save(r.step + 1, state_for(r.step + 1, seeds[0]))  # the run goes on
        _assert_clean(root, storage, where)
        with _manager(root, storage, **kw) as m:
            assert m.restore(state_for(0)).step == r.step + 1
    return check


def _save_run(**kw: Any) -> Callable[..., None]:
    def run(root: str, storage: Any, done: Callable[[int], None]) -> None:
        with _manager(root, storage, **kw) as m:
            r = m.restore(state_for(0))
            pending = None
            for s in range(r.step + 1, r.step + 4):
                m.save(s, state_for(s))
                if kw.get("async_save"):  # returned = durable only once the next one started
                    if pending is not None:
                        done(pending)
                    pending = s
                else:
                    done(s)
            m.wait()
            if pending is not None:
                done(pending)
    return run


def _archive_setup(root: str, storage: Any) -> None:
    _fill(root, storage, range(1, 4), seed=0)


def _archive_run(root: str, storage: Any, done: Callable[[int], None]) -> None:
    with _manager(root, storage, resume="never", keep_last=2) as m:
        for s in (1, 2):
            m.save(s, state_for(s, 1))
            done(s)


def _archive_check(root: str, storage: Any, out: CrashOutcome) -> None:
    from .. import load
    where = out.describe()
    pointer = os.path.join(root, "latest")
    if os.path.exists(pointer):  # latest never names a step already moved
        with open(pointer) as f:
            named = f.read().strip()
        assert os.path.exists(os.path.join(root, named, "manifest.msgpack")), (
            f"{where}: latest names {named}, which is not in the root")
    with _manager(root, storage, resume="never") as m:  # the same relaunch
        m.resolve_start()
        _assert_clean(root, storage, where)
    holders = []
    for name in sorted(os.listdir(root)):
        if name.startswith("run_"):
            steps = sorted(n for n in os.listdir(os.path.join(root, name))
                           if n.startswith("step_"))
            old = [n for n in steps if _seed_of(load(os.path.join(root, name, n))) == 0]
            if old:
                holders.append((name, old))
    assert len(holders) == 1 and holders[0][1] == ["step_1", "step_2", "step_3"], (
        f"{where}: the old run is split or incomplete: {holders}")
    assert not [n for n in os.listdir(root) if n.startswith("step_")], (
        f"{where}: checkpoints left in the root after archiving")


def _seed_of(tree: Any) -> int | None:
    tag = tree.get("tag") if isinstance(tree, dict) else None
    return int(tag.rsplit("-", 1)[1]) if isinstance(tag, str) else None


def _overwrite_run(root: str, storage: Any, done: Callable[[int], None]) -> None:
    from .. import save
    save(os.path.join(root, "step_3"), state_for(3, 2), overwrite=True)
    done(3)


def _overwrite_check(root: str, storage: Any, out: CrashOutcome) -> None:
    where = out.describe()
    with _manager(root, storage) as m:
        r = m.restore(state_for(0))
        assert r.step == 3, f"{where}: resumed step {r.step}: the overwritten step_3 is lost"
        seed = _assert_state(r.state, 3, (0, 2), where)
        assert not out.done or seed == 2, f"{where}: overwrite returned but the old copy is back"
        _assert_clean(root, storage, where)


def _scenarios() -> dict[str, CrashScenario]:
    none = lambda root, storage: None  # noqa: E731
    three = lambda root, storage: _fill(root, storage, range(1, 4))  # noqa: E731
    return {s.name: s for s in [
        CrashScenario("save", none, _save_run(), _resume_check({})),
        CrashScenario("async_save", none, _save_run(async_save=True), _resume_check({})),
        CrashScenario("retention", three, _save_run(keep_last=1),
                      _resume_check({"keep_last": 1})),
        CrashScenario("async_retention", three, _save_run(keep_last=1, async_save=True),
                      _resume_check({"keep_last": 1})),
        CrashScenario("archive", _archive_setup, _archive_run, _archive_check),
        CrashScenario("overwrite", three, _overwrite_run, _overwrite_check),
        CrashScenario("overwrite_no_exchange", three, _overwrite_run, _overwrite_check,
                      exchange=False),
    ]}


SCENARIOS: dict[str, CrashScenario] = _scenarios()


# ------------------------------------------------------------------ running
def run_injected(scenario: CrashScenario, root: str, at: int | None, *, mode: str = "kill",
                 storage: Callable[[], Any] | None = None,
                 timeout: float = CHILD_TIMEOUT) -> CrashOutcome:
    """Run ``scenario.run`` in a forked child, failing call ``at``; what happened."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.close(r)
            write = os.write

            def report(msg: str) -> None:
                write(w, (msg.replace("\n", " ") + "\n").encode())

            st = storage() if storage else None
            with inject(at, mode=mode, report=report, exchange=scenario.exchange) as c:
                try:
                    scenario.run(root, st, lambda s: report(f"done {s}"))
                except Exception as e:  # noqa: BLE001 - disk full: reported, then checked
                    report(f"error {type(e).__name__}: {e}")
                report(f"calls {c.n}")
        except BaseException:  # noqa: BLE001
            with contextlib.suppress(BaseException):
                os.write(w, ("fatal " + traceback.format_exc().replace("\n", " | ") + "\n")
                         .encode())
            code = 3
        os._exit(code)
    os.close(w)
    out = CrashOutcome(at, mode)
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{scenario.name}: child timed out at call {at}")
            ready, _, _ = select.select([r], [], [], left)
            if not ready:
                continue
            chunk = os.read(r, 65536)
            if not chunk:
                break
            buf += chunk
    finally:
        os.close(r)
        if time.monotonic() >= deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    for line in buf.decode(errors="replace").splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "done":
            out.done.append(int(rest))
        elif kind in ("crash", "enospc"):
            out.op = rest.partition(" ")[2]
            out.killed = kind == "crash"
        elif kind == "error":
            out.error = rest
        elif kind == "calls":
            out.calls = int(rest)
        elif kind == "fatal":
            raise AssertionError(f"{scenario.name}: the child failed: {rest}")
    code = os.waitstatus_to_exitcode(status)
    if out.killed != (code == 137):
        raise AssertionError(f"{scenario.name}: child exit {code} at call {at}: {buf!r}")
    return out


def count_calls(scenario: CrashScenario, root: str, *, mode: str = "kill",
                storage: Callable[[], Any] | None = None) -> int:
    """How many counted calls ``scenario`` makes (on a fresh root)."""
    scenario.setup(root, storage() if storage else None)
    out = run_injected(scenario, root, None, mode=mode, storage=storage)
    if out.error:
        raise AssertionError(f"{scenario.name}: fails without injection: {out.error}")
    return out.calls


def crash_points(total: int, points: int | None, seed: int = 0) -> list[int]:
    """Calls to fail: all of ``1..total`` (``points=None``) or a fixed-seed sample that
    always includes the first and the last call."""
    every = list(range(1, total + 1))
    if points is None or points >= total:
        return every
    rng = random.Random(seed)
    inner = rng.sample(every[1:-1], max(0, points - 2)) if total > 2 else []
    return sorted({1, total, *inner})


@dataclass
class SweepReport:
    """The result of :func:`sweep`: how many calls the scenario makes, how many points were
    injected, the outcomes (killed / raised / finished) and the failed checks."""

    scenario: str
    mode: str
    calls: int = 0
    points: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def sweep(scenario: CrashScenario, workdir: str, *, mode: str = "kill",
          points: int | None = None, seed: int = 0,
          storage: Callable[[], Any] | None = None) -> SweepReport:
    """Inject at each chosen call of ``scenario`` (``points``: None = every call) on a fresh
    root under ``workdir`` each time, relaunch and check; collect failures, do not stop."""
    import shutil
    rep = SweepReport(scenario.name, mode)
    rep.calls = count_calls(scenario, os.path.join(workdir, "count"), mode=mode,
                            storage=storage)
    for k in crash_points(rep.calls, points, seed):
        root = os.path.join(workdir, f"{scenario.name}-{mode}-{k}")
        scenario.setup(root, storage() if storage else None)
        out = run_injected(scenario, root, k, mode=mode, storage=storage)
        kind = "killed" if out.killed else ("raised" if out.error else "finished")
        rep.outcomes[kind] = rep.outcomes.get(kind, 0) + 1
        rep.points += 1
        if mode == "enospc" and out.error:
            rep.failures.extend(_check_enospc_error(root, out))
        try:
            scenario.check(root, storage() if storage else None, out)
        except AssertionError as e:
            rep.failures.append(str(e))
        except Exception as e:  # noqa: BLE001 - a restart that raises is a failure too
            rep.failures.append(f"{out.describe()}: restart raised {type(e).__name__}: {e}")
        shutil.rmtree(root, ignore_errors=True)
    return rep


def _check_enospc_error(root: str, out: CrashOutcome) -> list[str]:
    """A disk-full error must name its cause, and what it says about the checkpoint
    (committed or not) must be true."""
    import re

    from ..manager import RunRoot
    where = out.describe()
    if "No space left" not in out.error:
        return [f"{where}: the error hides the cause (disk full)"]
    m = re.search(r"step_(\d+)", out.error)
    if m is None:
        return []
    step, steps = int(m.group(1)), RunRoot(root).scan().steps
    if ("nothing was committed" in out.error or "was not committed" in out.error) \
            and step in steps:
        return [f"{where}: the error says step_{step} was not committed, but it is"]
    if "was committed" in out.error and "nothing was committed" not in out.error \
            and step not in steps:
        return [f"{where}: the error says step_{step} was committed, but it is not"]
    return []


def sweep_isolated(name: str, workdir: str, *, mode: str = "kill", points: int | None = None,
                   seed: int = 0, timeout: float = 600.0) -> SweepReport:
    """:func:`sweep` of the built-in scenario ``name`` in a fresh interpreter.

    Forking a process that runs threads (JAX, torch, a thread pool) can deadlock the child;
    a fresh interpreter has none, so test suites run sweeps through this.
    """
    import json
    import subprocess
    import sys
    code = ("import json, logging, sys; logging.disable(logging.WARNING); "
            "from unickpt.testing.crash import SCENARIOS, sweep; "
            f"r = sweep(SCENARIOS[{name!r}], {workdir!r}, mode={mode!r}, points={points!r}, "
            f"seed={seed!r}); print(json.dumps(r.__dict__))")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
    if p.returncode != 0:
        raise AssertionError(f"crash sweep {name} ({mode}) failed to run: {err[-2000:]}")
    return SweepReport(**json.loads(out.strip().splitlines()[-1]))
