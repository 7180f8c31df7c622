"""Prove that the Flax (NNX) quickstart trainer resumes bit for bit: a user-style test.

This is the test you would write for your own trainer (see docs/testing.md).  The quickstart's
``train(root)`` trains ``flax_quickstart.STEPS`` steps with a ``CheckpointManager(root)``
(resume="auto" is the default) and writes a final checkpoint; it returns nothing, so the
wrapper below reads the final state back from that checkpoint.  The quickstart crashes by SIGKILL, never by returning early, so the checks
use ``hard_kill``: each interrupted run is a subprocess killed at a save, then the run resumes.

    python -m pytest examples/test_flax_quickstart_resume.py --unickpt-examples=3
"""

from __future__ import annotations

import pytest

import unickpt

pytest.importorskip("flax")
import flax_quickstart  # noqa: E402  (examples/ is on sys.path when pytest runs this file)
from _quick_examples import unickpt_examples  # noqa: E402, F401  (2 schedules unless asked)

STEPS = flax_quickstart.STEPS  # 40; saves every 6 steps (flax_quickstart.SAVE_EVERY) and at 40


def final_checkpoint(root) -> str:
    """The newest committed checkpoint of ``root`` (``latest()`` only looks; it takes no lock)."""
    newest = unickpt.CheckpointManager(root).latest()
    assert newest is not None, f"no committed checkpoint in {root}"
    return newest.path


def train(root, total_steps, stop_at=None):
    """The checker's contract: train to total_steps in root, return the final state."""
    assert stop_at is None, "the quickstart crashes by SIGKILL: use hard_kill"
    assert total_steps == STEPS, "the quickstart always trains flax_quickstart.STEPS steps"
    flax_quickstart.train(str(root))
    return unickpt.load(final_checkpoint(root))


def test_quickstart_survives_sigkills_right_after_saves(unickpt_resume_check):
    # [23]: killed right after step_24 is committed; (5, 19): after step_6, then the resumed
    # run after step_24
    unickpt_resume_check(train, STEPS, interruptions=[23, (5, 19)], hard_kill=True)


def test_quickstart_survives_a_sigkill_in_the_middle_of_a_save(unickpt_resume_check):
    # killed while step_30 is being written: the resume must start from step_24
    unickpt_resume_check(train, STEPS, interruptions=[26], hard_kill="mid_save")


@pytest.mark.slow
def test_quickstart_survives_sigkills_hypothesis_chooses(unickpt_resume_check):
    unickpt_resume_check(train, STEPS, hard_kill=True, max_interruptions=2)
