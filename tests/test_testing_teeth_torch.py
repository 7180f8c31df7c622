"""Teeth, PyTorch: an MLP with dropout, AdamW, StepLR and a shuffled loader, each bug on a switch.

The trainers checkpoint live torch objects with CheckpointManager (through the torch adapter)
and return them; the checker compares those objects through the adapter.  It must fail each
buggy trainer with a report naming the culprit leaf, and pass the correct one (in-process and
under SIGKILL).
"""

from __future__ import annotations

import functools
import random

import numpy as np
import pytest

import unickpt
from unickpt.testing import ResumeMismatchError, assert_resume_deterministic

torch = pytest.importorskip("torch")

BUGS = ("no_rng", "no_data_position", "no_scheduler", "no_opt_count", "off_by_one")
SAVE_EVERY = 3


class Loader:
    """Shuffles 16 synthetic samples per epoch from its own generator; yields batches of 4."""

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(16, 4, generator=g)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1
        self.epoch, self.position = 0, 0

    def next_batch(self):
        if self.position >= 16:
            self.epoch, self.position = self.epoch + 1, 0
        order = torch.randperm(16, generator=torch.Generator().manual_seed(100 + self.epoch))
        idx = order[self.position:self.position + 4]
        self.position += 4
        return self.x[idx], self.y[idx]

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, sd):
        self.epoch, self.position = sd["epoch"], sd["position"]


def torch_train(root, total_steps, stop_at=None, *, bug=None):
    assert bug is None or bug in BUGS
    random.seed(0)  # unickpt.RNG() saves Python's, NumPy's and torch's global RNGs
    np.random.seed(0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)
    loader = Loader()
    state = {"model": model, "opt": opt, "sched": sched, "data": loader, "rng": unickpt.RNG()}
    # What the buggy trainers forget to checkpoint (the final state they return has it all).
    forgotten = {"no_rng": "rng", "no_scheduler": "sched", "no_data_position": "data"}.get(bug)
    saved = {k: v for k, v in state.items() if k != forgotten}
    with unickpt.CheckpointManager(root, resume="auto", save_every=SAVE_EVERY) as mgr:
        restored = mgr.restore(saved)  # torch objects are restored in place
        if bug == "no_opt_count" and restored.resumed:  # moments back, step counts lost
            for st in opt.state.values():
                st["step"].zero_()
        start = restored.step + (0 if bug == "off_by_one" and restored.resumed else 1)
        model.train()
        for step in range(start, total_steps + 1):
            x, y = loader.next_batch()
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if step == stop_at:
                return state  # a crash: no save
            mgr.save(step, saved, force=step == total_steps)
    return state


def with_bug(bug):
    return functools.partial(torch_train, bug=bug)


CULPRITS = {
    "no_rng": "rng/torch/cpu",
    "no_data_position": "data/position",
    "no_scheduler": "sched/last_epoch",
    "no_opt_count": 'opt/state/"0.weight"/step',
    "off_by_one": 'opt/state/"0.weight"/step',
}


def test_correct_torch_trainer_passes():
    tried = assert_resume_deterministic(torch_train, 8, max_examples=8)
    assert len(tried) >= 4  # distinct schedules: two draws may sort to the same one


@pytest.mark.parametrize("bug", BUGS)
def test_each_buggy_torch_trainer_fails_naming_the_culprit_leaf(bug):
    with pytest.raises(ResumeMismatchError) as e:
        assert_resume_deterministic(with_bug(bug), 8, max_examples=8)
    msg = str(e.value)
    assert CULPRITS[bug] in e.value.paths, msg
    assert f"\n  {CULPRITS[bug]}: " in msg
    assert 'model/"0.weight"' in e.value.paths
    # Minimal: the first stop after the first save (a stop at the save step itself comes
    # before that save, and resuming from nothing is a cold start).
    assert e.value.schedule == (SAVE_EVERY + 1,), msg


def test_report_names_the_lost_step_count():
    with pytest.raises(ResumeMismatchError) as e:
        assert_resume_deterministic(with_bug("no_opt_count"), 8, interruptions=[4])
    msg = str(e.value)
    # Resumed from step_3 with the count reset: the final count is 8 - 3 = 5, not 8.
    assert ('  opt/state/"0.weight"/step: float32[]: 1 of 1 elements differ, max '
            '|reference-resumed| = 3.0, first at []: reference=8.0, resumed=5.0') in msg
    assert "  1. stopped after step 4 (in-process, no save)" in msg


def test_correct_torch_trainer_survives_a_sigkill_mid_save():
    assert assert_resume_deterministic(torch_train, 8, interruptions=[4],
                                       hard_kill="mid_save") == [(4,)]
