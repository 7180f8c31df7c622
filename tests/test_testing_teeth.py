"""Teeth: the resume checker catches the classic resume bugs, naming the culprit leaf.

Small numpy trainers, each with one deliberate bug switched on by name: the global RNG not
saved (dropout diverges), the data position not restored, the LR scheduler not restored, the
optimizer restored without its step count, a checkpoint labelled one step off.  The correct
trainer passes, in-process and under real SIGKILLs (a subprocess imports the trainers of this
module by dotted path).
"""

from __future__ import annotations

import functools
import random
import sys

import numpy as np
import pytest

import unickpt
from unickpt.testing import ResumeMismatchError, assert_resume_deterministic

BUGS = ("no_rng", "no_data_position", "no_scheduler", "no_opt_count", "off_by_one")
N_DATA, BATCH, SAVE_EVERY = 12, 3, 3


class Loader:
    """A shuffled loader over a fixed synthetic data set; its position is its state."""

    def __init__(self, seed: int = 7):
        rng = np.random.default_rng(123)
        self.x = rng.normal(size=(N_DATA, 4)).astype(np.float32)
        self.y = (self.x @ np.float32([1, -2, 0.5, 3]) + 0.25).astype(np.float32)
        self.seed, self.epoch, self.position = seed, 0, 0

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        if self.position + BATCH > N_DATA:
            self.epoch, self.position = self.epoch + 1, 0
        order = np.random.default_rng(self.seed + self.epoch).permutation(N_DATA)
        idx = order[self.position:self.position + BATCH]
        self.position += BATCH
        return self.x[idx], self.y[idx]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, sd: dict) -> None:
        self.seed, self.epoch, self.position = sd["seed"], sd["epoch"], sd["position"]


class WarmupDecay:
    """A step-based LR schedule with a counter, like torch's LR schedulers."""

    def __init__(self, base: float = 0.05):
        self.base, self.last_epoch = base, 0

    def lr(self) -> float:
        return self.base * min(1.0, (self.last_epoch + 1) / 3) * 0.9 ** self.last_epoch

    def step(self) -> None:
        self.last_epoch += 1

    def state_dict(self) -> dict:
        return {"base": self.base, "last_epoch": self.last_epoch}

    def load_state_dict(self, sd: dict) -> None:
        self.base, self.last_epoch = sd["base"], sd["last_epoch"]


def numpy_train(root, total_steps, stop_at=None, *, bug=None, async_save=False):
    """Linear regression with dropout, Adam, a warmup/decay schedule and a shuffled loader."""
    assert bug is None or bug in BUGS
    random.seed(0)  # unickpt.RNG() saves Python's RNG too: seed it, or runs differ
    np.random.seed(0)  # dropout draws from NumPy's global RNG
    if "torch" in sys.modules:  # other tests imported it, so unickpt.RNG() saves its RNG too
        sys.modules["torch"].manual_seed(0)
    sched, loader = WarmupDecay(), Loader()
    state = {"params": {"w": np.zeros(4, np.float32), "b": np.float32(0)},
             "opt": {"m": np.zeros(5, np.float32), "v": np.zeros(5, np.float32), "count": 0},
             "sched": sched, "data": loader, "rng": unickpt.RNG()}
    # What the buggy trainers forget to put in their checkpoints (the final state they return
    # still has everything, as a user's full training state would).
    forgotten = {"no_rng": "rng", "no_scheduler": "sched", "no_data_position": "data"}.get(bug)
    saved = {k: v for k, v in state.items() if k != forgotten}
    with unickpt.CheckpointManager(root, resume="auto", save_every=SAVE_EVERY,
                                   async_save=async_save) as mgr:
        restored = mgr.restore(saved)
        saved = restored.state
        state.update(saved)
        if bug == "no_opt_count" and restored.resumed:  # moments back, bias correction reset
            state["opt"]["count"] = 0
        start = restored.step + (0 if bug == "off_by_one" and restored.resumed else 1)
        for step in range(start, total_steps + 1):
            params, opt = state["params"], dict(state["opt"])
            x, y = loader.next_batch()
            keep = (np.random.random_sample(4) > 0.25).astype(np.float32) / np.float32(0.75)
            err = x @ (params["w"] * keep) + params["b"] - y
            grad = np.concatenate([(x * keep).T @ err, [err.sum()]]).astype(np.float32) / BATCH
            opt["count"] += 1
            opt["m"] = np.float32(0.9) * opt["m"] + np.float32(0.1) * grad
            opt["v"] = np.float32(0.99) * opt["v"] + np.float32(0.01) * grad * grad
            mhat = opt["m"] / np.float32(1 - 0.9 ** opt["count"])
            vhat = opt["v"] / np.float32(1 - 0.99 ** opt["count"])
            upd = np.float32(sched.lr()) * mhat / (np.sqrt(vhat) + np.float32(1e-8))
            state["params"] = {"w": params["w"] - upd[:4], "b": np.float32(params["b"] - upd[4])}
            state["opt"] = opt
            sched.step()
            if step == stop_at:
                return state  # a crash: no save
            mgr.save(step, {k: v for k, v in state.items() if k != forgotten},
                     force=step == total_steps)
    return state


def with_bug(bug):
    return functools.partial(numpy_train, bug=bug)


def train_no_rng(root, total_steps, stop_at=None):
    return numpy_train(root, total_steps, stop_at, bug="no_rng")


def train_async(root, total_steps, stop_at=None):
    return numpy_train(root, total_steps, stop_at, async_save=True)


def train_off_by_one(root, total_steps, stop_at=None):
    return numpy_train(root, total_steps, stop_at, bug="off_by_one")


# Each bug and a leaf whose difference names it in the report.
CULPRITS = {
    "no_rng": "rng/numpy/pos",
    "no_data_position": "data/position",
    "no_scheduler": "sched/last_epoch",
    "no_opt_count": "opt/count",
    "off_by_one": "opt/count",
}


def test_the_correct_trainer_passes_hypothesis_chosen_schedules():
    tried = assert_resume_deterministic(numpy_train, 10, max_examples=15)
    assert len(tried) >= 7  # distinct schedules: two draws may sort to the same one
    assert all(1 <= s <= 10 for sched in tried for s in sched)


@pytest.mark.parametrize("bug", BUGS)
def test_each_buggy_trainer_fails_naming_the_culprit_leaf(bug):
    with pytest.raises(ResumeMismatchError) as e:
        assert_resume_deterministic(with_bug(bug), 10, max_examples=15)
    err = e.value
    msg = str(err)
    assert CULPRITS[bug] in err.paths, msg
    assert f"\n  {CULPRITS[bug]}: " in msg
    # Shrunk to one interruption, right after the first save (a stop at the save step comes
    # before that save; resuming from nothing is a cold start and hides every bug).
    assert err.schedule == (SAVE_EVERY + 1,), msg
    assert f"reproduce with interruptions=[{err.schedule!r}]" in msg
    assert "params/w" in err.paths
    # The minimal schedule reproduces the failure when given explicitly.
    with pytest.raises(ResumeMismatchError) as again:
        assert_resume_deterministic(with_bug(bug), 10, interruptions=[err.schedule],
                                    check_reference=False)
    assert again.value.paths == err.paths


def test_failure_report_for_the_missing_rng_reads_well():
    with pytest.raises(ResumeMismatchError) as e:
        assert_resume_deterministic(with_bug("no_rng"), 10, interruptions=[(2, 4)])
    lines = str(e.value).splitlines()
    assert lines[0] == ("resuming changed the final state: interrupted after step(s) [2, 4] of "
                        "10, the resumed run does not end where an uninterrupted run does.")
    assert lines[1:5] == ["What happened:",
                          "  1. stopped after step 2 (in-process, no save)",
                          "  2. stopped after step 4 (in-process, no save)",
                          "  3. resumed and trained to step 10"]
    assert lines[5] == ("Likely culprits (integer state such as counters, data positions and "
                        "RNG states never drifts by rounding; one that differs was not saved or "
                        "not restored): rng/numpy/pos")
    assert lines[6] == "Final state, reference (uninterrupted) vs resumed:"
    assert lines[7].startswith("trees differ: 5 of ")  # 19 leaves, 20 with torch imported
    assert lines[8].startswith("  opt/m: float32[5]: 5 of 5 elements differ, max |reference-"
                               "resumed| = ")
    assert lines[-1] == "  rng/numpy/pos: int: reference=80, resumed=56"
    assert any(ln.startswith("  params/w: float32[4]: 4 of 4 elements differ") for ln in lines)
    assert e.value.schedule == (2, 4)


@pytest.mark.parametrize("moment, schedule", [("after_save", (2, 7)), ("mid_save", (4,))])
def test_hard_kill_correct_trainer_passes(moment, schedule):
    assert assert_resume_deterministic(numpy_train, 9, interruptions=[schedule],
                                       hard_kill=moment) == [schedule]


@pytest.mark.parametrize("moment", ["after_save", "mid_save"])
def test_hard_kill_lands_in_background_saves_too(moment):
    # With async_save the commit runs in the manager's saver thread: the kill lands there
    # while the training thread may already be a step further.
    assert assert_resume_deterministic(train_async, 9, interruptions=[5],
                                       hard_kill=moment) == [(5,)]


def test_in_process_stops_with_background_saves():
    assert len(assert_resume_deterministic(train_async, 9, max_examples=6)) >= 3


def test_hard_kill_catches_the_missing_rng_and_says_where_it_killed():
    with pytest.raises(ResumeMismatchError) as e:
        assert_resume_deterministic("test_testing_teeth:train_no_rng", 9, interruptions=[4],
                                    hard_kill="mid_save")
    msg = str(e.value)
    assert "  1. SIGKILL while step_6 was being saved (temporary directory written, not yet " \
           "committed)" in msg
    assert "rng/numpy/pos" in e.value.paths
    with pytest.raises(ResumeMismatchError) as e:
        assert_resume_deterministic(train_off_by_one, 9, interruptions=[3], hard_kill=True)
    assert "  1. SIGKILL right after step_3 was committed" in str(e.value)
    assert "opt/count" in e.value.paths
