"""Bitwise-identical resumption of Flax NNX + optax training (hypothesis property tests).

An interrupted run (saved at several points, every live object thrown away, rebuilt from a
*different* seed and restored from the checkpoint) must end bit for bit where the
uninterrupted run ends: parameters, batch statistics, optimizer state, dropout RNG streams,
data-shuffling key and step.  Also: a real SIGKILL of a training subprocess, and a sharded
variant on 8 virtual CPU devices.

``python tests/test_jax_resume.py train ROOT STEPS [KILL_AT]`` is the subprocess entry point.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import warnings

if __name__ == "__main__":
    # A child process: warnings are errors here as in the pytest process (same exceptions as
    # pyproject's filterwarnings), so a warning in a subprocess fails its test.
    warnings.simplefilter("error")
    for _mod in ("jax", "flax", "orbax"):
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=f"{_mod}.*")

import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import unickpt  # noqa: E402
from unickpt.state import restore_tree  # noqa: E402
from unickpt.testing import assert_trees_equal  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_DATA, D_IN = 32, 3

# One optax object per name, created once: the transformation is a static part of the
# optimizer's graph, so reusing the object reuses the compiled training step.
OPTIMIZERS = {
    "sgd": optax.sgd(0.05),
    "momentum": optax.sgd(0.05, momentum=0.9),
    "adam": optax.adam(1e-2),
    "adamw": optax.adamw(1e-2, weight_decay=1e-2),
    "clip_chain": optax.chain(optax.clip_by_global_norm(0.5), optax.adam(1e-2)),
    "schedule": optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 2e-2, 3, 20)),
}


class Net(nnx.Module):
    def __init__(self, hidden: int, dropout: float, rngs: nnx.Rngs, dtype=jnp.float32):
        kw = {"dtype": dtype, "param_dtype": dtype}
        self.l1 = nnx.Linear(D_IN, hidden, rngs=rngs, **kw)
        self.bn = nnx.BatchNorm(hidden, rngs=rngs, **kw)
        # flax keeps batch statistics in float32 whatever param_dtype says; a 64-bit run
        # keeps them in 64-bit too (updating float32 stats from float64 activations raises a
        # JAX FutureWarning: scatter cannot safely cast float64 to float32)
        for stat in ("mean", "var"):
            setattr(self.bn, stat, nnx.BatchStat(getattr(self.bn, stat)[...].astype(dtype)))
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.l2 = nnx.Linear(hidden, 1, rngs=rngs, **kw)

    def __call__(self, x):
        return self.l2(self.drop(nnx.relu(self.bn(self.l1(x)))))


def dataset(seed: int):
    kx, kw = jax.random.split(jax.random.key(10_000 + seed))
    x = jax.random.normal(kx, (N_DATA, D_IN))
    return x, jnp.sin(x @ jax.random.normal(kw, (D_IN, 1)))


def build(cfg: dict, seed: int) -> dict:
    """A fresh training state; ``seed`` differs between the run and the restore target."""
    model = Net(cfg["hidden"], cfg["dropout"], nnx.Rngs(seed, dropout=seed + 1),
                dtype=jnp.dtype(cfg.get("dtype", "float32")))
    opt = nnx.Optimizer(model, OPTIMIZERS[cfg["opt"]], wrt=nnx.Param)
    return {"model": model, "opt": opt, "data_key": jax.random.key(seed + 2), "step": 0}


@nnx.jit(static_argnums=4)
def train_step(model, opt, data_key, data, batch):
    x, y = data
    data_key, sub = jax.random.split(data_key)
    idx = jax.random.permutation(sub, N_DATA)[:batch]  # shuffled batch drawn from the state key

    def loss(m):
        return ((m(x[idx]) - y[idx]) ** 2).mean()

    opt.update(model, nnx.grad(loss)(model))
    return data_key


def train(state: dict, data, batch: int, until: int) -> dict:
    key = state["data_key"]
    for _ in range(state["step"], until):
        key = train_step(state["model"], state["opt"], key, data, batch)
    return {**state, "data_key": key, "step": max(until, state["step"])}


def comparable(state: dict) -> dict:
    """What must match after a bitwise resume: params, RNG streams, optimizer state, data key,
    step (compared by unickpt.testing.assert_trees_equal through the JAX adapter)."""
    return {k: state[k] for k in ("model", "opt", "data_key", "step")}


def resume(cfg: dict, root: str, seed: int) -> tuple[dict, int]:
    """A 'new process': build from another seed, restore the newest checkpoint of ``root``."""
    with unickpt.CheckpointManager(root) as mgr:
        restored = mgr.restore(build(cfg, seed + 1000))
    assert restored.resumed
    return restored.state, restored.step


def run_case(cfg: dict, seed: int, batch: int, total: int, stops: list[int]) -> None:
    data = dataset(seed)
    reference = train(build(cfg, seed), data, batch, total)
    with tempfile.TemporaryDirectory() as root:
        state = build(cfg, seed)
        for stop in stops:
            state = train(state, data, batch, stop)
            with unickpt.CheckpointManager(root, keep_last=2) as mgr:
                assert mgr.save(stop, state, force=True)
            del state  # the crash: nothing survives but the checkpoint
            state, step = resume(cfg, root, seed)
            assert state["step"] == step == stop
        state = train(state, data, batch, total)
    assert_trees_equal(comparable(state), comparable(reference))


configs = st.fixed_dictionaries({
    "hidden": st.sampled_from([4, 8]),
    "dropout": st.sampled_from([0.0, 0.25]),
    "opt": st.sampled_from(sorted(OPTIMIZERS)),
})


@settings(max_examples=int(os.environ.get("UNICKPT_JAX_EXAMPLES", "6")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs, seed=st.integers(0, 2**16), batch=st.sampled_from([4, 8]),
       total=st.integers(4, 9), data=st.data())
def test_interrupted_training_resumes_bitwise(cfg, seed, batch, total, data):
    stops = data.draw(st.lists(st.integers(1, total - 1), min_size=1, max_size=3, unique=True)
                      .map(sorted), label="interruption points")
    run_case(cfg, seed, batch, total, stops)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_resumes_bitwise(name):
    run_case({"hidden": 4, "dropout": 0.25, "opt": name}, seed=3, batch=4, total=6, stops=[2, 4])


def test_restore_without_rng_streams_would_diverge():
    """The property above is not vacuous: skipping the dropout stream changes the run."""
    cfg = {"hidden": 4, "dropout": 0.25, "opt": "adam"}
    data = dataset(0)
    reference = train(build(cfg, 0), data, 4, 4)
    with tempfile.TemporaryDirectory() as root:
        state = train(build(cfg, 0), data, 4, 2)
        unickpt.save(os.path.join(root, "step_2"), state)
        fresh = build(cfg, 1000)
        ck = unickpt.load(os.path.join(root, "step_2"))  # by hand: drop a subtree
        del ck["model"]["drop"]
        state = restore_tree(fresh, ck, strict=False)
        state = train(state, data, 4, 4)
    with pytest.raises(AssertionError):
        assert_trees_equal(comparable(state), comparable(reference))


# ------------------------------------------------------------------ hard kill (subprocess)
KILL_CFG = {"hidden": 8, "dropout": 0.25, "opt": "schedule"}


def _train_main(root: str, total: int, kill_at: int | None) -> None:
    data = dataset(7)
    with unickpt.CheckpointManager(root, save_every=3, keep_last=2) as mgr:
        restored = mgr.restore(build(KILL_CFG, 7))
        state = restored.state
        for step in range(state["step"] + 1, total + 1):
            state = train(state, data, 4, step)
            if kill_at is not None and step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # a real, uncatchable kill
            mgr.save(step, state, force=step == total)


def _child(args: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess:
    """Run this file as a child (warnings are errors there); its stderr must hold no warning."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "adapters")]), **env)
    with subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            pytest.fail(f"child {args} timed out after {timeout} s: {err[-2000:]}")
    assert "Warning" not in err, err[-4000:]
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _run(root, total, kill_at=None) -> subprocess.CompletedProcess:
    return _child(["train", str(root), str(total)] + ([str(kill_at)] if kill_at else []), 120)


def test_sigkilled_training_resumes_bitwise(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir()
    run.mkdir()
    _train_main(str(ref), 10, None)  # the uninterrupted reference, in this process
    killed = _run(run, 10, kill_at=8)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    with unickpt.CheckpointManager(run) as mgr:
        assert [c.step for c in mgr.checkpoints()] == [3, 6]  # killed at 8, before its save
    resumed = _run(run, 10)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_trees_equal(unickpt.load(ref / "step_10"), unickpt.load(run / "step_10"))


# ------------------------------------------------------------ sharded (8 virtual devices)
def shard_state(state: dict, mesh) -> dict:
    """Shard hidden units over mesh axis "m" (replicated over "d"); the rest is replicated.

    The placement is the one the compiled step produces, so shardings stay fixed from step to
    step (as in any real sharded training loop) and a fresh restore target matches them.
    """
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    def place(path, x):
        name = jax.tree_util.keystr(path)
        if "'l2'" in name and "'kernel'" in name:
            spec = P("m")
        elif "'l1'" in name and "'kernel'" in name:
            spec = P(None, "m")
        elif x.ndim == 1 and ("'l1'" in name or "'bn'" in name):
            spec = P("m")
        else:
            spec = P()
        return jax.device_put(x, NamedSharding(mesh, spec))

    model = state["model"]
    nnx.update(model, jax.tree_util.tree_map_with_path(place, nnx.state(model)))
    opt = nnx.Optimizer(model, state["opt"].tx, wrt=nnx.Param)
    nnx.update(opt, jax.tree_util.tree_map_with_path(place, nnx.state(opt)))
    return {**state, "opt": opt, "data_key": jax.device_put(
        state["data_key"], NamedSharding(mesh, P()))}


def _sharded_main(examples: int) -> None:
    from jax.sharding import Mesh

    from unickpt.tree import ShardedArray

    assert len(jax.devices()) == 8
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("d", "m"))
    global build
    plain_build = build

    def sharded_build(cfg: dict, seed: int) -> dict:
        return shard_state(plain_build(cfg, seed), mesh)

    build = sharded_build
    kernel = build({"hidden": 8, "dropout": 0.0, "opt": "adam"}, 0)["model"].l1.kernel[...]
    assert len(kernel.sharding.device_set) == 8
    from unickpt.state import to_tree
    assert isinstance(to_tree(kernel)[0], ShardedArray)

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(cfg=configs, seed=st.integers(0, 2**16), batch=st.sampled_from([4, 8]),
           total=st.integers(3, 6), data=st.data())
    def prop(cfg, seed, batch, total, data):
        stops = data.draw(st.lists(st.integers(1, total - 1), min_size=1, max_size=2,
                                   unique=True).map(sorted))
        run_case(cfg, seed, batch, total, stops)

    prop()
    print("SHARDED-RESUME-OK")


def test_sharded_training_resumes_bitwise_on_8_devices():
    r = _child(["sharded", "5"], 180, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "SHARDED-RESUME-OK" in r.stdout


def test_resume_bitwise_with_x64_enabled():
    r = _child(["x64"], 180, JAX_ENABLE_X64="1")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "X64-RESUME-OK" in r.stdout


def _float_dtypes(state: dict) -> set[str]:
    leaves = jax.tree_util.tree_leaves(nnx.state(state["model"])) + \
        jax.tree_util.tree_leaves(nnx.state(state["opt"]))
    return {str(x.dtype) for x in leaves
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)}


def _x64_main() -> None:
    assert jax.config.jax_enable_x64
    assert dataset(0)[0].dtype == jnp.float64
    for name in ("schedule", "clip_chain"):
        cfg = {"hidden": 4, "dropout": 0.25, "opt": name, "dtype": "float64"}
        # the whole run is in 64-bit: data, every parameter, statistic and optimizer slot
        state = train(build(cfg, 0), dataset(0), 4, 1)
        assert _float_dtypes(state) == {"float64"}, _float_dtypes(state)
        run_case(cfg, seed=11, batch=4, total=5, stops=[1, 3])
    print("X64-RESUME-OK")


@pytest.mark.skipif(not any(d.platform == "gpu" for d in jax.devices()) if jax else True,
                    reason="needs a CUDA GPU")
def test_gpu_training_resumes_bitwise():
    for name in ("adamw", "clip_chain"):
        run_case({"hidden": 8, "dropout": 0.25, "opt": name}, seed=5, batch=8, total=6,
                 stops=[2, 5])


if __name__ == "__main__" and sys.argv[1] == "train":
    _train_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else None)
elif __name__ == "__main__" and sys.argv[1] == "sharded":
    _sharded_main(int(sys.argv[2]))
elif __name__ == "__main__" and sys.argv[1] == "x64":
    _x64_main()
