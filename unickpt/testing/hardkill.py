"""Hard-kill interruptions: run a trainer in a subprocess and SIGKILL it at a chosen moment.

The user's trainer knows nothing about this.  The child process imports the trainer by its
dotted path and, before calling it, wraps the commit step of unickpt's local storage (every
checkpoint, whether written by ``unickpt.save`` or by a ``CheckpointManager``, is committed
there by renaming its temporary directory to ``step_<N>``).  When the first checkpoint of a
step ``>= N`` is about to be committed (``"mid_save"``: its temporary directory is fully
written, nothing renamed), is being written (``"torn_write"``: the first write into its data
file has put only half of its bytes on disk: a torn file inside the temporary directory) or
has just been committed (``"after_save"``: before retention and the ``latest`` pointer), the
child reports the moment through a pipe and freezes that thread;
the parent then kills the whole process with ``SIGKILL``.  The moment is therefore exact and
reproducible, and the kill is a real one: no ``finally`` block, ``atexit`` hook or buffered
write of the child runs.

Killing anywhere between two saves leaves the disk exactly as killing right after the earlier
save does (a training step writes nothing but checkpoints), so these two moments cover every
crash point that matters for what a resume sees.
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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["MOMENTS", "KillOutcome", "run_and_kill", "resolve_target", "dotted_path_of"]

MOMENTS = ("after_save", "mid_save", "torn_write")
_CHILD = "from unickpt.testing.hardkill import _child_main; _child_main()"
_FREEZE_SECONDS = 600  # a frozen child whose parent died exits by itself after this


@dataclass(frozen=True)
class KillOutcome:
    """What happened to one hard-killed run.

    Attributes:
        killed: True if the child was SIGKILLed (False: it finished before the kill point).
        step: the step of the checkpoint at which it was killed (None if not killed).
        moment: ``"after_save"`` or ``"mid_save"``.
    """

    killed: bool
    step: int | None
    moment: str

    def describe(self, stop: int) -> str:
        if not self.killed:
            return (f"hard kill planned at the first save of a step >= {stop}, but the run "
                    "finished before one")
        if self.moment == "mid_save":
            return (f"SIGKILL while step_{self.step} was being saved (temporary directory "
                    "written, not yet committed)")
        if self.moment == "torn_write":
            return (f"SIGKILL in the middle of a write into step_{self.step}'s data file "
                    "(torn temporary directory)")
        return f"SIGKILL right after step_{self.step} was committed"


def resolve_target(target: str) -> Callable[..., Any]:
    """Import ``"package.module:function"`` (``"package.module.function"`` also works)."""
    import importlib

    if ":" in target:
        mod_name, _, attr = target.partition(":")
    else:
        mod_name, _, attr = target.rpartition(".")
    if not mod_name or not attr:
        raise ValueError(f"train {target!r} is not a dotted path such as 'mypkg.train:train'")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {mod_name!r} of train {target!r}: {e}") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"module {mod_name!r} has no attribute {attr!r} "
                             f"(train {target!r})") from None
    if not callable(obj):
        raise ValueError(f"train {target!r} is not callable")
    return obj


def dotted_path_of(fn: Callable[..., Any]) -> str:
    """The ``"module:qualname"`` a subprocess can import ``fn`` by, or raise ValueError."""
    mod = getattr(fn, "__module__", None)
    qual = getattr(fn, "__qualname__", None)
    if not mod or not qual or mod == "__main__" or "<" in qual:
        raise ValueError(
            f"hard_kill needs a train function a subprocess can import, got {fn!r}; define it "
            "at module level in an importable module and pass it (or 'module:function')")
    return f"{mod}:{qual}"


def child_env() -> dict[str, str]:
    """This environment, with this process's import path (a child imports what we import)."""
    env = dict(os.environ)
    # The child must import what this process imports: the test's directory (added to
    # sys.path by pytest), editable installs, the user's package.
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def run_and_kill(target: str, root: str, total_steps: int, stop: int, moment: str, *,
                 timeout: float = 300.0) -> KillOutcome:
    """Run ``train(root, total_steps)`` in a child and SIGKILL it at the first save >= ``stop``.

    Raises ``RuntimeError`` (with the child's output) if the child fails on its own or does
    not reach the kill point within ``timeout`` seconds.
    """
    if moment not in MOMENTS:
        raise ValueError(f"hard-kill moment {moment!r}: expected one of {MOMENTS}")
    r, w = os.pipe()
    args = json.dumps({"target": target, "root": os.fspath(root), "total_steps": total_steps,
                       "stop": stop, "moment": moment, "fd": w, "frameworks": _frameworks()})
    with tempfile.TemporaryFile() as out:
        # A session of its own: the kill takes the child's own children (data-loader
        # workers...) with it, as a crash of the machine or the job would.
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, args], pass_fds=(w,),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=child_env(), start_new_session=True)
        os.close(w)
        event: dict | None = None
        buf = b""
        deadline = time.monotonic() + timeout
        try:
            while event is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    _kill(proc)
                    raise RuntimeError(
                        f"hard-kill run of {target} did not reach the save of a step >= {stop} "
                        f"within {timeout:.0f} s; output:\n{_tail(out)}")
                ready, _, _ = select.select([r], [], [], min(left, 1.0))
                if not ready:
                    continue
                chunk = os.read(r, 4096)
                if not chunk:  # the child exited (or closed the pipe) without a kill event
                    break
                buf += chunk
                if b"\n" in buf:
                    event = json.loads(buf.split(b"\n", 1)[0])
            if event is not None:
                _kill(proc)
                return KillOutcome(True, int(event["step"]), moment)
            rc = proc.wait()
            if rc != 0:
                raise RuntimeError(f"hard-kill run of {target} failed on its own (exit code "
                                   f"{rc}) before the kill point; output:\n{_tail(out)}")
            return KillOutcome(False, None, moment)
        finally:
            os.close(r)
            if proc.poll() is None:
                _kill(proc)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group and reap the child."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # already gone
        pass
    proc.wait()


def _frameworks() -> list[str]:
    """Framework modules to import in the child: those of the adapters loaded here that have
    a global RNG (``capture_rng()`` is not None), so that ``unickpt.RNG()`` captures the same
    generators in the child as in this process, where the resumed run happens.  Frameworks
    without a global RNG (JAX) are left to the trainer to import: they cost seconds."""
    from ..adapters import loaded_adapters, plugins

    with_rng = {a.name for a in loaded_adapters() if a.capture_rng() is not None}
    return sorted({m for p in plugins() if p.name in with_rng for m in p.modules
                   if m in sys.modules})


def _tail(f: Any, n: int = 4000) -> str:
    f.flush()
    f.seek(0)
    data = f.read()
    return data[-n:].decode("utf-8", "replace")


def _child_main() -> None:
    """Entry point of the child process (see the module docstring)."""
    import threading

    from unickpt.policy import TEMP_PREFIX, parse_step
    from unickpt.storage import LocalStorage

    cfg = json.loads(sys.argv[1])
    fd, stop, moment = cfg["fd"], cfg["stop"], cfg["moment"]
    lock = threading.Lock()
    original = LocalStorage.commit

    def freeze(step: int | None) -> None:
        with lock:  # one report even if several saver threads get here
            os.write(fd, (json.dumps({"step": -1 if step is None else step}) + "\n").encode())
        time.sleep(_FREEZE_SECONDS)  # the parent SIGKILLs us during this sleep
        os._exit(3)

    def due(step: int | None) -> bool:
        return step is not None and step >= stop

    def commit(self: Any, temp: str, final: str, *, replace: bool = False) -> None:
        step = parse_step(os.path.basename(os.path.normpath(final)))
        if moment == "mid_save" and due(step):
            freeze(step)
        original(self, temp, final, replace=replace)
        if moment == "after_save" and due(step):
            freeze(step)

    if moment == "torn_write":
        _tear_writes(TEMP_PREFIX, parse_step, due, freeze)
    LocalStorage.commit = commit  # type: ignore[method-assign]
    # Import the frameworks the parent process has imported, so unickpt.RNG() captures the
    # same set of global generators here as in the parent, where the resumed run happens.
    import importlib

    from unickpt.adapters import loaded_adapters

    for name in cfg["frameworks"]:
        importlib.import_module(name)
    loaded_adapters()
    train = resolve_target(cfg["target"])
    train(cfg["root"], cfg["total_steps"])
    os.close(fd)


def _tear_writes(temp_prefix: str, parse_step: Callable[[str], int | None],
                 due: Callable[[int | None], bool], freeze: Callable[[int | None], None]) -> None:
    """Wrap ``os.pwrite``/``os.pwritev``/``os.write``: the first write into a file of a due
    step's temporary directory puts half its bytes on disk, then the process freezes."""

    def step_of(fd: int) -> int | None:
        try:
            d = os.path.basename(os.path.dirname(os.readlink(f"/proc/self/fd/{fd}")))
        except OSError:
            return None
        if not d.startswith(temp_prefix):
            return None
        return parse_step(d[len(temp_prefix):].split(".", 1)[0])

    orig_pwrite, orig_write = os.pwrite, os.write
    orig_pwritev = getattr(os, "pwritev", None)

    def pwrite(f: int, data: Any, offset: int) -> int:
        step = step_of(f) if offset > 0 else None  # offset 0: the header; tear array bytes
        if due(step):
            mv = memoryview(data).cast("B")
            orig_pwrite(f, mv[: max(1, len(mv) // 2)], offset)
            freeze(step)
        return orig_pwrite(f, data, offset)

    def pwritev(f: int, buffers: Any, offset: int, *a: Any) -> int:
        step = step_of(f) if offset > 0 else None
        if due(step):
            pwrite(f, list(buffers)[0], offset)
        assert orig_pwritev is not None
        return orig_pwritev(f, buffers, offset, *a)

    def write(f: int, data: Any) -> int:
        step = step_of(f)
        if due(step):
            mv = memoryview(data).cast("B")
            orig_write(f, mv[: max(1, len(mv) // 2)])
            freeze(step)
        return orig_write(f, data)

    os.pwrite = pwrite
    os.write = write
    if orig_pwritev is not None:
        os.pwritev = pwritev
