"""Orbax interop: import Orbax checkpoints, export unickpt checkpoints, bit for bit."""

from __future__ import annotations

import pytest

jax = pytest.importorskip("jax")
ocp = pytest.importorskip("orbax.checkpoint")
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
from unickpt_jax.orbax import convert, convert_total_bytes, export_orbax, import_orbax  # noqa: E402

import unickpt  # noqa: E402
from unickpt.tree import Piece, ShardedArray  # noqa: E402


def bits(x):
    a = np.asarray(x)
    return a.dtype.str, a.shape, a.tobytes()


def assert_same(a, b):
    """Same structure (dict/list), arrays bit-equal, scalars equal with the same type."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), (a, b)  # Orbax sorts keys
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, (np.ndarray, np.generic, jax.Array)):
        assert bits(a) == bits(b)
    else:
        assert type(a) is type(b) and (a == b or (a != a and b != b)), (a, b)


def sample_tree():
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 2**16, size=12, dtype=np.uint16)
    return {
        "params": {"w": rng.standard_normal((3, 4)).astype(np.float32),
                   "bf": jnp.asarray(raw.view(ml_dtypes.bfloat16).reshape(3, 4)),
                   "b": np.array([-0.0, np.inf, 1e-45], np.float32)},
        "opt": [{"count": np.array(2**40, np.int64), "mu": np.arange(5, dtype=np.uint32)},
                {"flag": np.array([True, False])}],
        "step": 123456789012,
        "lr": 0.1,
        "done": True,
    }


def test_import_standard_checkpointer_bit_exact(tmp_path):
    tree = sample_tree()
    with ocp.StandardCheckpointer() as ck:
        ck.save(tmp_path / "orbax" / "5", tree)
    seen: list[int] = []
    info = import_orbax(tmp_path / "orbax" / "5", tmp_path / "uni", progress=seen.append)
    got = unickpt.load(tmp_path / "uni")
    assert_same(tree, got)
    assert sum(seen) == info.nbytes == convert_total_bytes(tmp_path / "orbax" / "5",
                                                           to="unickpt") == sum(np.asarray(v).nbytes for v in
                                           jax.tree_util.tree_leaves(tree)
                                           if not isinstance(v, (int, float, bool)))
    meta = unickpt.inspect(tmp_path / "uni").info
    assert meta["converted_from"] == "orbax" and meta["step"] == 5


def test_import_checkpoint_manager_step_dirs(tmp_path):
    tree = sample_tree()
    with ocp.CheckpointManager(tmp_path / "single") as mgr:
        mgr.save(7, args=ocp.args.StandardSave(tree))
        mgr.wait_until_finished()
    import_orbax(tmp_path / "single" / "7", tmp_path / "u1")
    assert_same(tree, unickpt.load(tmp_path / "u1"))

    other = {"epoch": 3, "seen": np.arange(4, dtype=np.int64)}
    with ocp.CheckpointManager(tmp_path / "multi", item_names=("state", "extra")) as mgr:
        mgr.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                            extra=ocp.args.StandardSave(other)))
        mgr.wait_until_finished()
    import_orbax(tmp_path / "multi" / "2", tmp_path / "u2")
    got = unickpt.load(tmp_path / "u2")
    assert sorted(got) == ["extra", "state"]
    assert_same(tree, got["state"])
    assert_same(other, got["extra"])


def test_import_rejects_non_orbax_dirs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(unickpt.CheckpointNotFoundError, match="is not an Orbax checkpoint"):
        import_orbax(tmp_path / "empty", tmp_path / "u")
    with pytest.raises(unickpt.CheckpointNotFoundError, match="no Orbax checkpoint directory"):
        import_orbax(tmp_path / "missing", tmp_path / "u")


def test_export_is_restorable_by_orbax_bit_exact(tmp_path):
    a = np.arange(24, dtype=np.float32).reshape(4, 6)
    sharded = ShardedArray((4, 6), a.dtype, [Piece(((0, 2), (0, 6)), a[:2]),
                                             Piece(((2, 4), (0, 6)), a[2:])])
    key = jax.random.key(9)
    state = {"w": sharded, "key": key, "layers": {0: np.ones(2, ml_dtypes.bfloat16)},
             "step": 2**40, "x": 0.25, "ok": False, "n": np.int64(-3)}
    unickpt.save(tmp_path / "uni", state)
    seen: list[int] = []
    export_orbax(tmp_path / "uni", tmp_path / "orbax", progress=seen.append)
    with ocp.StandardCheckpointer() as ck:
        got = ck.restore(tmp_path / "orbax")
    expect = {"w": a, "key": np.asarray(jax.random.key_data(key)),
              "layers": {"0": np.ones(2, ml_dtypes.bfloat16)}, "step": 2**40, "x": 0.25,
              "ok": False, "n": np.array(-3, np.int64)}
    assert_same(expect, got)
    assert sum(seen) == 24 * 4 + 8 + 4 + 8 == convert_total_bytes(tmp_path / "uni", to="orbax")
    # and back: unickpt -> orbax -> unickpt leaves the values unchanged
    convert(tmp_path / "orbax", tmp_path / "uni2", to="unickpt")
    again = unickpt.load(tmp_path / "uni2")
    assert_same(expect, again)


def test_export_refuses_what_orbax_cannot_hold(tmp_path):
    unickpt.save(tmp_path / "uni", {"name": "run-1", "e": np.zeros((0, 2)), "ok": np.ones(1)})
    with pytest.raises(unickpt.UnsupportedLeafError) as e:
        export_orbax(tmp_path / "uni", tmp_path / "orbax")
    assert "2 leaves Orbax's StandardCheckpointer cannot store: name (str), e (empty array)" \
        in str(e.value)
    assert not (tmp_path / "orbax").exists()


def test_convert_checks_direction(tmp_path):
    with pytest.raises(unickpt.ConfigError, match="expected 'unickpt' or 'orbax'"):
        convert(tmp_path / "a", tmp_path / "b", to="torch")
