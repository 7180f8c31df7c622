"""Sharded jax.Arrays on 8 virtual CPU devices: unique-shard saving, resharding restore, memory.

The checks run in a subprocess because ``--xla_force_host_platform_device_count`` must be set
before jax is imported, and this pytest process may already have imported jax with 1 device.
Run ``python tests/test_jax_sharding.py DIR`` to see the measured figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("jax")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIG_MIB = 64


def _child(d: str) -> dict:
    import tracemalloc

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
    from jax.sharding import PartitionSpec as P

    import unickpt
    from unickpt.format.reader import CheckpointReader
    from unickpt.state import restore_tree, to_tree
    from unickpt.tree import ShardedArray

    devs = np.array(jax.devices())
    assert len(devs) == 8, devs
    m42 = Mesh(devs.reshape(4, 2), ("a", "b"))
    m24 = Mesh(devs.reshape(2, 4), ("x", "y"))  # another mesh shape
    mrev = Mesh(devs[::-1].reshape(2, 4), ("x", "y"))  # and devices reordered
    figures: dict = {}

    host = np.arange(16 * 8, dtype=np.float32).reshape(16, 8)
    x = jax.device_put(host, NamedSharding(m42, P("a", None)))  # replicated over "b"
    tree, _ = to_tree({"x": x})
    sa = tree["x"]
    assert isinstance(sa, ShardedArray) and len(sa.pieces) == 4, sa  # replicas stored once
    assert [p.index for p in sa.pieces] == [((4 * i, 4 * i + 4), (0, 8)) for i in range(4)]
    unickpt.save(f"{d}/small", {"x": x, "r": jax.device_put(host, NamedSharding(m42, P()))})
    with CheckpointReader(f"{d}/small") as r:
        assert r.manifest.sharded and len(r.manifest.sharded[0].pieces) == 4
        assert len(r.manifest.arrays) == 5  # 4 pieces + one copy of the replicated array

    # Resharding restores must never assemble the whole array on the host.
    real_assemble = ShardedArray.assemble

    def no_gather(self):
        raise AssertionError("full host gather during a sharded restore")

    reads: list[tuple[int, ...]] = []
    real_read = ShardedArray.read

    def spy_read(self, index):
        out = real_read(self, index)
        reads.append(out.shape)
        return out

    ShardedArray.assemble, ShardedArray.read = no_gather, spy_read
    targets = {
        "other_mesh": NamedSharding(mrev, P("y", "x")),
        "transposed": NamedSharding(m42, P("b", "a")),
        "cols": NamedSharding(m24, P(None, ("x", "y"))),
        "replicated": NamedSharding(m24, P()),
        "one_device": SingleDeviceSharding(devs[3]),
        "subset_mesh": NamedSharding(Mesh(devs[:2], ("z",)), P("z")),
    }
    with CheckpointReader(f"{d}/small") as r:
        ck = r.tree(mmap=True, assemble=False)
        for name, sh in targets.items():
            reads.clear()
            for tgt in (jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=sh),
                        jax.device_put(jnp.zeros((16, 8)), sh)):
                out = restore_tree({"x": tgt}, {"x": ck["x"]})["x"]
                assert out.sharding == sh, (name, out.sharding)
                assert np.asarray(out).tobytes() == host.tobytes(), name
            region = max(int(np.prod(s)) for s in reads)
            expect = host.size // len({tuple(map(tuple, ((s.start, s.stop) for s in i)))
                                       for i in sh.devices_indices_map((16, 8)).values()})
            assert region == expect, (name, region, expect)  # one target region at a time
    # The same through CheckpointManager.restore (pieces stay memory-mapped, no gather).
    with unickpt.CheckpointManager(f"{d}/run") as mgr:
        mgr.save(1, {"x": x}, force=True)
    with unickpt.CheckpointManager(f"{d}/run") as mgr:
        sh = targets["other_mesh"]
        restored = mgr.restore({"x": jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=sh)})
    assert restored.resumed and restored.state["x"].sharding == sh
    assert np.asarray(restored.state["x"]).tobytes() == host.tobytes()
    ShardedArray.assemble, ShardedArray.read = real_assemble, real_read

    # Without a sharding: the default device.
    out = restore_tree({"x": jax.ShapeDtypeStruct((16, 8), jnp.float32)},
                       unickpt.load(f"{d}/small", mmap=True), strict=False)["x"]
    assert out.devices() == {jax.devices()[0]}

    # NNX model + optimizer with sharded parameters, restored onto another sharding.
    def model(seed, mesh, spec):
        m = nnx.Linear(8, 16, rngs=nnx.Rngs(seed))
        st = nnx.state(m)
        st = jax.tree_util.tree_map(
            lambda v: jax.device_put(v, NamedSharding(mesh, spec if v.ndim == 2 else P())), st)
        nnx.update(m, st)
        return m, nnx.Optimizer(m, optax.adam(1e-2), wrt=nnx.Param)

    m1, o1 = model(0, m42, P("b", "a"))

    @nnx.jit
    def step(m, o, xb):
        o.update(m, nnx.grad(lambda m: (m(xb) ** 2).mean())(m))

    xb = jnp.ones((4, 8))
    step(m1, o1, xb)
    assert isinstance(to_tree(m1)[0]["kernel"], ShardedArray)
    unickpt.save(f"{d}/nnx", {"model": m1, "opt": o1})
    m2, o2 = model(1, m24, P("x", "y"))
    with CheckpointReader(f"{d}/nnx") as r:
        restore_tree({"model": m2, "opt": o2}, r.tree(mmap=True, assemble=False))
    assert m2.kernel[...].sharding == NamedSharding(m24, P("x", "y"))
    assert np.asarray(m2.kernel[...]).tobytes() == np.asarray(m1.kernel[...]).tobytes()
    step(m1, o1, xb)
    step(m2, o2, xb)
    assert np.asarray(m2.kernel[...]).tobytes() == np.asarray(m1.kernel[...]).tobytes()

    # Peak host memory (numpy allocations, tracemalloc) for a large array, saved 8-way and
    # restored onto a different mesh from memory-mapped pieces.
    n = BIG_MIB * (1 << 20) // 4
    big = jax.device_put(jnp.arange(n, dtype=jnp.float32).reshape(8192, n // 8192),
                         NamedSharding(m42, P(("a", "b"), None)))
    tracemalloc.start()
    unickpt.save(f"{d}/big", {"big": big})
    figures["save_peak_mib"] = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    tgt = jax.ShapeDtypeStruct(big.shape, big.dtype, sharding=NamedSharding(m24, P(None, "y")))
    tracemalloc.start()
    with CheckpointReader(f"{d}/big") as r:
        out = restore_tree({"big": tgt}, r.tree(mmap=True, assemble=False))["big"]
        out.block_until_ready()
    cur, peak = tracemalloc.get_traced_memory()
    figures["restore_peak_mib"], figures["restore_retained_mib"] = peak / 2**20, cur / 2**20
    tracemalloc.stop()
    assert bool((out == big).all())
    figures["array_mib"] = BIG_MIB
    # The save streams one shard at a time; the restore holds one target region (1/4 of the
    # array here) at a time, never the whole array.
    assert figures["save_peak_mib"] < BIG_MIB / 4, figures
    # Save: one shard's host copy at a time (on CPU even zero-copy).  Restore: the target
    # sharding has 4 distinct regions of BIG/4; one region is read at a time (the CPU backend
    # may keep one region's buffer as a device buffer: "retained"); never the whole array.
    assert figures["save_peak_mib"] < BIG_MIB / 8, figures
    assert figures["restore_peak_mib"] - figures["restore_retained_mib"] < BIG_MIB / 4 + 1, \
        figures
    assert figures["restore_peak_mib"] < BIG_MIB * 0.6, figures
    return figures


def test_sharded_save_and_resharding_restore(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "adapters")]))
    r = subprocess.run([sys.executable, os.path.abspath(__file__), str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    figures = json.loads(r.stdout.strip().splitlines()[-1])
    assert figures["restore_peak_mib"] < BIG_MIB * 0.6


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1])))
