"""Where a run starts: the start decision (resume, cold start, archive) and the restore of
its checkpoint into the caller's state.

:class:`StartMixin` holds the :class:`~unickpt.manager.CheckpointManager` methods of the
start (``resolve_start``, ``restore``); the manager's state they read and set is declared
below and created by the manager's ``__init__``.  See docs/manager.md for the rules.

>>> import tempfile, numpy as np, unickpt
>>> root = tempfile.mkdtemp()
>>> with unickpt.CheckpointManager(root) as mgr:
...     _ = mgr.save(5, {"w": np.ones(2)})
>>> with unickpt.CheckpointManager(root) as mgr:
...     d = mgr.resolve_start()
...     r = mgr.restore({"w": np.zeros(2)})
>>> d.reason, r.step, r.state["w"].tolist()
("resume='auto': newest committed checkpoint", 5, [1.0, 1.0])
"""

from __future__ import annotations

import logging
import os
import posixpath
import threading
import warnings
from collections.abc import Callable, Iterable
from typing import Any

from ..dist.restore import narrow_per_rank, read_tree
from ..errors import CheckpointNotFoundError, CorruptCheckpointError
from ..format.reader import CheckpointReader, is_committed
from ..policy import RESUME_MODES, Listing, ManagerConfig, format_step, parse_step, plan_start
from ..state import load_adapters_for, restore_tree
from ..storage import Storage
from . import multiprocess
from .preemption import Preemption
from .records import Restored, StartDecision
from .run_root import RunRoot, read_info, valid_info

__all__ = ["StartMixin"]

log = logging.getLogger("unickpt")


def _as_select(select: Iterable[Any] | None) -> list[tuple] | None:
    if select is None:
        return None
    if isinstance(select, (str, tuple)):
        select = [select]
    return [tuple(s.split("/")) if isinstance(s, str) else tuple(s) for s in select]


class StartMixin:
    """The start of a :class:`~unickpt.manager.CheckpointManager`: decide, apply, restore."""

    # the manager's state (set by CheckpointManager.__init__)
    config: ManagerConfig
    run_root: RunRoot
    root: str
    storage: Storage
    coordinator: Any
    _mutex: threading.RLock
    _decision: StartDecision | None
    _steps: set[int]
    _metrics: dict[int, dict]
    _resumed_step: int | None
    _last_saved_step: int | None
    _preemption: Preemption | None
    _check_open: Callable[[], None]

    def _resolve_path(self, p: str) -> tuple[str, int | None, int]:
        """``(abs path, step if inside the root else None, step recorded in it)``."""
        st = self.storage
        path = st.resolve(p)
        if not is_committed(path, st):
            why = "does not exist" if not st.exists(path) else (
                "is not a directory" if not st.is_dir(path) else
                "has no manifest (not a unickpt checkpoint, or an uncommitted one)")
            raise CheckpointNotFoundError(
                f"resume={p!r} is not a committed checkpoint: {path} {why}. Allowed: "
                f"{', '.join(map(repr, RESUME_MODES))}, an int step, or a checkpoint path")
        info = read_info(self.storage, path)
        if info is None:
            raise CorruptCheckpointError(f"resume={p!r}: the manifest of {path} is damaged; "
                                         "pick another checkpoint", path=path)
        name_step = parse_step(posixpath.basename(path))
        recorded = info.get("step") if isinstance(info.get("step"), int) else name_step
        inside = posixpath.dirname(path) == self.root and name_step is not None
        return path, (name_step if inside else None), recorded or 0

    def resolve_start(self) -> StartDecision:
        """Decide (once) where the run starts, and apply it (archive).  Idempotent.

        >>> import tempfile, unickpt
        >>> unickpt.CheckpointManager(tempfile.mkdtemp()).resolve_start().reason
        "resume='auto': no committed checkpoint, cold start"
        """
        with self._mutex:
            if self._decision is not None:
                return self._decision
            self._check_open()
            if self.coordinator.world_size > 1:  # multi-process: rank 0 decides, broadcasts
                self._decision = multiprocess.resolve_start(self, self._resolve_local)
                return self._decision
            self._decision = self._resolve_local()
            if self._preemption is not None and self._steps:  # --- preemption hook
                seconds = (self.run_root.read_info(max(self._steps)) or {}).get("save_seconds")
                if isinstance(seconds, (int, float)):
                    self._preemption.record_save(float(seconds))
                    self._preemption.check_budget("at start")
            return self._decision

    def _resolve_local(self) -> StartDecision:
        """The start decision of this process alone (rank 0's, with several processes)."""
        cfg = self.config
        if not cfg.enabled:
            return StartDecision(False, 0, None, "checkpointing disabled")
        resume = cfg.resume
        external = None
        if not isinstance(resume, int) and os.fspath(resume) not in RESUME_MODES:
            path, inside_step, recorded = self._resolve_path(os.fspath(resume))
            if inside_step is not None:
                resume = inside_step
            else:
                external = (path, recorded)
        decision = self._start(resume, external)
        log.info("unickpt: %s: %s", self.root, decision.reason)
        return decision

    def _start(self, resume: Any, external: tuple[str, int] | None) -> StartDecision:
        """Lock the root, clean it, plan the start and apply it (archive)."""
        cfg, rr = self.config, self.run_root
        rr.open()
        listing = rr.scan()
        if rr.recover(listing):  # an interrupted overwrite or archive: undone, look again
            listing = rr.scan()
        rr.clean_leftovers(listing, threshold=cfg.stale_temp_seconds)
        if resume in ("auto", "must"):
            listing = self._skip_unreadable(listing)
        plan = plan_start(resume if external is None else "path", listing,
                          on_existing=cfg.on_existing, root=self.root,
                          external=external is not None,
                          external_step=external[1] if external else None)
        archived_to = (rr.archive(plan.archive, plan.archive_run)
                       if plan.archive and plan.archive_run is not None else None)
        self._steps = set(listing.steps) - set(plan.archive)
        if plan.archive:
            rr.write_pointer(format_step(max(self._steps)) if self._steps else None)
        path = external[0] if external else (
            posixpath.join(self.root, plan.name) if plan.name else None)
        if plan.resume and external is None:
            self._resumed_step = self._last_saved_step = plan.step
        reason = plan.reason
        if archived_to:
            reason += f"; archived {len(plan.archive)} checkpoints into {archived_to}"
        return StartDecision(plan.resume, plan.step, path, reason, archived_to,
                             tuple(format_step(s) for s in plan.archive))

    def _skip_unreadable(self, listing: Listing) -> Listing:
        # Walk down from the newest: a checkpoint whose manifest cannot be decoded counts as
        # incomplete (never resumed from), with a warning; older ones stay candidates.
        steps = list(listing.steps)
        while steps:
            info = self.run_root.read_info(steps[-1])
            if info is not None:
                self._metrics.setdefault(steps[-1], dict(info.get("metrics") or {}))
                break
            bad = steps.pop()
            warnings.warn(f"unickpt: {self.root}/{format_step(bad)} has a damaged manifest; "
                          "resuming from an older checkpoint", UserWarning, stacklevel=4)
        return Listing(tuple(steps), listing.uncommitted, listing.runs, listing.temps,
                       listing.trash, listing.other)

    # ------------------------------------------------------------------ restore
    def restore(self, state: Any, *, strict: bool = True,
                select: Iterable[Any] | None = None, per_rank: str = "error") -> Restored:
        """Load the start checkpoint into ``state`` (resolving the start first if needed).

        Structure, shapes and dtypes are checked for the whole state before anything is
        changed; every problem is listed in one :class:`~unickpt.IncompatibleCheckpointError`.
        ``strict=False`` ignores entries missing on either side (fine-tuning from a
        checkpoint without optimizer state, say); ``select=["params", ("opt", "mu")]``
        restores only those subtrees (``"a/b"`` strings split on ``/``; use tuples for keys
        containing ``/`` or int list indices) and leaves the rest of ``state`` as given.
        A checkpoint written by several processes restores per-rank state (RNG, data
        position, Stateful objects) only at the same world size; ``per_rank="keep"`` keeps
        the target's own per-rank objects at another world size (docs/distributed.md).
        """
        d = self.resolve_start()
        if not d.resume or d.path is None:
            load_adapters_for(state)  # adapters that track live objects start now
            return Restored(0, state, False, None)
        try:
            with CheckpointReader(d.path, self.storage) as r:
                # mmap + verify: every array is checksummed in place, then copied into its
                # target.  Sharded arrays stay pieces (assemble=False): an adapter reads only
                # the regions its target sharding needs; np.asarray(piece) assembles.
                m = r.manifest
                coord = self.coordinator
                if coord.world_size > 1 or (isinstance(m.info, dict)
                                            and "distributed" in m.info):
                    # multi-process: sharded pieces read lazily (only those this rank's
                    # shards overlap), per-rank subtrees narrowed to this rank's entry
                    tree = narrow_per_rank(read_tree(r, self.config.verify), m.info, state,
                                           rank=coord.rank, world_size=coord.world_size,
                                           mode=per_rank, checkpoint=d.path,
                                           select=_as_select(select))
                else:
                    tree = r.tree(mmap=True, verify=self.config.verify, assemble=False)
                new = restore_tree(state, tree, strict=strict, select=_as_select(select),
                                   checkpoint=d.path, kinds=m.kinds,
                                   warn=lambda msg: warnings.warn(msg, UserWarning,
                                                                  stacklevel=3))
        except CorruptCheckpointError as e:
            raise self._damaged_data(e, d) from e
        info = valid_info(m.info) or {}
        return Restored(d.step, new, True, d.path, dict(m.metadata),
                        dict(info.get("metrics") or {}))

    def _damaged_data(self, e: CorruptCheckpointError, d: StartDecision) -> Exception:
        """The error of a start checkpoint whose data is damaged, saying how to go on.

        The rule (docs/manager.md): auto-resume skips checkpoints whose *manifest* is damaged
        (checked at start for the newest ones); damaged *array data* is found only while
        restoring, and then restore stops: it never silently resumes an older step, since the
        caller may already have acted on the start decision."""
        older = sorted(s for s in self._steps if s < d.step)
        how = (f"to resume the previous checkpoint, pass resume={older[-1]} (or move "
               f"{d.path} aside)" if older else
               f"no older checkpoint exists; move {d.path} aside to start cold")
        return type(e)(f"{e}; {how}", path=e.path, leaves=e.leaves)

