"""Where a run starts: which checkpoint to resume and what to archive.

Pure decisions over a :class:`~unickpt.policy.naming.Listing`; the manager performs them.

Modes (``resume=``):

* ``"auto"``: the newest committed checkpoint, else a cold start.
* ``"must"``: the newest committed checkpoint, else :class:`~unickpt.CheckpointNotFoundError`.
* ``"never"``: a cold start; ``on_existing`` decides what happens to existing checkpoints.
* an ``int`` step: that committed checkpoint of the root, else ``CheckpointNotFoundError``.
* a path: that committed checkpoint (checked by the manager).

Checkpoints in the root that do not belong to the history being resumed are handled by
``on_existing`` (``"archive"``: moved into ``run_<K>``; ``"error"``: refuse to start): all of
them for ``"never"`` and for a path outside the root, the ones newer than the chosen step
for an explicit step or a path inside the root.  Otherwise a later ``save()`` of such a step
would be a silent no-op and ``"auto"`` would later resume the abandoned branch.

>>> plan_start("auto", Listing(steps=(3, 7))).step
7
>>> d = plan_start("never", Listing(steps=(3, 7), runs=(2, 10)))
>>> d.resume, d.archive, d.archive_run
(False, (3, 7), 11)
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import CheckpointExistsError, CheckpointNotFoundError
from .naming import Listing, format_run, format_step

__all__ = ["StartPlan", "plan_start", "next_run"]


@dataclass(frozen=True)
class StartPlan:
    """The start decision before it is applied.

    Attributes:
        resume: whether a checkpoint is loaded.
        step: its step (0 when cold; for an external path, filled in by the manager).
        name: ``step_<N>`` of the root checkpoint to resume, None for cold or external.
        reason: a sentence for logs.
        archive: steps of root checkpoints to move into ``run_<archive_run>`` (may be empty).
        archive_run: the run number they go to (None when nothing is archived).
    """

    resume: bool
    step: int
    name: str | None
    reason: str
    archive: tuple[int, ...] = ()
    archive_run: int | None = None


def next_run(runs: tuple[int, ...] | list[int]) -> int:
    """The number of the next archive run: largest existing + 1 (gaps are kept), 1 if none.

    >>> next_run([2, 10]), next_run([])
    (11, 1)
    """
    return max(runs) + 1 if runs else 1


def _displace(listing: Listing, steps: tuple[int, ...], on_existing: str, root: str,
              why: str) -> tuple[tuple[int, ...], int | None]:
    if not steps:
        return (), None
    if on_existing == "error":
        names = ", ".join(format_step(s) for s in steps[:10]) + (" ..." if len(steps) > 10 else "")
        raise CheckpointExistsError(
            f"{root} already holds checkpoints ({names}) and {why}; on_existing='error' "
            "refuses to start. Use resume='auto' to continue the run, on_existing='archive' to "
            "move them into run_<K>/, or a fresh root")
    return steps, next_run(listing.runs)


def plan_start(resume: str | int, listing: Listing, *, on_existing: str = "archive",
               root: str = "the run root", external: bool = False,
               external_step: int | None = None) -> StartPlan:
    """Decide where the run starts.  ``resume`` is a mode, an int step, or (with
    ``external=True``) a path the manager resolved outside the root; a path inside the root
    is passed as its int step."""
    steps = listing.steps
    if external:
        arch, run = _displace(listing, steps, on_existing, root,
                              "the run starts from a checkpoint outside it")
        return StartPlan(True, external_step or 0, None, "resuming from the given path",
                         arch, run)
    if resume in ("auto", "must"):
        if steps:
            return StartPlan(True, steps[-1], format_step(steps[-1]),
                             f"resume={resume!r}: newest committed checkpoint")
        if resume == "must":
            extra = f" ({len(listing.uncommitted)} uncommitted step dirs ignored)" \
                if listing.uncommitted else ""
            raise CheckpointNotFoundError(
                f"resume='must' but {root} holds no committed checkpoint{extra}; check the "
                "path, or use resume='auto' to allow a cold start")
        return StartPlan(False, 0, None, "resume='auto': no committed checkpoint, cold start")
    if resume == "never":
        arch, run = _displace(listing, steps, on_existing, root, "resume='never'")
        why = (f"; {len(arch)} old checkpoints archived into {format_run(run)}"
               if arch and run is not None else "")
        return StartPlan(False, 0, None, f"resume='never': cold start{why}", arch, run)
    if isinstance(resume, int) and not isinstance(resume, bool):
        if resume not in steps:
            have = ", ".join(map(str, steps[-10:])) or "none"
            raise CheckpointNotFoundError(
                f"resume={resume} but {root} has no committed {format_step(resume)} "
                f"(committed steps: {have}); pick one of those or use resume='auto'")
        newer = tuple(s for s in steps if s > resume)
        arch, run = _displace(listing, newer, on_existing, root,
                              f"they are newer than the requested step {resume}")
        return StartPlan(True, resume, format_step(resume),
                         f"resume={resume}: explicit step", arch, run)
    raise ValueError(f"unknown resume mode {resume!r}")  # options are validated before this
