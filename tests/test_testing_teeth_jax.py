"""Teeth, JAX: a model with dropout from a PRNG key in the state, optax AdamW on a warmup/cosine
schedule and a shuffled loader, checkpointed as live pytrees by CheckpointManager (through the
JAX adapter).  Each bug must fail with its culprit leaf named; the correct trainer passes
(in-process and under SIGKILL).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import unickpt
from unickpt.testing import ResumeMismatchError, assert_resume_deterministic

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = jax.numpy

BUGS = ("no_rng", "no_data_position", "no_scheduler", "no_opt_count")
SAVE_EVERY = 3
X = np.random.default_rng(3).normal(size=(20, 4)).astype(np.float32)
Y = (X @ np.float32([1, -2, 0.5, 3]) + 0.1).astype(np.float32)
OPT = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 0.05, 3, 12))


@jax.jit
def _train_step(params, opt_state, key, x, y):
    key, sub = jax.random.split(key)
    keep = jax.random.bernoulli(sub, 0.75, (4,)).astype(jnp.float32) / 0.75

    def loss(p):
        return jnp.mean((x @ (p["w"] * keep) + p["b"] - y) ** 2)

    grads = jax.grad(loss)(params)
    updates, opt_state = OPT.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, key


def jax_train(root, total_steps, stop_at=None, *, bug=None):
    assert bug is None or bug in BUGS
    params = {"w": jnp.zeros(4), "b": jnp.zeros(())}
    state = {"params": params, "opt": OPT.init(params), "key": jax.random.PRNGKey(0),
             "data": {"epoch": 0, "position": 0}}
    # What the buggy trainers forget to checkpoint (the final state they return has it all).
    forgotten = {"no_rng": "key", "no_data_position": "data"}.get(bug)
    with unickpt.CheckpointManager(root, resume="auto", save_every=SAVE_EVERY) as mgr:
        restored = mgr.restore({k: v for k, v in state.items() if k != forgotten})
        state = {**state, **restored.state}  # JAX values are immutable: take the new ones
        if restored.resumed and bug in ("no_opt_count", "no_scheduler"):
            adam, decay, sched = state["opt"]
            if bug == "no_opt_count":  # Adam's moments restored, its bias-correction count lost
                adam = adam._replace(count=jnp.zeros_like(adam.count))
            else:  # the LR schedule restarts from its warmup
                sched = sched._replace(count=jnp.zeros_like(sched.count))
            state["opt"] = (adam, decay, sched)
        for step in range(restored.step + 1, total_steps + 1):
            data = dict(state["data"])
            if data["position"] >= 20:
                data = {"epoch": data["epoch"] + 1, "position": 0}
            order = np.random.default_rng(100 + data["epoch"]).permutation(20)
            idx = order[data["position"]:data["position"] + 4]
            data["position"] += 4
            params, opt_state, key = _train_step(state["params"], state["opt"], state["key"],
                                                 X[idx], Y[idx])
            state = {"params": params, "opt": opt_state, "key": key, "data": data}
            if step == stop_at:
                return state  # a crash: no save
            mgr.save(step, {k: v for k, v in state.items() if k != forgotten},
                     force=step == total_steps)
    return state


CULPRITS = {
    "no_rng": "key",
    "no_data_position": "data/position",
    "no_scheduler": "opt/2/count",
    "no_opt_count": "opt/0/count",
}


def test_correct_jax_trainer_passes():
    assert len(assert_resume_deterministic(jax_train, 8, max_examples=6)) >= 3


@pytest.mark.parametrize("bug", BUGS)
def test_each_buggy_jax_trainer_fails_naming_the_culprit_leaf(bug):
    with pytest.raises(ResumeMismatchError) as e:
        assert_resume_deterministic(functools.partial(jax_train, bug=bug), 8, max_examples=6)
    msg = str(e.value)
    assert CULPRITS[bug] in e.value.paths, msg
    assert "params/w" in e.value.paths
    assert e.value.schedule == (SAVE_EVERY + 1,), msg
    # integer state that differs is singled out as the likely cause
    culprits_line = next(ln for ln in msg.splitlines() if ln.startswith("Likely"))
    assert culprits_line.startswith("Likely culprits") and CULPRITS[bug] in culprits_line


def test_report_shows_the_restarted_adam_count():
    with pytest.raises(ResumeMismatchError) as e:
        assert_resume_deterministic(functools.partial(jax_train, bug="no_opt_count"), 8,
                                    interruptions=[5])
    assert "  opt/0/count: int32[]: 1 of 1 elements differ, max |reference-resumed| = 3.0, " \
           "first at []: reference=8, resumed=5" in str(e.value)


def test_correct_jax_trainer_survives_a_sigkill_after_a_save():
    assert assert_resume_deterministic(jax_train, 8, interruptions=[(2, 5)],
                                       hard_kill=True) == [(2, 5)]
