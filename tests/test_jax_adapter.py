"""JAX adapter: arrays, keys, pytree nodes, optax states, Flax NNX and linen objects."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from typing import NamedTuple

import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import unickpt  # noqa: E402
from unickpt.adapters import adapter_for  # noqa: E402
from unickpt.state import restore_tree, to_tree  # noqa: E402
from unickpt.tree import LazyArray  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def roundtrip(tmp_path, state, target, name="c", **kw):
    unickpt.save(tmp_path / name, state)
    return restore_tree(target, unickpt.load(tmp_path / name), **kw)


def bits(x):
    """Bytes of an array (typed keys through their key data) for bit-for-bit comparisons."""
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    a = np.asarray(x)
    return a.dtype.str, a.shape, a.tobytes()


def assert_tree_bits_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert bits(x) == bits(y)


DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, np.int8,
          np.int32, np.uint8, np.uint32, np.bool_]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(), (0, 3), (3, 5)])
def test_array_roundtrip_bit_exact(tmp_path, dtype, shape):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * np.dtype(dtype).itemsize,
                       dtype=np.uint8)
    host = raw.view(np.uint8 if dtype == np.bool_ else dtype).reshape(shape)
    if dtype == np.bool_:
        host = host.astype(bool)
    x = jnp.asarray(host)
    tree, kinds = to_tree({"x": x})
    assert kinds[("x",)] == "jax:Array"
    assert isinstance(tree["x"], LazyArray)  # host copy only when written
    out = roundtrip(tmp_path, {"x": x}, {"x": jnp.zeros(shape, x.dtype)})["x"]
    assert isinstance(out, jax.Array)
    assert bits(out) == bits(x)
    # against the independent expectation: the bytes the test generated, not the adapter's
    # view of them (a conversion bug hitting save and restore alike would pass the above)
    loaded = unickpt.load(tmp_path / "c")["x"]
    assert (loaded.dtype, loaded.shape, loaded.tobytes()) == (host.dtype, shape, host.tobytes())
    assert np.asarray(jax.device_get(out)).tobytes() == host.tobytes()


def test_snapshot_makes_host_copies():
    x = jnp.arange(4.0)
    tree, _ = to_tree({"x": x, "k": jax.random.key(1)}, snapshot=True)
    assert type(tree["x"]) is np.ndarray
    assert type(tree["k"]["key_data"]) is np.ndarray
    assert tree["k"]["impl"] == "threefry2x32"


def test_deleted_array_is_named(tmp_path):
    x = jnp.ones(3)
    x.delete()
    with pytest.raises(unickpt.UnsupportedLeafError,
                       match=r"cannot save opt/mu: the jax.Array has been deleted \(donated"):
        unickpt.save(tmp_path / "c", {"opt": {"mu": x}})
    assert not (tmp_path / "c").exists()


def test_typed_key_roundtrip_and_stream_continues(tmp_path):
    key = jax.random.split(jax.random.key(42), 3)
    out = roundtrip(tmp_path, {"k": key}, {"k": jax.random.split(jax.random.key(0), 3)})["k"]
    assert jax.random.key_impl(out) == jax.random.key_impl(key)
    assert bits(out) == bits(key)
    assert bits(jax.random.normal(out[1], (4,))) == bits(jax.random.normal(key[1], (4,)))


def test_key_impl_mismatch_is_reported(tmp_path):
    unickpt.save(tmp_path / "c", {"k": jax.random.key(1, impl="rbg")})
    with pytest.raises(unickpt.IncompatibleCheckpointError) as e:
        restore_tree({"k": jax.random.key(0)}, unickpt.load(tmp_path / "c"))
    assert "k: PRNG implementation 'rbg' in checkpoint, 'threefry2x32' in target" in str(e.value)
    out = restore_tree({"k": jax.random.key(0, impl="rbg")}, unickpt.load(tmp_path / "c"))
    assert bits(out["k"]) == bits(jax.random.key(1, impl="rbg"))


def test_raw_key_into_typed_target_is_a_mismatch(tmp_path):
    unickpt.save(tmp_path / "c", {"k": jax.random.PRNGKey(3)})
    with pytest.raises(unickpt.IncompatibleCheckpointError) as e:
        restore_tree({"k": jax.random.key(0)}, unickpt.load(tmp_path / "c"))
    assert "a raw uint32 key was saved" in str(e.value)
    out = restore_tree({"k": jax.random.PRNGKey(0)}, unickpt.load(tmp_path / "c"))
    assert bits(out["k"]) == bits(jax.random.PRNGKey(3))


def test_shape_dtype_struct_target(tmp_path):
    x = jnp.arange(6, dtype=jnp.int32).reshape(2, 3)
    target = {"x": jax.ShapeDtypeStruct((2, 3), jnp.int32),
              "k": jax.eval_shape(lambda: jax.random.key(0))}
    out = roundtrip(tmp_path, {"x": x, "k": jax.random.key(5)}, target)
    assert bits(out["x"]) == bits(x) and bits(out["k"]) == bits(jax.random.key(5))
    with pytest.raises(unickpt.UnsupportedLeafError, match="ShapeDtypeStruct has no values"):
        unickpt.save(tmp_path / "d", {"x": target["x"]})


class Pair(NamedTuple):
    a: jax.Array
    b: int


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Box:
    w: jax.Array
    n: np.ndarray
    tag: str = dataclasses.field(metadata={"static": True}, default="x")


@jax.tree_util.register_pytree_node_class
class Positional:
    def __init__(self, *xs):
        self.xs = xs

    def tree_flatten(self):
        return self.xs, None

    @classmethod
    def tree_unflatten(cls, aux, xs):
        return cls(*xs)


def test_pytree_nodes_keep_their_types(tmp_path):
    state = {"p": Pair(jnp.ones(2), 3), "box": Box(jnp.arange(3.0), np.int64(2**40), "saved"),
             "pos": Positional(jnp.zeros(1), jnp.ones(2, jnp.int32))}
    tree, kinds = to_tree(state)
    assert kinds[("p",)] == f"jax:pytree:{__name__}.Pair"
    assert set(tree["p"]) == {"a", "b"} and tree["p"]["b"] == 3
    assert set(tree["box"]) == {"w", "n"}  # static fields are not saved
    assert isinstance(tree["pos"], list) and len(tree["pos"]) == 2
    target = {"p": Pair(jnp.zeros(2), 0), "box": Box(jnp.zeros(3), np.int64(0), "target"),
              "pos": Positional(jnp.ones(1), jnp.zeros(2, jnp.int32))}
    out = roundtrip(tmp_path, state, target)
    assert type(out["p"]) is Pair and out["p"].b == 3
    assert type(out["box"]) is Box and out["box"].tag == "target"
    assert type(out["box"].n) is np.int64 and out["box"].n == 2**40  # never through jnp
    assert type(out["pos"]) is Positional
    assert_tree_bits_equal(out["p"], state["p"])
    assert_tree_bits_equal(out["pos"], state["pos"])


def test_linen_frozen_dict_variables(tmp_path):
    from flax.core import freeze

    v = freeze({"params": {"w": jnp.arange(2.0)}, "batch_stats": {"m": jnp.ones(1)}})
    tree, kinds = to_tree({"v": v})
    assert kinds[("v",)] == "jax:pytree:flax.core.frozen_dict.FrozenDict"
    assert set(tree["v"]) == {"params", "batch_stats"}
    target = freeze({"params": {"w": jnp.zeros(2)}, "batch_stats": {"m": jnp.zeros(1)}})
    out = roundtrip(tmp_path, {"v": v}, {"v": target})["v"]
    assert type(out) is type(v)
    assert_tree_bits_equal(out, v)


def test_pytree_field_mismatch_names_paths(tmp_path):
    unickpt.save(tmp_path / "c", {"p": Pair(jnp.ones(2), 3)})

    class Other(NamedTuple):
        a: jax.Array
        c: int

    with pytest.raises(unickpt.IncompatibleCheckpointError) as e:
        restore_tree({"p": Other(jnp.ones(3), 0)}, unickpt.load(tmp_path / "c"))
    assert e.value.missing == ["p/c"] and e.value.unexpected == ["p/b"]
    assert e.value.mismatched == [("p/a", "target float32[3], checkpoint float32[2]")]


OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.1),
    "momentum": lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10)),
    "clip_chain": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optax_states_restore_with_types(tmp_path, name):
    tx = OPTIMIZERS[name]()
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    st = tx.init(params)
    grads = jax.tree_util.tree_map(lambda p: p * 0.5 + 1, params)
    for _ in range(3):
        upd, st = tx.update(grads, st, params)
        params = optax.apply_updates(params, upd)
    out = roundtrip(tmp_path, {"opt": st, "params": params},
                    {"opt": tx.init(params), "params": params})
    assert jax.tree_util.tree_structure(out["opt"]) == jax.tree_util.tree_structure(st)
    assert_tree_bits_equal(out["opt"], st)
    u1, _ = tx.update(grads, st, params)
    u2, _ = tx.update(grads, out["opt"], params)
    assert_tree_bits_equal(u1, u2)


def test_linen_train_state_restored_as_new_value(tmp_path):
    from flax import linen as nn
    from flax.training import train_state

    model = nn.Dense(3)
    params = model.init(jax.random.key(0), jnp.ones((1, 2)))
    tx = optax.adam(1e-2)
    ts = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    grads = jax.tree_util.tree_map(jnp.ones_like, ts.params)
    ts = ts.apply_gradients(grads=grads).apply_gradients(grads=grads)
    tree, kinds = to_tree({"ts": ts})
    assert kinds[("ts",)] == "jax:pytree:flax.training.train_state.TrainState"
    assert set(tree["ts"]) == {"step", "params", "opt_state"}
    fresh = train_state.TrainState.create(apply_fn=model.apply, params=model.init(
        jax.random.key(1), jnp.ones((1, 2))), tx=tx)
    out = roundtrip(tmp_path, {"ts": ts}, {"ts": fresh})["ts"]
    assert type(out) is type(ts) and out is not fresh and out.apply_fn is fresh.apply_fn
    assert int(out.step) == 2
    assert_tree_bits_equal((out.params, out.opt_state), (ts.params, ts.opt_state))


class Net(nnx.Module):
    def __init__(self, din: int, dh: int, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(din, dh, rngs=rngs)
        self.bn = nnx.BatchNorm(dh, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.l2 = nnx.Linear(dh, 1, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(nnx.relu(self.bn(self.l1(x)))))


def make(seed: int, dh: int = 4):
    model = Net(3, dh, nnx.Rngs(seed, dropout=seed + 100))
    return model, nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)


@nnx.jit
def train_step(model, opt, x):
    def loss(m):
        return (m(x) ** 2).mean()

    grads = nnx.grad(loss)(model)
    opt.update(model, grads)


def test_nnx_model_and_optimizer_restored_in_place(tmp_path):
    model, opt = make(0)
    x = jnp.linspace(-1, 1, 15).reshape(5, 3)
    for _ in range(3):
        train_step(model, opt, x)
    tree, kinds = to_tree({"model": model, "opt": opt})
    assert kinds[("model",)] == f"jax:nnx.Module:{__name__}.Net"
    assert kinds[("opt",)] == "jax:nnx.Optimizer:flax.nnx.training.optimizer.Optimizer"
    assert kinds[("model", "bn", "mean")] == "jax:nnx.BatchStat"
    assert kinds[("model", "drop", "rngs", "key")] == "jax:nnx.RngKey"
    assert kinds[("model", "drop", "rngs", "count")] == "jax:nnx.RngCount"
    assert kinds[("opt", "step")] == "jax:nnx.OptState"
    m2, o2 = make(7)
    out = roundtrip(tmp_path, {"model": model, "opt": opt}, {"model": m2, "opt": o2})
    assert out["model"] is m2 and out["opt"] is o2
    assert int(o2.step[...]) == 3
    assert_tree_bits_equal(nnx.state(m2), nnx.state(model))
    assert_tree_bits_equal(nnx.state(o2), nnx.state(opt))
    train_step(model, opt, x)  # dropout masks, BN stats and Adam moments continue identically
    train_step(m2, o2, x)
    assert_tree_bits_equal(nnx.state((m2, o2)), nnx.state((model, opt)))


def test_nnx_mismatch_changes_nothing(tmp_path):
    model, _ = make(0)
    unickpt.save(tmp_path / "c", {"model": model})
    other, _ = make(1, dh=5)
    before = jax.tree_util.tree_map(bits, nnx.state(other), is_leaf=lambda v: False)
    with pytest.raises(unickpt.IncompatibleCheckpointError) as e:
        restore_tree({"model": other}, unickpt.load(tmp_path / "c"))
    assert ("model/l1/kernel", "target float32[3, 5], checkpoint float32[3, 4]") in \
        e.value.mismatched
    assert len(e.value.mismatched) == 7  # every differing variable, in one error
    assert jax.tree_util.tree_map(bits, nnx.state(other)) == before


def test_nnx_rngs_variable_and_state(tmp_path):
    rngs = nnx.Rngs(3, dropout=4)
    rngs.dropout()
    v = nnx.Param(jnp.arange(3.0))
    st = nnx.state(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    r2, v2 = nnx.Rngs(0, dropout=0), nnx.Param(jnp.zeros(3))
    out = roundtrip(tmp_path, {"rngs": rngs, "v": v, "st": st},
                    {"rngs": r2, "v": v2, "st": nnx.state(nnx.Linear(2, 2, rngs=nnx.Rngs(1)))})
    assert out["rngs"] is r2 and out["v"] is v2
    assert bits(r2.dropout()) == bits(rngs.dropout())
    assert bits(r2.default()) == bits(rngs.default())
    assert bits(v2[...]) == bits(v[...])
    assert isinstance(out["st"], nnx.State)
    assert_tree_bits_equal(out["st"], st)


def test_int64_into_int32_target_without_x64(tmp_path):
    assert not jax.config.jax_enable_x64
    unickpt.save(tmp_path / "big", {"n": np.int64(2**40), "ok": np.array([5, -7], np.int64)})
    with pytest.raises(unickpt.IncompatibleCheckpointError) as e:
        restore_tree({"n": jnp.zeros((), jnp.int32), "ok": jnp.zeros(2, jnp.int32)},
                     unickpt.load(tmp_path / "big"))
    assert e.value.mismatched == [(
        "n", "checkpoint int64 values do not fit the target's int32 exactly; enable 64-bit "
             "mode (JAX_ENABLE_X64=1 or jax.config.update('jax_enable_x64', True)) before "
             "restoring")]
    out = restore_tree({"ok": jnp.zeros(2, jnp.int32)}, unickpt.load(tmp_path / "big"),
                       strict=False)
    assert out["ok"].dtype == jnp.int32 and out["ok"].tolist() == [5, -7]
    # numpy / Python counters never go through jnp: exact in any mode.
    out = restore_tree({"n": np.int64(0)}, unickpt.load(tmp_path / "big"), strict=False)
    assert type(out["n"]) is np.int64 and out["n"] == 2**40


def test_python_scalars_into_0d_arrays_exact_or_refused(tmp_path):
    unickpt.save(tmp_path / "c", {"a": 7, "b": 2**40, "c": 0.1, "d": 0.5, "e": True})
    ck = unickpt.load(tmp_path / "c")
    out = restore_tree({"a": jnp.zeros((), jnp.int32), "d": jnp.zeros(()), "e": jnp.zeros(
        (), bool)}, ck, strict=False)
    assert out["a"].dtype == jnp.int32 and int(out["a"]) == 7
    assert float(out["d"]) == 0.5 and bool(out["e"]) is True
    with pytest.raises(unickpt.IncompatibleCheckpointError) as e:
        restore_tree({"b": jnp.zeros((), jnp.int32), "c": jnp.zeros(())}, ck, strict=False)
    assert e.value.mismatched == [
        ("b", "checkpoint value 1099511627776 does not fit the target's int32 exactly"),
        ("c", "checkpoint value 0.1 does not fit the target's float32 exactly")]


X64_SCRIPT = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp, numpy as np, optax, unickpt
    from unickpt.state import restore_tree
    assert jax.config.jax_enable_x64
    d = sys.argv[1]
    big = jnp.asarray(2**40 + 3, jnp.int64)
    st = optax.adam(1e-3).init({"w": jnp.zeros(2)})
    unickpt.save(d + "/x64", {"n": big, "step": 2**62, "np": np.int64(2**40), "opt": st})
    out = restore_tree({"n": jnp.zeros((), jnp.int64), "step": 0, "np": np.int64(0),
                        "opt": st}, unickpt.load(d + "/x64"))
    assert out["n"].dtype == jnp.int64 and int(out["n"]) == 2**40 + 3, out["n"]
    assert out["step"] == 2**62 and out["np"] == 2**40
    # a checkpoint written with x64 off (int32 leaves) restores into 64-bit targets
    out = restore_tree({"c": jnp.zeros((), jnp.int64)}, unickpt.load(d + "/x32"))
    assert out["c"].dtype == jnp.int64 and int(out["c"]) == 123456
    print("X64-OK")
""")


def test_counters_survive_with_x64_enabled(tmp_path):
    unickpt.save(tmp_path / "x32", {"c": jnp.asarray(123456, jnp.int32)})
    env = dict(os.environ, JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "adapters")]))
    r = subprocess.run([sys.executable, "-c", X64_SCRIPT, str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "X64-OK" in r.stdout
    # and the x64 checkpoint back in this (x64 off) process: exact or refused, never truncated
    with pytest.raises(unickpt.IncompatibleCheckpointError, match="do not fit"):
        restore_tree({"n": jnp.zeros((), jnp.int32)}, unickpt.load(tmp_path / "x64"),
                     strict=False)


def test_adapter_claims_and_rng():
    adapter, kind = adapter_for(jnp.zeros(1))
    assert adapter.name == "jax" and kind == "Array"
    assert adapter_for(jax.random.key(0))[1] == "PRNGKey"
    assert adapter_for(Pair(jnp.ones(1), 1))[1] == f"pytree:{__name__}.Pair"
    assert adapter_for(np.zeros(1)) is None
    assert adapter.capture_rng() is None and adapter.restore_rng({}) == []


def test_nnx_select_and_other_optimizer(tmp_path):
    model, opt = make(0)
    train_step(model, opt, jnp.ones((4, 3)))
    unickpt.save(tmp_path / "c", {"model": model, "opt": opt})
    ck = unickpt.load(tmp_path / "c")
    m2, o2 = make(9)
    l2_before = bits(m2.l2.kernel[...])
    restore_tree({"model": m2, "opt": o2}, ck, select=[("model", "l1")])
    assert bits(m2.l1.kernel[...]) == bits(model.l1.kernel[...])
    assert bits(m2.l2.kernel[...]) == l2_before and int(o2.step[...]) == 0
    sgd = nnx.Optimizer(m2, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    with pytest.raises(unickpt.IncompatibleCheckpointError) as e:
        restore_tree({"opt": sgd}, ck, strict=True, select=[("opt",)])
    # unexpected subtrees are named once, at their root (as for plain dicts)
    assert e.value.unexpected == ["opt/opt_state/0/count", "opt/opt_state/0/mu",
                                  "opt/opt_state/0/nu"]
    assert "opt/opt_state/0/trace/l1/kernel" in e.value.missing
    assert e.value.mismatched == []
    out = restore_tree({"opt": sgd}, ck, strict=False, select=[("opt",)])
    assert out["opt"] is sgd and int(sgd.step[...]) == 1


def test_manager_async_save_snapshots_jax_state(tmp_path):
    model, opt = make(0)
    x = jnp.ones((4, 3))
    train_step(model, opt, x)
    state = {"model": model, "opt": opt, "key": jax.random.key(4), "rng": unickpt.RNG()}
    with unickpt.CheckpointManager(tmp_path / "run", async_save=True) as mgr:
        assert mgr.save(1, state, force=True)
        expect = jax.tree_util.tree_map(bits, nnx.state((model, opt)))
        train_step(model, opt, x)  # runs while the background write may still be going
        mgr.wait()
    m2, o2 = make(3)
    with unickpt.CheckpointManager(tmp_path / "run") as mgr:
        restored = mgr.restore({"model": m2, "opt": o2, "key": jax.random.key(0),
                                "rng": unickpt.RNG()})
    assert restored.step == 1 and restored.state["model"] is m2
    assert jax.tree_util.tree_map(bits, nnx.state((m2, o2))) == expect
    assert bits(restored.state["key"]) == bits(jax.random.key(4))
    assert unickpt.inspect(tmp_path / "run" / "step_1").kinds["model"] == \
        f"jax:nnx.Module:{__name__}.Net"
