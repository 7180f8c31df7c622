"""A sharded NNX training job (2 processes x 2 CPU devices, jax.distributed + gloo) killed as a
whole (SIGKILL to its process group) at points hypothesis picks, mid-save included, then
relaunched with the same ``CheckpointManager(resume="auto")`` code: the final state is bit for
bit the one of the uninterrupted run (tests/_jax_dist_trainer.py is one process of the job).

CI runs the explicit example (killed while a process writes its array file); set
``UNICKPT_JAX_KILLS=N`` for N more hypothesis examples (1-2 kills each).  The JAX compilation
cache is shared by the jobs of this module, so only the first one compiles.
"""

from __future__ import annotations

import json
import os
import tempfile

import pytest

pytest.importorskip("jax")
pytest.importorskip("flax")
from _bitwise import assert_bitwise_equal  # noqa: E402
from _jax_launch import launch_jax  # noqa: E402
from hypothesis import HealthCheck, Phase, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import unickpt  # noqa: E402

TRAINER = os.path.join(os.path.dirname(__file__), "_jax_dist_trainer.py")
STEPS, SAVE_EVERY = 6, 2
KILLS = int(os.environ.get("UNICKPT_JAX_KILLS", "0"))
PHASES = ("plan", "write", "report", "commit", "after")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Environment for the jobs: one persistent compilation cache for the whole module."""
    d = tmp_path_factory.mktemp("jax_cache")
    return {"JAX_COMPILATION_CACHE_DIR": str(d), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.fixture(scope="module")
def reference_job(tmp_path_factory, cache):
    """The uninterrupted run (no checkpointing at all); the same job then runs the linen
    TrainState check (one launch for both: each launch starts JAX in 2 processes)."""
    d = tmp_path_factory.mktemp("reference")
    launch_jax(TRAINER, {"root": str(d / "run"), "out": str(d / "final"), "steps": STEPS,
                         "save_every": SAVE_EVERY, "checkpoint": False,
                         "linen": {"root": str(d / "linen_run"), "out": str(d / "linen")}},
               env=cache, timeout=240)
    return d


@pytest.fixture(scope="module")
def reference(reference_job):
    """The final state of the uninterrupted run."""
    return unickpt.load(reference_job / "final")


def committed(root: str) -> list[int]:
    if not os.path.isdir(root):
        return []
    with unickpt.CheckpointManager(root) as mgr:
        return [c.step for c in mgr.checkpoints()]


def run_with_kills(kills: list[tuple[int, str, int]], cache: dict) -> dict:
    with tempfile.TemporaryDirectory() as d:
        cfg = {"root": os.path.join(d, "run"), "out": os.path.join(d, "final"),
               "steps": STEPS, "save_every": SAVE_EVERY, "timeout": 60}
        for step, phase, process in kills:
            before = committed(cfg["root"])
            fires = step > max(before, default=0)  # a step already saved is not trained again
            r = launch_jax(TRAINER, {**cfg, "kill": {"step": step, "phase": phase,
                                                     "process": process}},
                           env=cache, timeout=240, check=not fires)
            if not fires:
                continue
            assert r.codes == [-9, -9], (r.codes, [o[-2000:] for o in r.outputs])
            after = committed(cfg["root"])
            assert not os.path.exists(cfg["out"])
            if phase in ("plan", "write", "report"):  # killed mid-save: nothing of it committed
                assert step not in after and max(after, default=0) == step - SAVE_EVERY, \
                    (step, phase, after)
            elif phase == "after" or process == 0:  # rank 0 commits before it broadcasts
                assert after[-1] == step, (step, phase, process, after)
        launch_jax(TRAINER, cfg, env=cache, timeout=240)
        assert committed(cfg["root"])[-1] == STEPS
        return unickpt.load(cfg["out"])


kill_points = st.tuples(st.sampled_from(range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)),
                        st.sampled_from(PHASES), st.integers(0, 1))


@settings(max_examples=max(KILLS, 1), deadline=None, database=None, derandomize=True,
          phases=(Phase.explicit, Phase.generate) if KILLS else (Phase.explicit,),
          suppress_health_check=list(HealthCheck))
@given(kills=st.lists(kill_points, min_size=1, max_size=2))
@example(kills=[(4, "write", 1)])
def test_whole_job_killed_resumes_bitwise(reference, cache, kills):
    assert_bitwise_equal(reference, run_with_kills(kills, cache))


def test_sharded_linen_train_state_restores_bitwise(reference_job):
    """A linen TrainState sharded with nn.with_partitioning over 2 processes x 2 devices:
    saved, restored into a TrainState from another seed, every shard compared in the job
    (tests/_jax_linen_trainer.py, run by the reference job)."""
    out = str(reference_job / "linen")
    found = []
    for p in range(2):
        with open(f"{out}.p{p}.json") as f:
            found.append(json.load(f))
    # step, 2 x (kernel, bias) params, adamw's count and 2 x 4 moments: 14 leaves spanning
    # both processes, at least the 2 kernels and their 4 moments split over "model" (the
    # compiled step may split a bias too); each process compared its 2 devices' shards of each
    assert [f["compared"] for f in found] == [28, 28]
    assert [f["spanning"] for f in found] == [14, 14]
    assert found[0]["split"] == found[1]["split"] >= 6
    assert unickpt.inspect(reference_job / "linen_run" / "step_2").total_bytes > 0
