"""Linen runs (params + optax state, or a TrainState) cannot be migrated: migrate refuses
with the layout to use, never a report listing the same keys as missing and unexpected."""

from __future__ import annotations

import pytest

import unickpt
from unickpt.migration import MigrationError

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
linen = pytest.importorskip("flax.linen")
torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402
from flax.training import train_state  # noqa: E402


def _linen_state():
    model = linen.Dense(3)
    params = model.init(jax.random.key(0), jnp.ones((1, 2)))["params"]
    return train_state.TrainState.create(apply_fn=model.apply, params=params,
                                         tx=optax.adam(1e-2))


def _torch_target():
    model = torch.nn.Linear(2, 3)
    return {"model": model, "optimizer": torch.optim.Adam(model.parameters(), lr=1e-2)}


@pytest.mark.parametrize("layout", ["train_state", "params_and_opt_state"])
def test_linen_layouts_are_refused_with_the_layout_to_use(tmp_path, layout):
    ts = _linen_state()
    state = ({"train_state": ts, "step": 0} if layout == "train_state" else
             {"model": ts.params, "optimizer": ts.opt_state, "step": 0})
    unickpt.save(tmp_path / "src" / "step_0", state)
    with pytest.raises(MigrationError) as e:
        unickpt.migrate(tmp_path / "src" / "step_0", tmp_path / "dst", to="torch",
                        target=_torch_target())
    msg = str(e.value)
    assert msg.startswith("cannot migrate to torch: the target's model, optimizer needs a "
                          "model/optimizer object in the source checkpoint, which holds ")
    assert "an nnx.Module and an nnx.Optimizer" in msg and "TrainState" in msg
    if layout == "train_state":
        assert "train_state: jax:pytree:flax.training.train_state.TrainState" in msg
    else:
        assert "model: a plain tree" in msg
    assert "unexpected" not in msg and not (tmp_path / "dst").exists()
