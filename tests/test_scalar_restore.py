"""Python scalars and 0-d arrays of the same kind restore into each other (issue: a linen
TrainState could not resume), in the neutral path and in both adapters."""

from __future__ import annotations

import numpy as np
import pytest

import unickpt
from unickpt.errors import IncompatibleCheckpointError
from unickpt.state import restore_tree, to_tree
from unickpt.testing import assert_trees_equal
from unickpt.tree import convert_scalar


@pytest.mark.parametrize("value, like, expected", [
    (np.array(7, np.int32), 0, 7),
    (np.uint64(2**63), 0, 2**63),
    (np.array(True), False, True),
    (np.array(0.1, np.float32), 0.0, float(np.float32(0.1))),
    (5, np.zeros((), np.int16), np.int16(5)),
    (0.5, np.float32(0), np.float32(0.5)),
    (float("nan"), np.zeros((), np.float64), np.float64("nan")),
])
def test_convert_scalar_takes_the_targets_form_exactly(value, like, expected):
    ok, got = convert_scalar(value, like)
    assert ok and type(got) is type(expected if not isinstance(like, np.ndarray) else like)
    assert np.array_equal(got, expected, equal_nan=True)
    if isinstance(like, (np.ndarray, np.generic)):
        assert got.dtype == like.dtype


@pytest.mark.parametrize("value, like", [
    (np.array(1.5, np.float32), 0),        # float into int
    (np.array(1, np.int32), 0.0),          # int into float: another kind
    (np.array(1, np.int32), True),
    (300, np.zeros((), np.uint8)),         # does not fit
    (0.1, np.zeros((), np.float32)),       # not exact in float32
    (np.zeros(1, np.int32), 0),            # not 0-d
])
def test_convert_scalar_refuses_other_kinds_and_inexact_values(value, like):
    assert convert_scalar(value, like) == (False, None)


def test_neutral_path_restores_scalars_and_0d_arrays_into_each_other(tmp_path):
    path = tmp_path / "ck"
    unickpt.save(path, {"step": np.array(3, np.int32), "n": 4, "lr": np.float32(0.5)})
    ck = unickpt.load(path)
    out = restore_tree({"step": 0, "n": np.zeros((), np.int64), "lr": 0.0}, ck)
    assert out["step"] == 3 and type(out["step"]) is int
    assert out["n"].dtype == np.int64 and out["n"] == 4
    assert out["lr"] == 0.5 and type(out["lr"]) is float
    with pytest.raises(IncompatibleCheckpointError, match=r"step: target is a float, checkpoint "
                       r"has an array int32\[\] \(a Python scalar and a 0-d array restore into "
                       r"each other only when both are bool, both integer or both floating"):
        restore_tree({"step": 0.0, "n": 0, "lr": 0.0}, ck)


def test_torch_0d_tensor_takes_a_saved_python_scalar():
    torch = pytest.importorskip("torch")
    step = torch.zeros((), dtype=torch.int64)
    tree, _ = to_tree({"step": 12})
    assert restore_tree({"step": step}, tree)["step"] is step and int(step) == 12
    with pytest.raises(IncompatibleCheckpointError, match="step: target is a tensor int64"):
        restore_tree({"step": step}, {"step": 1.5})
    assert int(step) == 12


def test_linen_train_state_resumes_after_a_jitted_apply_gradients(tmp_path):
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    linen = pytest.importorskip("flax.linen")
    import jax.numpy as jnp
    from flax.training import train_state

    model = linen.Dense(3)

    def create(seed):
        params = model.init(jax.random.key(seed), jnp.ones((1, 2)))["params"]
        return train_state.TrainState.create(apply_fn=model.apply, params=params,
                                             tx=optax.adam(1e-2))

    @jax.jit
    def step(state, x):
        def loss(p):
            return jnp.sum(state.apply_fn({"params": p}, x) ** 2)
        return state.apply_gradients(grads=jax.grad(loss)(state.params))

    state = step(create(0), jnp.ones((4, 2)))
    assert isinstance(state.step, jax.Array) and state.step.dtype == jnp.int32
    unickpt.save(tmp_path / "ck", {"train_state": state})
    fresh = create(1)
    assert type(fresh.step) is int
    restored = restore_tree({"train_state": fresh}, unickpt.load(tmp_path / "ck"))["train_state"]
    assert restored.step == 1
    assert_trees_equal(restored.params, state.params)
    assert_trees_equal(restored.opt_state, state.opt_state)
    # Training on from the restored state matches training on from the original, bit for bit.
    assert_trees_equal(step(restored, jnp.ones((4, 2))),
                                       step(state, jnp.ones((4, 2))))


def test_any_mapping_is_a_node_in_save_restore_and_compare(tmp_path):
    import collections
    import types

    from unickpt.errors import UnsupportedLeafError

    state = {"od": collections.OrderedDict(w=np.ones(2), b=np.zeros(1)),
             "proxy": types.MappingProxyType({"n": 3})}
    unickpt.save(tmp_path / "ck", state)
    ck = unickpt.load(tmp_path / "ck")
    assert ck == {"od": {"w": ck["od"]["w"], "b": ck["od"]["b"]}, "proxy": {"n": 3}}
    assert list(ck["od"]) == ["w", "b"]
    target = {"od": collections.OrderedDict(w=np.zeros(2), b=np.ones(1)), "proxy": {"n": 0}}
    out = restore_tree(target, ck)
    assert type(out["od"]) is collections.OrderedDict and out["proxy"] == {"n": 3}
    assert_trees_equal(out["od"], state["od"])
    assert_trees_equal(state, {"od": {"w": np.ones(2), "b": np.zeros(1)}, "proxy": {"n": 3}})
    with pytest.raises(UnsupportedLeafError, match=r"^cannot compare od/x: builtins.object"):
        assert_trees_equal({"od": collections.OrderedDict(x=object())}, {"od": {"x": 1}})


def test_a_torch_state_dict_saves_and_compares():
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(2, 2)
    sd = model.state_dict()
    assert isinstance(sd, collections_ordered_dict())
    tree, _ = to_tree({"model": sd})
    assert sorted(tree["model"]) == ["bias", "weight"]
    assert_trees_equal(sd, model)


def collections_ordered_dict():
    import collections

    return collections.OrderedDict
