"""Prove that a training function resumes bit for bit: :func:`assert_resume_deterministic`.

The user's training function follows one contract::

    def train(root, total_steps, stop_at=None):
        # train to total_steps, checkpointing into root with CheckpointManager(resume="auto");
        # given stop_at, return right after step stop_at without saving (like a crash)
        return final_state

The check runs it once uninterrupted (the reference) and then with interruptions: a run is
stopped after step ``s1``, a new call resumes from the latest checkpoint and is stopped after
``s2``, ... and a last call trains to the end.  Its final state must equal the reference bit
for bit.  Interruptions are in-process stops (``stop_at``) or real ``SIGKILL``\\ s of a
subprocess (``hard_kill``, see :mod:`unickpt.testing.hardkill`).  When no schedule is given,
hypothesis picks them and shrinks a failure to the smallest schedule.

>>> import os, numpy as np, unickpt
>>> from unickpt.testing import assert_resume_deterministic
>>> def train(root, total_steps, stop_at=None):
...     done = sorted(int(n[5:]) for n in os.listdir(root) if n.startswith("step_"))
...     state = unickpt.load(f"{root}/step_{done[-1]}") if done else {"x": np.zeros(2), "step": 0}
...     for step in range(state["step"] + 1, total_steps + 1):
...         state = {"x": state["x"] * 0.5 + step, "step": step}
...         if step == stop_at:
...             return state
...         if step % 3 == 0 or step == total_steps:
...             unickpt.save(f"{root}/step_{step}", state)
...     return state
>>> assert_resume_deterministic(train, 8, interruptions=[4, (2, 7)])
[(4,), (2, 7)]
"""

from __future__ import annotations

import os
import shutil
import tempfile
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from ..adapters import loaded_adapters
from ..api import load
from ..errors import UnickptError
from ..policy import parse_step
from ..rng import capture_global_rngs, restore_global_rngs, seed_global_rngs
from ..state import to_tree
from ..tree import format_path, iter_leaves
from .compare import TreeDifference, TreesDifferError, assert_trees_equal, diff_trees
from .hardkill import MOMENTS, KillOutcome, dotted_path_of, resolve_target, run_and_kill

__all__ = ["assert_resume_deterministic", "ResumeMismatchError", "default_max_examples",
           "set_default_max_examples", "first_divergence"]

Schedule = tuple[int, ...]
# (earliest step whose checkpoints differ, the differences there, the leaf paths they hold)
_Divergence = tuple[int, list[TreeDifference], set[str]]
_DEFAULT_EXAMPLES = 10
_settings: dict[str, int | None] = {"max_examples": None}


def set_default_max_examples(n: int | None) -> None:
    """Set how many schedules hypothesis tries when ``max_examples`` is not given.

    The pytest plugin calls this for ``--unickpt-examples``; ``None`` restores the default
    (the ``UNICKPT_EXAMPLES`` environment variable, else 10).
    """
    if n is not None and n < 1:
        raise ValueError(f"max_examples must be >= 1, got {n}")
    _settings["max_examples"] = n


def default_max_examples() -> int:
    """The number of schedules tried by default (see :func:`set_default_max_examples`)."""
    if _settings["max_examples"] is not None:
        return int(_settings["max_examples"])
    env = os.environ.get("UNICKPT_EXAMPLES")
    return int(env) if env else _DEFAULT_EXAMPLES


class ResumeMismatchError(AssertionError):
    """An interrupted-and-resumed run did not end in the reference's final state.

    Attributes:
        schedule: the interruption steps of the failing run (the minimal one found).
        events: what happened at each interruption, in words.
        differences: the differing leaves (empty if the resumed run raised instead).
        tried: how many schedules were run.
    """

    def __init__(self, message: str, *, schedule: Schedule, events: Sequence[str],
                 differences: Sequence[TreeDifference], tried: int):
        super().__init__(message)
        self.schedule = schedule
        self.events = list(events)
        self.differences = list(differences)
        self.tried = tried

    @property
    def paths(self) -> list[str]:
        """Tree paths of the differing leaves."""
        return [d.path for d in self.differences]


class _Failure:
    def __init__(self, events: list[str], error: BaseException, tb: str = ""):
        self.events, self.error, self.tb = events, error, tb
        self.root: str | None = None  # the failing run's root, when kept for inspection
        # The earliest step whose checkpoints differ from the reference run's, and how.
        self.divergence: _Divergence | None = None


def _snapshot(state: Any) -> Any:
    # A host copy right away: later runs may mutate shared framework objects.
    tree, _ = to_tree(state, snapshot=True)
    return tree


class _FreshRngs:
    """Scramble the global RNGs before each run (as a new process would have them), then
    give the caller its own states back: a trainer that relies on RNG state left over from
    an earlier call must not pass by luck.  Every framework's global RNG is reached through
    its adapter (the RNG part of the adapter contract)."""

    def __init__(self) -> None:
        self.saved = capture_global_rngs()
        self.counter = 0

    def scramble(self) -> None:
        self.counter += 1
        seed_global_rngs(0x5EED0000 + self.counter * 7919)

    def restore(self) -> None:
        restore_global_rngs(self.saved)


def _normalise(interruptions: Sequence[int | Sequence[int]], total_steps: int) -> list[Schedule]:
    out = []
    for item in interruptions:
        sched = (item,) if isinstance(item, int) else tuple(item)
        if not sched or any(not isinstance(s, int) or isinstance(s, bool) for s in sched):
            raise ValueError(f"interruption schedule {item!r}: expected a step or a non-empty "
                             "sequence of steps")
        if any(b <= a for a, b in zip(sched, sched[1:])):
            raise ValueError(f"interruption schedule {item!r}: steps must strictly increase")
        if sched[0] < 1 or sched[-1] > total_steps:
            raise ValueError(f"interruption schedule {item!r}: steps must lie in 1.."
                             f"{total_steps}")
        out.append(sched)
    return out


def _schedules(total_steps: int, max_interruptions: int) -> Any:
    """Sorted, distinct interruption steps in 1..total_steps; shrinks to fewer, earlier ones.

    (A private copy of ``unickpt.testing.strategies.interruption_schedules``'s job, so the
    checker does not depend on the strategies module's exact signature.)
    """
    from hypothesis import strategies as st

    return st.lists(st.integers(1, total_steps), min_size=1, max_size=max_interruptions,
                    unique=True).map(lambda xs: tuple(sorted(xs)))


def assert_resume_deterministic(
    train: Callable[..., Any] | str,
    total_steps: int,
    *,
    interruptions: Sequence[int | Sequence[int]] | None = None,
    max_examples: int | None = None,
    max_interruptions: int = 3,
    hard_kill: bool | str = False,
    rtol: float | None = None,
    atol: float | None = None,
    check_reference: bool = True,
    root: str | os.PathLike | None = None,
    timeout: float = 300.0,
) -> list[Schedule]:
    """Assert that interrupting and resuming ``train`` never changes its final state.

    Args:
        train: ``train(root, total_steps, stop_at=None) -> final_state`` (see the module
            docstring), or its dotted path ``"package.module:function"``.
        total_steps: steps of a full run.
        interruptions: schedules to run: each an int (one interruption after that step) or a
            sequence of strictly increasing steps in ``1..total_steps``.  ``None``: hypothesis
            chooses 1..``max_interruptions`` interruptions per run for ``max_examples`` runs
            and shrinks a failure to the smallest schedule.
        max_examples: schedules hypothesis tries (default: ``--unickpt-examples``, the
            ``UNICKPT_EXAMPLES`` environment variable, else 10).
        hard_kill: ``False``: interruptions are in-process ``stop_at`` returns.  ``True`` or
            ``"after_save"``: each interrupted run is a subprocess, SIGKILLed right after the
            first checkpoint of a step ``>= s`` is committed; ``"mid_save"``: SIGKILLed while
            that checkpoint is being written (before its commit).  Needs ``train`` importable
            by dotted path.  The final resumed run and the reference run in this process.
        rtol, atol: compare floats within a tolerance instead of bit for bit.
        check_reference: run the reference twice first (three times if the first call in
            this process differs from the second, e.g. through a lazy import drawing from a
            global RNG), so a trainer that is not even deterministic without interruptions is
            reported as such.
        root: directory under which the run roots are created.  Default: a temporary one,
            removed afterwards; with ``root`` given, the failing run's root is kept (and
            named in the report) so its checkpoints can be inspected.
        timeout: seconds a hard-killed child may take to reach its kill point.

    Returns:
        The schedules that were run.

    Raises:
        ResumeMismatchError: naming the (minimal) failing schedule, what happened at each
            interruption, and every differing leaf of the final state.

    >>> import os, unickpt
    >>> def forgetful(root, total_steps, stop_at=None):  # restores x, restarts at step 1
    ...     done = sorted(int(n[5:]) for n in os.listdir(root) if n.startswith("step_"))
    ...     x = unickpt.load(f"{root}/step_{done[-1]}")["x"] if done else 0
    ...     for step in range(1, total_steps + 1):
    ...         x += step
    ...         if step == stop_at:
    ...             return {"x": x}
    ...         unickpt.save(f"{root}/step_{step}", {"x": x}, overwrite=True)
    ...     return {"x": x}
    >>> try:
    ...     assert_resume_deterministic(forgetful, 4, interruptions=[2])
    ... except ResumeMismatchError as e:
    ...     print(e.schedule, e.paths, e.differences[0].detail)
    (2,) ['x'] int: reference=10, resumed=11
    """
    moment = _kill_moment(total_steps, hard_kill)
    target, train_fn = _resolve_train(train, moment)
    explicit = None if interruptions is None else _normalise(interruptions, total_steps)
    check = _Checker(train_fn, total_steps, target=target, moment=moment, rtol=rtol, atol=atol,
                     keep=root is not None, timeout=timeout,
                     base=tempfile.mkdtemp(prefix="unickpt-resume-", dir=root))
    try:
        # Load the adapters of the frameworks already imported now: their first import (and
        # what it imports) must not happen inside the first run, where it could draw from a
        # global RNG that the run has just seeded.
        loaded_adapters()
        check.run_reference(twice=check_reference)
        if explicit is not None:
            for i, schedule in enumerate(explicit):
                failure = check.run(schedule)
                if failure is not None:
                    _raise(schedule, failure, total_steps, i + 1, found_by=None)
            return explicit
        return check.search(max_interruptions, max_examples)
    finally:
        check.rngs.restore()
        if root is None:
            shutil.rmtree(check.base, ignore_errors=True)


def _kill_moment(total_steps: int, hard_kill: bool | str) -> str | None:
    """Validate the arguments; the hard-kill moment (None: in-process interruptions)."""
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    if not hard_kill:
        return None
    moment = "after_save" if hard_kill is True else str(hard_kill)
    if moment not in MOMENTS:
        raise ValueError(f"hard_kill={hard_kill!r}: expected False, True or one of {MOMENTS}")
    return moment


def _resolve_train(train: Callable[..., Any] | str,
                   moment: str | None) -> tuple[str, Callable[..., Any]]:
    """(dotted path for hard-killed subprocesses, the function itself)."""
    if isinstance(train, str):
        return train, resolve_target(train)
    return (dotted_path_of(train) if moment else ""), train


class _Checker:
    """The runs of one check: the reference, then one run root per interruption schedule."""

    def __init__(self, train: Callable[..., Any], total_steps: int, *, target: str,
                 moment: str | None, rtol: float | None, atol: float | None, keep: bool,
                 timeout: float, base: str):
        self.train, self.total_steps, self.target = train, total_steps, target
        self.moment, self.rtol, self.atol, self.keep = moment, rtol, atol, keep
        self.timeout, self.base = timeout, base
        self.rngs = _FreshRngs()
        self.counter = 0
        self.reference: Any = None
        self.reference_root = ""
        self.results: dict[Schedule, _Failure | None] = {}

    def fresh_root(self) -> str:
        self.counter += 1
        path = os.path.join(self.base, f"run_{self.counter}")
        os.makedirs(path)
        return path

    def call(self, run_root: str, **kw: Any) -> Any:
        self.rngs.scramble()
        return self.train(run_root, self.total_steps, **kw)

    def run_reference(self, *, twice: bool) -> None:
        """The uninterrupted run; with ``twice``, also proof that it is deterministic."""
        self.reference_root = self.fresh_root()
        self.reference = _snapshot(self.call(self.reference_root))
        if not twice:
            return
        again_root = self.fresh_root()
        again = _snapshot(self.call(again_root))
        if not diff_trees(self.reference, again, rtol=self.rtol, atol=self.atol):
            return
        # Only the first call of train in this process may differ (a lazy import that draws
        # from a global RNG, a cache warming up): a third run tells.
        third = _snapshot(self.call(self.fresh_root()))
        try:
            assert_trees_equal(again, third, rtol=self.rtol, atol=self.atol,
                               names=("run 2", "run 3"))
        except TreesDifferError as e:
            raise ResumeMismatchError(
                "train is not deterministic even without interruptions: uninterrupted runs of "
                f"{self.total_steps} steps ended in different states. Seed every RNG at the "
                "start of train (and use torch.use_deterministic_algorithms(True) for torch) "
                "before checking resumption.\n" + str(e),
                schedule=(), events=[], differences=e.differences, tried=0) from None
        self.reference, self.reference_root = again, again_root

    def interrupt(self, run_root: str, schedule: Schedule, events: list[str]) -> None:
        for stop in schedule:
            if self.moment is None:
                self.call(run_root, stop_at=stop)
                events.append(f"stopped after step {stop} (in-process, no save)")
            else:
                outcome: KillOutcome = run_and_kill(self.target, run_root, self.total_steps,
                                                    stop, self.moment, timeout=self.timeout)
                events.append(outcome.describe(stop))

    def run(self, schedule: Schedule) -> _Failure | None:
        """Run one interruption schedule (once; later calls answer from memory)."""
        if schedule in self.results:
            return self.results[schedule]
        run_root = self.fresh_root()
        events: list[str] = []
        failure: _Failure | None = None
        try:
            self.interrupt(run_root, schedule, events)
            events.append(f"resumed and trained to step {self.total_steps}")
            final = _snapshot(self.call(run_root))
            assert_trees_equal(self.reference, final, rtol=self.rtol, atol=self.atol,
                               names=("reference", "resumed"))
        except TreesDifferError as e:
            failure = _Failure(events, e)
            failure.divergence = _divergence(self.reference_root, run_root,
                                             rtol=self.rtol, atol=self.atol)
        except Exception as e:  # the resumed run itself crashed: also a resume bug
            failure = _Failure(events, e, traceback.format_exc())
        if failure is not None and self.keep:
            failure.root = run_root  # the user asked for a root: keep it to inspect
        else:
            shutil.rmtree(run_root, ignore_errors=True)
        self.results[schedule] = failure
        return failure

    def search(self, max_interruptions: int, max_examples: int | None) -> list[Schedule]:
        """Let hypothesis look for a failing schedule; raise the minimal one found."""
        from . import require_hypothesis

        hypothesis = require_hypothesis()
        n = max_examples if max_examples is not None else default_max_examples()
        cfg = hypothesis.settings(max_examples=n, database=None, deadline=None,
                                  suppress_health_check=list(hypothesis.HealthCheck))
        try:
            minimal = hypothesis.find(_schedules(self.total_steps, max_interruptions),
                                      lambda s: self.run(s) is not None, settings=cfg)
        except hypothesis.errors.NoSuchExample:
            return list(self.results)
        minimal = _simplify(minimal, lambda sched: self.run(sched) is not None)
        failure = self.results[minimal]
        assert failure is not None
        for sched, f in self.results.items():  # keep only the reported run's root
            if f is not None and f.root is not None and sched != minimal:
                shutil.rmtree(f.root, ignore_errors=True)
        _raise(minimal, failure, self.total_steps, len(self.results), found_by="hypothesis")


def _divergence(reference_root: str, resumed_root: str, *, rtol: float | None,
                atol: float | None) -> _Divergence | None:
    found = first_divergence(reference_root, resumed_root, rtol=rtol, atol=atol)
    if found is None:
        return None
    step, diffs = found
    saved = load(os.path.join(reference_root, f"step_{step}"))
    return step, diffs, {format_path(p) for p, _ in iter_leaves(saved)}


def first_divergence(reference_root: str | os.PathLike, resumed_root: str | os.PathLike, *,
                     rtol: float | None = None, atol: float | None = None,
                     ) -> tuple[int, list[TreeDifference]] | None:
    """The earliest step whose ``step_<N>`` checkpoints differ between two run roots.

    Returns ``(step, differences)`` or None when no common checkpoint differs (or none can
    be read).  Leaves that differ first in time are where a resume bug starts; a leaf that
    differs only later (a scheduler counting epochs) is usually a consequence.

    >>> import tempfile, numpy as np, unickpt
    >>> a, b = tempfile.mkdtemp(), tempfile.mkdtemp()
    >>> for step, x in [(1, 0), (2, 1), (3, 2)]:
    ...     _ = unickpt.save(f"{a}/step_{step}", {"x": x, "w": np.float32([step])})
    ...     _ = unickpt.save(f"{b}/step_{step}", {"x": x + (step > 1), "w": np.float32([step])})
    >>> step, diffs = first_divergence(a, b)
    >>> step, [d.path for d in diffs]
    (2, ['x'])
    """
    def steps(root: str | os.PathLike) -> set[int]:
        try:
            names = os.listdir(root)
        except OSError:
            return set()
        return {n for n in map(parse_step, names) if n is not None}

    for step in sorted(steps(reference_root) & steps(resumed_root)):
        try:
            a = load(os.path.join(reference_root, f"step_{step}"))
            b = load(os.path.join(resumed_root, f"step_{step}"))
        except (UnickptError, OSError):
            continue  # damaged or half-written (a hard kill): compare the next one
        diffs = diff_trees(a, b, rtol=rtol, atol=atol, names=("reference", "resumed"))
        if diffs:
            return step, diffs
    return None


def _simplify(schedule: Schedule, fails: Callable[[Schedule], bool],
              budget: int = 40) -> Schedule:
    """Greedily make a failing schedule smaller: fewer interruptions, then earlier steps.

    Hypothesis' shrinker gives up early with the small example budgets these (slow) checks
    run with, so its result is polished here, at a bounded cost of extra runs.
    """
    tries = 0
    improved = True
    while improved and tries < budget:
        improved = False
        for i in range(len(schedule)):
            cand = schedule[:i] + schedule[i + 1:]
            if cand:
                tries += 1
                if fails(cand):
                    schedule, improved = cand, True
                    break
        if improved:
            continue
        for i in range(len(schedule)):
            lo = schedule[i - 1] + 1 if i else 1
            for v in range(lo, schedule[i]):
                if tries >= budget:
                    return schedule
                cand = schedule[:i] + (v,) + schedule[i + 1:]
                tries += 1
                if fails(cand):
                    schedule, improved = cand, True
                    break
            if improved:
                break
    return schedule


def _culprits(final: Sequence[TreeDifference], divergence: _Divergence | None) -> str:
    """The "Likely culprits" line, ranked by time.

    First the integer leaves of the final state that no checkpoint holds (state that was
    never saved); then the leaves that differ first in time (in the earliest checkpoint that
    differs from the reference's), integer ones if any; a leaf that starts to differ only
    later (a scheduler counting epochs) is a consequence, not a cause.  Without checkpoints
    to compare, the integer leaves of the final state.
    """
    why = ("integer state such as counters, data positions and RNG states never drifts by "
           "rounding; one that differs was not saved or not restored")
    if divergence is None:
        paths, prefix = [d.path for d in final if d.exact], f"Likely culprits ({why})"
    else:
        step, first, saved = divergence
        unsaved = [d.path for d in final if d.exact and d.path not in saved]
        early = [d.path for d in first if d.exact]
        if unsaved:
            paths, prefix = unsaved + early, f"Likely culprits ({why})"
        else:
            paths = early or [d.path for d in first]
            prefix = (f"Likely culprits (the leaves that differ first in time, in the "
                      f"checkpoints of step {step}; {why})")
    if not paths:
        return ""
    return f"{prefix}: " + ", ".join(paths[:10]) + (" ..." if len(paths) > 10 else "")


def _raise(schedule: Schedule, failure: _Failure, total_steps: int, tried: int,
           found_by: str | None) -> NoReturn:
    steps = ", ".join(map(str, schedule))
    if isinstance(failure.error, TreesDifferError):
        lines = [f"resuming changed the final state: interrupted after step(s) [{steps}] of "
                 f"{total_steps}, the resumed run does not end where an uninterrupted run does."]
    else:
        lines = [f"resuming failed: interrupted after step(s) [{steps}] of {total_steps}, a "
                 f"run raised {type(failure.error).__name__}."]
    if found_by:
        lines.append(f"Minimal failing schedule found by {found_by} after {tried} schedules; "
                     f"reproduce with interruptions=[{schedule!r}].")
    lines.append("What happened:")
    lines.extend(f"  {i + 1}. {ev}" for i, ev in enumerate(failure.events))
    if failure.root is not None:
        lines.append(f"The interrupted run's checkpoints are kept in {failure.root}")
    if isinstance(failure.error, TreesDifferError):
        diffs = failure.error.differences
        culprits = _culprits(diffs, failure.divergence)
        if culprits:
            lines.append(culprits)
        lines.append("Final state, reference (uninterrupted) vs resumed:")
        lines.append(str(failure.error))
        cause = None
    else:
        lines.append(f"The run raised {type(failure.error).__name__}: {failure.error}")
        if failure.tb:
            lines.append(failure.tb.rstrip())
        diffs = []
        cause = failure.error
    raise ResumeMismatchError("\n".join(lines), schedule=schedule, events=failure.events,
                              differences=diffs, tried=tried) from cause
