"""CheckpointManager: where a run starts, when it saves, what it keeps.

The manager wires the pure policy (:mod:`unickpt.policy`) to the format, the storage and the
adapters.  See docs/manager.md for every rule.

>>> import tempfile, numpy as np, unickpt
>>> root = tempfile.mkdtemp()
>>> with unickpt.CheckpointManager(root, keep_last=2) as mgr:
...     r = mgr.restore({"w": np.zeros(3), "step": 0})
...     for step in range(r.step + 1, 4):
...         _ = mgr.save(step, {"w": np.full(3, float(step)), "step": step})
>>> [c.step for c in unickpt.CheckpointManager(root).checkpoints()]
[2, 3]
>>> with unickpt.CheckpointManager(root) as mgr:
...     r = mgr.restore({"w": np.zeros(3), "step": 0})
>>> r.resumed, r.step, r.state["w"].tolist()
(True, 3, [3.0, 3.0, 3.0])
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

from ..dist import detect as _detect_coordinator  # multi-process: docs/distributed.md
from ..dist.save import collective_save
from ..errors import (
    CheckpointExistsError,
    ConfigError,
    ManagerClosedError,
    UnickptError,
)
from ..format import checksum
from ..format.commit import commit_checkpoint, prepare
from ..format.reader import is_committed
from ..format.writer import WriteStats, plain_data
from ..policy import (
    ManagerConfig,
    format_step,
    make_config,
    retain,
    should_save,
    to_delete,
)
from ..state import to_tree
from ..storage import Storage, storage_for
from . import multiprocess
from .background import BackgroundSaver
from .preemption import Preemption
from .records import (
    CheckpointInfo,
    Restored,
    StartDecision,
    checkpoint_info,
    plain_metrics,
)
from .run_root import RunRoot
from .start import StartMixin

__all__ = ["CheckpointManager", "StartDecision", "Restored", "CheckpointInfo"]

log = logging.getLogger("unickpt")


class CheckpointManager(StartMixin):
    """Resume, save on a schedule, keep what the retention rules say.

    Args:
        root: the run root; checkpoints are ``ROOT/step_<N>``.
        config: a :class:`unickpt.ManagerConfig` holding the options below.
        storage: where bytes live (default: the local filesystem, or the object store a
            URL root such as ``s3://bucket/run`` names; see docs/storage.md).
        storage_options: options of the URL root's fsspec filesystem (``endpoint_url``...).
        **options: the short form of ``config`` (not both): see :class:`unickpt.policy.ManagerConfig` (``resume``, ``on_existing``,
            ``enabled``, ``save_every``, ``save_every_seconds``, ``keep_last``,
            ``keep_every``, ``keep_best``, ``best_metric``, ``best_mode``, ``async_save``,
            ``stale_temp_seconds``, ``verify``, ``preemption``, ``preemption_signals``,
            ``preemption_grace_seconds``, ``preemption_check_every_steps``,
            ``preemption_check_every_seconds``, ``incremental``).  They are validated here,
            before any I/O; a bad value raises :class:`~unickpt.ConfigError` saying what is allowed.

    The first call that needs the root (``resolve_start``, ``restore`` or ``save``) creates
    it, takes its writer lock (a second manager on the same root gets
    :class:`~unickpt.LockedError`), removes provably stale leftovers and applies the start
    decision.  ``checkpoints()`` and ``latest()`` only look.

    Several processes (``torchrun``): every rank creates the manager and calls ``restore``,
    ``save`` and ``resolve_start`` (collectives).  The coordinator is detected from an
    initialized ``torch.distributed`` (more than one process), or given as
    ``coordinator=`` (a :class:`unickpt.dist.Coordinator`) or ``process_group=``;
    ``dist_timeout`` (seconds, default 600) bounds every wait.  See docs/distributed.md.
    """

    def __init__(self, root: str | os.PathLike, *, config: ManagerConfig | None = None,
                 storage: Storage | None = None, storage_options: dict | None = None,
                 coordinator: Any = None, process_group: Any = None,
                 dist_timeout: float | None = None,
                 **options: Any):
        self.config = _config(config, options)
        if not isinstance(root, (str, os.PathLike)) or not os.fspath(root):
            raise ConfigError(f"root={root!r} is not allowed; give a directory path")
        self.run_root = RunRoot(root, storage or storage_for(root, storage_options))
        self.root = self.run_root.path
        self.storage: Storage = self.run_root.storage
        # --- multi-process: who this process is among the job's ranks (1 when alone)
        self.coordinator = _detect_coordinator(coordinator, process_group, dist_timeout)
        self._mutex = threading.RLock()  # root mutations: foreground vs background thread
        self._decision: StartDecision | None = None
        self._steps: set[int] = set()
        self._metrics: dict[int, dict] = {}
        self._resumed_step: int | None = None
        self._last_saved_step: int | None = None
        self._last_save_time = time.monotonic()
        self._closed = False
        self._saver = BackgroundSaver(self.root) if self.config.async_save else None
        # --- preemption hook (unickpt/manager/preemption.py): handlers installed here
        self._preemption = _preemption(self.config, self.root, self.coordinator)
        # A manager dropped without close() must not keep its root locked for the rest of
        # the process (notebooks re-create managers); the finalizer holds only the lock.
        weakref.finalize(self, self.run_root.release)
        if self._preemption is not None:  # --- preemption hook: handlers back on drop too
            weakref.finalize(self, self._preemption.close)

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception as e:  # do not mask the body's exception
            warnings.warn(f"unickpt: closing the manager of {self.root} also failed: {e}",
                          RuntimeWarning, stacklevel=2)

    def __repr__(self) -> str:
        return f"CheckpointManager({self.root!r}, {self.config})"

    # ------------------------------------------------------------------ save
    def save(self, step: int, state: Any, *, metrics: Mapping[str, Any] | None = None,
             metadata: Mapping[str, Any] | None = None, force: bool = False) -> bool:
        """Save ``state`` as ``step`` if the schedule says so; True when it wrote (or, with
        ``async_save``, started writing) a checkpoint.

        Saving a step that is already saved is a no-op (False), even with ``force``.  With
        ``async_save=True`` this returns after a host snapshot of ``state``; a second save
        first waits for the previous one.  An earlier background failure is raised here as
        :class:`~unickpt.BackgroundSaveError`.
        """
        self._check_open()
        if not self.config.enabled:
            return False
        self._background(wait=False)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigError(f"save(step={step!r}): a step is a non-negative int")
        checksum.require(f"saving into {self.root}")
        self.resolve_start()
        cfg = self.config
        # --- preemption hook: a (rank-agreed) stop signal forces this save
        pre = self._preemption
        preempt = pre is not None and pre.due(step)
        force = force or preempt
        now = time.monotonic()
        with self._mutex:
            # the newest committed step, or the one in flight (an async save not yet done)
            in_flight = {self._last_saved_step} if self._last_saved_step is not None else set()
            newest = max(self._steps | in_flight, default=None)
            decision = should_save(step, save_every=cfg.save_every,
                                   save_every_seconds=cfg.save_every_seconds, force=force,
                                   now=now, last_save_time=self._last_save_time,
                                   last_saved_step=self._last_saved_step, existing=self._steps)
        if self.coordinator.world_size > 1 and cfg.save_every_seconds is not None:
            # a time-based schedule: clocks differ per rank, so rank 0's answer counts
            self._background(wait=True)  # its collectives must not interleave with this one
            go = self.coordinator.broadcast(f"save {format_step(step)}: schedule",
                                            bool(decision.save))
            decision = dataclasses.replace(decision, save=go)
        if not decision.save:
            if pre is not None and preempt:  # already saved (or in flight): wait for it
                pre.finish(self.wait, step)
            return False
        if newest is not None and step < newest:
            raise ConfigError(
                f"save(step={step}): {self.root} already has the newer {format_step(newest)}; "
                "steps must increase (resume from it, or use on_existing='archive' with "
                "resume='never' to start over)")
        clean_metrics = plain_metrics(metrics, step)
        # checked and copied now: the caller may change its dict while an async save runs
        clean_metadata = plain_data(dict(metadata or {}), "metadata")
        final = self.run_root.step_path(step)
        # Not committed by us (else it would be in _steps): never write into it.  A checkpoint
        # whose manifest is damaged (skipped by auto-resume) is set aside, never deleted.
        if self.storage.exists(final):
            with self._mutex:
                aside = self.run_root.set_aside_damaged(step)
            if aside is None:
                raise CheckpointExistsError(
                    f"save(step={step}): {final} exists but is not a committed checkpoint "
                    "(left by another tool?); move or delete it, unickpt never writes into it")
            warnings.warn(f"unickpt: {final} has a damaged manifest; it was moved to {aside} "
                          f"(kept for inspection) and step {step} is saved anew",
                          UserWarning, stacklevel=2)
        t0 = time.perf_counter()
        if self._saver is not None:
            self._background(wait=True)  # at most one save in flight: its snapshot is freed first
            t0 = time.perf_counter()
            prepared = self._prepare(state, step, snapshot=True)  # in the caller's thread
            self._last_saved_step, self._last_save_time = step, now
            self._saver.submit(lambda: self._write(step, prepared, clean_metrics,
                                                   clean_metadata, t0), format_step(step))
        else:
            prepared = self._prepare(state, step)
            self._write(step, prepared, clean_metrics, clean_metadata, t0)
            self._last_saved_step, self._last_save_time = step, now
        if pre is not None and preempt:  # --- preemption hook: committed (async flushed)
            pre.finish(self.wait, step)  # before preempted=True
        return True

    def _prepare(self, state: Any, step: int, *, snapshot: bool = False) -> Any:
        """The state as a validated, flattened tree (every leaf checked before any I/O)."""
        try:
            with collective_save(self.coordinator.world_size > 1):  # arrays spanning processes
                tree, kinds = to_tree(state, snapshot=snapshot)
            return prepare(tree, kinds)
        except Exception as e:
            if self.coordinator.world_size > 1:  # the other ranks must not wait for this one
                multiprocess.abort_save(self, step, e)
            raise

    def _info(self, step: int, metrics: dict, t0: float, stats: WriteStats) -> dict:
        return checkpoint_info(step, metrics, time.perf_counter() - t0, stats,
                               async_save=self.config.async_save,
                               resumed_from=self._resumed_step,
                               retention=self.config.retention_options())

    def _write(self, step: int, prepared: Any, metrics: dict, metadata: dict,
               t0: float) -> None:
        name = format_step(step)
        final = self.run_root.step_path(step)
        recorded: dict = {}

        def info(stats: WriteStats) -> dict:
            recorded.update(self._info(step, metrics, t0, stats))
            return recorded

        if self.coordinator.world_size > 1:  # every rank writes its part; rank 0 commits
            recorded = multiprocess.write(self, step, final, prepared, metrics, metadata,
                                          lambda stats: self._info(step, metrics, t0, stats),
                                          lambda: self._record_commit(step, name, final,
                                                                      metrics))
            self._log_saved(final, t0, recorded, metrics)
            return
        try:
            commit_checkpoint(self.storage, final, prepared, metadata=metadata, info=info,
                              publish_guard=lambda: self._mutex,
                              incremental=self.config.incremental,
                              previous=self._previous(step))
        except OSError as e:  # disk full, quota, I/O error: say which save and what is left
            # The step was free when the save started and the lock keeps others out: a
            # committed ``final`` now is ours (the publish happened, a later step failed).
            try:
                committed = is_committed(final, self.storage)
            except OSError:  # the store itself is unreachable: the same failure, before publish
                committed = False
            if not committed:
                raise OSError(e.errno, f"{e.strerror or e} while saving {final}: nothing was "
                                       "committed and earlier checkpoints are intact") from e
            with self._mutex:
                self._steps.add(step)
                self._metrics[step] = metrics
            raise _after_commit(e, final, "making the commit durable (fsync of the run "
                                "root)", "it may not survive a power loss") from e
        with self._mutex:
            self._record_commit(step, name, final, metrics)
        self._log_saved(final, t0, recorded, metrics)

    def _record_commit(self, step: int, name: str, final: str, metrics: dict) -> None:
        """Record the new step, point ``latest`` at it, apply retention (mutex held)."""
        self._steps.add(step)
        self._metrics[step] = metrics
        if step == max(self._steps):
            try:
                self.run_root.write_pointer(name)
            except OSError as e:  # the pointer is informational: readers scan
                log.warning("unickpt: %s is committed but the latest pointer could not "
                            "be updated: %s", final, e)
        try:
            self._apply_retention()
        except OSError as e:
            raise _after_commit(e, final, "retention (deleting older checkpoints)",
                                "older checkpoints may be kept until the next save") from e

    def _log_saved(self, final: str, t0: float, recorded: dict, metrics: dict) -> None:
        total = time.perf_counter() - t0
        if self._preemption is not None:  # --- preemption hook: the grace budget's figures
            self._preemption.record_save(total)
        nbytes = recorded.get("nbytes", 0)
        written = recorded.get("written_bytes", nbytes)
        shared = (f" ({written / 1e6:.1f} MB written, {(nbytes - written) / 1e6:.1f} MB "
                  "shared with the previous checkpoint)" if written < nbytes else "")
        log.info("unickpt: saved %s: %.1f MB%s in %.2fs (%.1f MB/s)%s", final, nbytes / 1e6,
                 shared, total, nbytes / 1e6 / total if total > 0 else math.inf,
                 f", metrics {metrics}" if metrics else "")

    def _previous(self, step: int) -> str | None:
        """The checkpoint an incremental save of ``step`` shares unchanged files with: the
        newest committed one of this root before it (None: write everything)."""
        if not self.config.incremental:
            return None
        with self._mutex:
            older = [s for s in self._steps if s < step]
        return self.run_root.step_path(max(older)) if older else None

    def _metrics_of(self, step: int) -> dict:
        if step not in self._metrics:
            info = self.run_root.read_info(step)
            self._metrics[step] = dict((info or {}).get("metrics") or {})
        return self._metrics[step]

    def _apply_retention(self) -> None:
        cfg = self.config
        if not cfg.has_retention:
            return
        steps = sorted(self._steps)
        metrics = {s: self._metrics_of(s) for s in steps} if cfg.keep_best else {}
        # The resumed-from checkpoint is protected only until a newer one is committed: then
        # the run can resume from that one, and keep_last=N means N again.
        resumed = self._resumed_step
        protected = (resumed,) if resumed is not None and resumed >= steps[-1] else ()
        kept = retain(steps, metrics, keep_last=cfg.keep_last, keep_every=cfg.keep_every,
                      keep_best=cfg.keep_best, best_metric=cfg.best_metric,
                      best_mode=cfg.best_mode, protected=protected)
        doomed = to_delete(kept)
        if not doomed:
            return
        self.run_root.delete(doomed)  # trash first: a crash never leaves half a step_N
        for s in doomed:
            self._steps.discard(s)
            self._metrics.pop(s, None)

    # ------------------------------------------------------------------ background
    def _background(self, *, wait: bool) -> None:
        """Wait for (or only poll) the background save; its failure is raised here, and the
        step it was writing is forgotten (the schedule counts from the newest committed)."""
        if self._saver is None:
            return
        try:
            self._saver.wait() if wait else self._saver.poll()
        except UnickptError:
            with self._mutex:
                self._last_saved_step = max(self._steps) if self._steps else None
            raise

    def wait(self) -> None:
        """Block until the background save (if any) is committed; raise its error."""
        self._background(wait=True)

    def close(self) -> None:
        """Flush pending work, then release the root's lock.  Raises a background error."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self.run_root.release()
            if self._preemption is not None:  # --- preemption hook: previous handlers back
                self._preemption.close()

    @property
    def preempted(self) -> bool:
        """True once a preemption signal was seen and its save is committed: stop the loop
        (``if mgr.preempted: break``).  Always False without ``preemption=True``."""
        return self._preemption is not None and self._preemption.preempted

    def _check_open(self) -> None:
        if self._closed:
            raise ManagerClosedError(f"the CheckpointManager of {self.root} is closed; "
                                     "create a new one")

    # ------------------------------------------------------------------ lookups
    def checkpoints(self) -> list[CheckpointInfo]:
        """The committed checkpoints of the root, oldest first (no side effects)."""
        return self.run_root.checkpoints()

    def latest(self) -> CheckpointInfo | None:
        """The newest committed checkpoint, or None (no side effects)."""
        return self.run_root.latest()


class _PreemptionGather:
    """The job's coordinator seen as the one collective the preemption agreement needs."""

    def __init__(self, coordinator: Any):
        self.coordinator = coordinator
        self.world_size = coordinator.world_size

    def all_gather(self, obj: Any, timeout: float) -> list[Any]:
        return self.coordinator.all_gather("preemption: agree on the stop flag", obj,
                                           timeout=timeout)


def _preemption(cfg: ManagerConfig, root: str, coordinator: Any) -> Preemption | None:
    """The preemption watcher of ``preemption=True`` (handlers installed), else None.

    With several processes the ranks agree on the flag through the job's coordinator."""
    if not (cfg.preemption and cfg.enabled):
        return None
    gather = _PreemptionGather(coordinator) if coordinator.world_size > 1 else None
    return Preemption(cfg.preemption_signals or (), cfg.preemption_grace_seconds, root,
                      coordinator=gather, every_steps=cfg.preemption_check_every_steps,
                      every_seconds=cfg.preemption_check_every_seconds)


class CommittedButFailedError(OSError):
    """An I/O failure *after* a checkpoint was published (internal: an ``OSError`` for
    callers).  ``committed`` is the checkpoint's path: it is complete and resumable."""

    committed: str = ""


def _after_commit(e: OSError, final: str, what: str, consequence: str) -> OSError:
    err = CommittedButFailedError(
        e.errno, f"{final} was committed (complete, it will be resumed), but {what} then "
                 f"failed: {e.strerror or e}; {consequence}")
    err.committed = final
    return err


def _config(config: ManagerConfig | None, options: dict[str, Any]) -> ManagerConfig:
    """The manager's config: ``config=`` or the keyword short form, not both."""
    if config is None:
        return make_config(options)
    if options:
        raise ConfigError(f"CheckpointManager(config=..., {', '.join(sorted(options))}=...): "
                          "give the options either as a ManagerConfig or as keywords, not both "
                          "(dataclasses.replace(config, ...) changes a config)")
    if not isinstance(config, ManagerConfig):
        raise ConfigError(f"config={config!r} is not allowed; give a unickpt.ManagerConfig")
    return config
