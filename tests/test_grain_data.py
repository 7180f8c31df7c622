"""A Grain DataLoader iterator inside a real JAX training loop, interrupted mid-epoch.

The iterator is saved through its ``get_state()`` (Grain returns JSON bytes: plain data, no
pickle) and restored with ``set_state()`` into the iterator of a freshly built loader.  The
resumed run must see exactly the remaining batches and end with bitwise equal parameters.
"""

from __future__ import annotations

import numpy as np
import pytest

import unickpt

gp = pytest.importorskip("grain.python")
jax = pytest.importorskip("jax")
jnp = jax.numpy

N, BATCH, EPOCHS = 11, 3, 3


class Source:
    """A random-access source: record ``i`` is its index and a feature vector."""

    def __len__(self) -> int:
        return N

    def __repr__(self) -> str:  # Grain checks the source by repr(): no memory address
        return f"Source(n={N})"

    def __getitem__(self, i: int):
        return {"idx": np.int64(i), "x": np.full(4, float(i), np.float32),
                "y": np.float32(i % 3)}


class Noise(gp.RandomMapTransform):
    def random_map(self, element, rng: np.random.Generator):
        return {**element, "x": element["x"] + rng.random(4, dtype=np.float32)}


def make_iterator():
    sampler = gp.IndexSampler(N, shard_options=gp.NoSharding(), shuffle=True,
                              num_epochs=EPOCHS, seed=11)
    loader = gp.DataLoader(data_source=Source(), sampler=sampler,
                           operations=[Noise(), gp.Batch(BATCH)], worker_count=0)
    return iter(loader)


@jax.jit
def sgd_step(params, x, y):
    def loss(p):
        return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)
    grads = jax.grad(loss)(params)
    return jax.tree.map(lambda p, g: p - 0.01 * g, params, grads)


def train(root, stop: int | None = None):
    params = {"w": jnp.zeros(4, jnp.float32), "b": jnp.zeros((), jnp.float32)}
    it = make_iterator()
    state = {"params": params, "data": it}
    seen = []
    with unickpt.CheckpointManager(root, resume="auto", save_every=1, keep_last=2) as mgr:
        restored = mgr.restore(state)
        step, params = restored.step, restored.state["params"]
        for batch in it:  # the iterator spans all epochs (num_epochs in the sampler)
            params = sgd_step(params, batch["x"], batch["y"])
            step += 1
            seen.append(batch["idx"].tolist())
            state["params"] = params
            mgr.save(step, state)
            if step == stop:
                return seen, None
    return seen, jax.tree.map(np.asarray, params)


@pytest.mark.parametrize("stop", [2, 6])
def test_grain_iterator_resumes_exactly_the_remaining_batches(tmp_path, stop):
    ref, p_ref = train(tmp_path / "ref")
    first, _ = train(tmp_path / "run", stop=stop)
    assert first == ref[:stop]
    rest, p = train(tmp_path / "run")
    assert rest == ref[stop:]
    for k in p_ref:
        assert p[k].tobytes() == p_ref[k].tobytes()


def test_grain_state_is_stored_as_plain_bytes(tmp_path):
    it = make_iterator()
    next(it)
    tree, kinds = unickpt.state.to_tree({"data": it})
    assert isinstance(tree["data"], bytes) and kinds[("data",)].startswith("get_state:")
