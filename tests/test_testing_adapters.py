"""unickpt.testing on the PyTorch adapter's own property trainer (tests/_torch_trainer.py).

Generated training configurations (optimizer, LR schedule, dropout, gradient accumulation and
clipping, shuffling, save interval), each checked by assert_resume_deterministic with
hypothesis-chosen interruption schedules: the checker drives a trainer it was not written
for, through its own contract.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unickpt.testing import ResumeMismatchError, assert_resume_deterministic

pytest.importorskip("torch")
import _torch_trainer as tt  # noqa: E402  (tests/ is on sys.path under pytest)

configs = st.builds(
    tt.Config,
    width=st.sampled_from([4, 8]),
    dropout=st.sampled_from([0.0, 0.3]),
    optimizer=st.sampled_from(["sgd", "sgd_momentum", "adam", "adamw", "rmsprop"]),
    scheduler=st.sampled_from(["none", "step", "warmup_cosine", "onecycle"]),
    accum=st.sampled_from([1, 2]),
    clip=st.sampled_from([None, 0.5]),
    shuffle=st.booleans(),
    steps=st.integers(5, 8),
    save_every=st.integers(2, 3),
)


def contract(cfg):
    """The checker's train(root, total_steps, stop_at) around the adapter tests' trainer."""

    def train(root, total_steps, stop_at=None):
        assert total_steps == cfg.steps
        return tt.train(cfg, str(root), stop_at=stop_at)

    return train


# The check runs hypothesis itself (to pick schedules): inside a @given test that is a nested
# @given, which hypothesis asks to acknowledge.
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.nested_given])
@given(cfg=configs)
def test_the_torch_adapter_trainer_resumes_bit_for_bit(cfg):
    assert assert_resume_deterministic(contract(cfg), cfg.steps, max_examples=3)


def test_the_same_trainer_fails_when_it_stops_checkpointing_its_scheduler(monkeypatch):
    cfg = tt.Config(scheduler="step", steps=6, save_every=2)
    original = tt.checkpoint_state

    def without_scheduler(objs, step):
        state = original(objs, step)
        state.pop("scheduler", None)
        return state

    monkeypatch.setattr(tt, "checkpoint_state", without_scheduler)
    with pytest.raises(ResumeMismatchError) as e:
        assert_resume_deterministic(contract(cfg), cfg.steps, interruptions=[3])
    # the schedule restarted: the optimizer's current learning rate gives it away
    assert "optimizer/param_groups/0/lr" in e.value.paths, str(e.value)
