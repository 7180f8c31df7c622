"""One process of a sharded NNX training job (2 processes x 2 CPU devices) for the kill tests.

Run as ``python _jax_dist_trainer.py CONFIG_JSON PROCESS_ID`` through tests/_jax_launch.py.
CONFIG: ``port``, ``processes``, ``root`` (the run root), ``out`` (where process 0 writes the
final state), ``steps``, ``save_every``, ``timeout`` and an optional ``kill``:
``{"step": S, "phase": "plan"|"write"|"report"|"commit"|"after", "process": P}``: process P
SIGKILLs the whole job (its process group) when the save of step S reaches that phase
("write": while P writes its array file; "after": once step S is saved).  An optional ``linen``: ``{"root": ..., "out": ...}`` runs the linen
``TrainState`` check of tests/_jax_linen_trainer.py in this job once training is done.

The model: an ``nnx`` MLP with dropout whose kernels are sharded with
``nnx.with_partitioning`` over a (2, 2) mesh ("data", "model"); the optimizer is
``optax.chain(optax.clip_by_global_norm, optax.adamw(schedule))`` (its moments sharded like
the parameters); the data order comes from a typed PRNG key (``jax.random.key``); each
process also keeps a position of its own (``get_state``/``set_state``, like a Grain
iterator), checked at the end.  Every process calls the same
``CheckpointManager(resume="auto")`` methods.  At the end process 0
writes the whole state, gathered to host (numpy), with ``unickpt.save`` to ``out``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

N_DATA, D_IN, HIDDEN, BATCH = 32, 4, 8, 8


class Position:
    """A per-process data position (advances by ``process id + 1`` per step)."""

    def __init__(self, pid: int, bomb_at: int | None):
        self.pid, self.pos, self.step, self.bomb_at = pid, 0, 0, bomb_at

    def advance(self) -> None:
        self.step += 1
        self.pos += self.pid + 1

    def get_state(self) -> dict:
        st: dict = {"pos": self.pos, "step": self.step}
        if self.step == self.bomb_at:  # kill the job while this process writes its file
            import numpy as np

            from unickpt.tree import LazyArray

            st["bomb"] = LazyArray((1,), np.dtype(np.float32), _kill_job)
        return st

    def set_state(self, st: dict) -> None:
        self.pos, self.step = int(st["pos"]), int(st["step"])


def _kill_job() -> Any:
    os.killpg(0, signal.SIGKILL)
    raise AssertionError("unreachable")


def _jax() -> Any:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    return jax


def build(seed: int, mesh: Any) -> dict:
    """A fresh, sharded training state (``seed`` differs between a run and a restore target)."""
    jax = _jax()
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    init = nnx.initializers.lecun_normal()

    class Net(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.l1 = nnx.Linear(D_IN, HIDDEN, rngs=rngs,
                                 kernel_init=nnx.with_partitioning(init, (None, "model")),
                                 bias_init=nnx.with_partitioning(
                                     nnx.initializers.zeros_init(), ("model",)))
            self.drop = nnx.Dropout(0.25, rngs=rngs)
            self.l2 = nnx.Linear(HIDDEN, 2, rngs=rngs,
                                 kernel_init=nnx.with_partitioning(init, ("model", None)))

        def __call__(self, x: Any) -> Any:
            return self.l2(self.drop(nnx.relu(self.l1(x))))

    schedule = optax.warmup_cosine_decay_schedule(0.0, 2e-2, 3, 20)
    tx = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(schedule, weight_decay=1e-2))

    @nnx.jit
    def create() -> tuple:
        model = Net(nnx.Rngs(seed, dropout=seed + 1))
        opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
        # place every variable as its partitioning annotation says (none: replicated)
        for obj in (model, opt):
            state = nnx.state(obj)
            nnx.update(obj, jax.lax.with_sharding_constraint(
                state, nnx.get_named_sharding(state, mesh)))
        # the data-order key: made here, so that it is one array over every process's devices
        key = jax.lax.with_sharding_constraint(jax.random.key(seed + 2), NamedSharding(mesh, P()))
        return model, opt, key

    with jax.set_mesh(mesh):  # flax shards annotated variables on the mesh in context
        model, opt, key = create()
    return {"model": model, "opt": opt, "data_key": key, "step": 0}


def _train_step() -> Any:
    jax = _jax()
    import jax.numpy as jnp
    from flax import nnx

    @nnx.jit
    def step(model: Any, opt: Any, data_key: Any) -> Any:
        kx, kw = jax.random.split(jax.random.key(10_000))
        x = jax.random.normal(kx, (N_DATA, D_IN))
        y = jnp.sin(x @ jax.random.normal(kw, (D_IN, 2)))
        data_key, sub = jax.random.split(data_key)
        idx = jax.random.permutation(sub, N_DATA)[:BATCH]

        def loss(m: Any) -> Any:
            return ((m(x[idx]) - y[idx]) ** 2).mean()

        opt.update(model, nnx.grad(loss)(model))
        return data_key

    return step


def arm_kill(mgr: Any, kill: dict | None, pid: int) -> None:
    """SIGKILL the whole job when the save of ``kill["step"]`` reaches ``kill["phase"]``."""
    if not kill or kill["process"] != pid or kill["phase"] in ("after", "write"):
        return
    coord = mgr.coordinator
    name = "broadcast" if kill["phase"] == "commit" else "all_gather"
    real = getattr(coord, name)
    target = f"save step_{kill['step']}: {kill['phase']}"

    def wrapped(phase: str, *a: Any, **k: Any) -> Any:
        if phase == target:
            os.killpg(0, signal.SIGKILL)
        return real(phase, *a, **k)

    setattr(coord, name, wrapped)


def host_tree(state: dict) -> dict:
    """The whole state as numpy, gathered from every process (typed keys as key data)."""
    jax = _jax()
    from flax import nnx
    from jax.experimental import multihost_utils

    def leaf(x: Any) -> Any:
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return x

    tree = {"model": nnx.state(state["model"]).to_pure_dict(),
            "opt": nnx.state(state["opt"]).to_pure_dict(),
            "data_key": state["data_key"]}
    tree = jax.tree_util.tree_map(leaf, tree)
    tree = multihost_utils.process_allgather(tree, tiled=True)
    import numpy as np

    return {**jax.tree_util.tree_map(np.asarray, tree), "step": state["step"]}


def _t(msg: str) -> None:
    if os.environ.get("UNICKPT_TRAINER_TIMING"):
        import time

        print(f"[{time.monotonic() - _T0:.2f}s] {msg}", flush=True)


def main(cfg: dict, pid: int) -> None:
    _t("start")
    jax = _jax()
    jax.distributed.initialize(f"127.0.0.1:{cfg['port']}", num_processes=cfg["processes"],
                               process_id=pid, initialization_timeout=60)
    import unickpt

    auto = jax.sharding.AxisType.Auto  # shardings from annotations, propagated by the compiler
    _t("initialized")
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(auto, auto))
    step_fn = _train_step()
    mgr = None
    kill = cfg.get("kill")
    bomb_at = kill["step"] if kill and kill["phase"] == "write" and kill["process"] == pid \
        else None
    if cfg.get("checkpoint", True):
        mgr = unickpt.CheckpointManager(cfg["root"], resume="auto",
                                        save_every=cfg["save_every"], keep_last=2,
                                        dist_timeout=cfg.get("timeout", 60))
        arm_kill(mgr, cfg.get("kill"), pid)
        # a resumed run restores into a state built from another seed: whatever the restore
        # missed would differ from the uninterrupted run
        resume = mgr.resolve_start().resume
        state = mgr.restore(
            {**build(1000 if resume else 0, mesh), "data": Position(pid, bomb_at)}).state
    else:
        state = {**build(0, mesh), "data": Position(pid, None)}
    _t("built")
    if state["data"].step != state["step"]:
        raise AssertionError(f"process {pid}: position {state['data'].step} restored with "
                             f"step {state['step']}")
    while state["step"] < cfg["steps"]:
        key = step_fn(state["model"], state["opt"], state["data_key"])
        state["data"].advance()
        state = {**state, "data_key": key, "step": state["step"] + 1}
        if mgr is not None:
            mgr.save(state["step"], state)
        _t(f"step {state['step']}")
        if kill and kill["phase"] == "after" and state["step"] == kill["step"] \
                and kill["process"] == pid:
            os.killpg(0, signal.SIGKILL)
    if mgr is not None:
        mgr.close()
    if state["data"].pos != cfg["steps"] * (pid + 1):
        raise AssertionError(f"process {pid}: position {state['data'].pos}")
    final = host_tree(state)
    _t("gathered")
    if pid == 0:
        unickpt.save(cfg["out"], final, overwrite=True)
    _t("saved")
    if cfg.get("linen"):  # the linen TrainState case, in this job (tests/_jax_linen_trainer.py)
        from _jax_linen_trainer import run

        run(cfg["linen"]["root"], cfg["linen"]["out"], pid)
    jax.distributed.shutdown()
    _t("shut down")


if __name__ == "__main__":
    import time

    _T0 = time.monotonic()
    main(json.loads(sys.argv[1]), int(sys.argv[2]))
