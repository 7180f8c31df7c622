"""One process of a sharded linen ``TrainState`` job (2 processes x 2 CPU devices) for the tests.

Run as ``python _jax_linen_trainer.py CONFIG_JSON PROCESS_ID`` through tests/_jax_launch.py
(CONFIG: ``port``, ``processes``, ``root``, ``out``), or :func:`run` inside another job (the
NNX job of tests/_jax_dist_trainer.py runs it after its reference run: one launch less).  The job trains two steps of a linen MLP
whose kernels are sharded with ``nn.with_partitioning`` over a (2, 2) mesh (the ``TrainState``
built by ``jax.jit`` with the shardings ``nn.get_partition_spec`` gives, ``optax.adamw``
moments sharded like the parameters), saves it with a ``CheckpointManager``, restores it into
a ``TrainState`` built from another seed, and checks every addressable shard of every leaf
bit for bit, shardings included.  Each process writes ``{out}.p{PROCESS_ID}.json`` with the
number of shards it compared.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def compare(saved: Any, got: Any, target: Any) -> int:
    """Check every restored leaf against the saved one; return the shards compared."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    want_leaves = jax.tree_util.tree_leaves_with_path(saved)
    got_leaves = jax.tree_util.tree_leaves(got)
    target_leaves = jax.tree_util.tree_leaves(target)
    if not len(want_leaves) == len(got_leaves) == len(target_leaves):
        raise AssertionError(f"{len(got_leaves)} leaves restored, {len(want_leaves)} saved")
    compared = 0
    for (path, a), b, t in zip(want_leaves, got_leaves, target_leaves):
        name = jax.tree_util.keystr(path)
        # the target's sharding (the compiled step may place a leaf otherwise than init did)
        if not isinstance(b, jax.Array) or b.sharding != t.sharding or b.dtype != a.dtype:
            raise AssertionError(f"{name}: {type(b).__name__} {getattr(b, 'sharding', None)}")
        full_a = np.asarray(multihost_utils.process_allgather(a, tiled=True))
        for y in b.addressable_shards:
            if np.asarray(y.data).tobytes() != full_a[y.index].tobytes():
                raise AssertionError(f"{name}: shard {y.index} differs")
            compared += 1
    return compared


def main(cfg: dict, pid: int) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{cfg['port']}", num_processes=cfg["processes"],
                               process_id=pid, initialization_timeout=60)
    run(cfg["root"], cfg["out"], pid)
    jax.distributed.shutdown()


def run(root: str, out: str, pid: int) -> None:
    """The save / restore / check, in a job already initialized (also run by the NNX job)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax
    from flax.training import train_state
    from jax.sharding import NamedSharding

    import unickpt

    auto = jax.sharding.AxisType.Auto
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(auto, auto))
    lecun = nn.initializers.lecun_normal()

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            x = nn.Dense(8, kernel_init=nn.with_partitioning(lecun, (None, "model")))(x)
            return nn.Dense(2, kernel_init=nn.with_partitioning(lecun, ("model", None)))(
                nn.relu(x))

    model = MLP()
    tx = optax.adamw(1e-2, weight_decay=1e-2)

    def create(seed: int) -> Any:
        def init(key: Any) -> Any:
            params = model.init(key, jnp.ones((1, 4)))["params"]
            return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

        key = jax.random.key(seed)
        specs = nn.get_partition_spec(jax.eval_shape(init, key))
        shardings = jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs)
        return jax.jit(init, out_shardings=shardings)(key)

    @jax.jit
    def step(state: Any) -> Any:
        x = jnp.linspace(-1.0, 1.0, 32).reshape(8, 4)

        def loss(p: Any) -> Any:
            return ((state.apply_fn({"params": p}, x) - 0.5) ** 2).mean()

        return state.apply_gradients(grads=jax.grad(loss)(state.params))

    state = create(0)
    for _ in range(2):
        state = step(state)
    with unickpt.CheckpointManager(root, dist_timeout=60) as mgr:
        mgr.save(2, {"state": state}, force=True)
    fresh = create(1)
    with unickpt.CheckpointManager(root, resume="auto", dist_timeout=60) as mgr:
        restored = mgr.restore({"state": fresh})
    got = restored.state["state"]
    if restored.step != 2 or int(got.step) != 2:
        raise AssertionError(f"restored step {restored.step}, state.step {got.step}")
    compared = compare(state, got, fresh)
    want_leaves = jax.tree_util.tree_leaves_with_path(state)
    with open(f"{out}.p{pid}.json", "w") as f:
        json.dump({"compared": compared,
                   "spanning": sum(not a.is_fully_addressable for _, a in want_leaves),
                   "split": sum(not a.sharding.is_fully_replicated for _, a in want_leaves)},
                  f)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]), int(sys.argv[2]))
