"""One process of a multi-process JAX job that saves or restores an Orbax checkpoint (tests).

Run as ``python _jax_orbax_worker.py CONFIG_JSON PROCESS_ID`` through tests/_jax_launch.py.
CONFIG: ``port``, ``processes``, ``mode`` ("save" | "restore") and ``dir`` (the Orbax
checkpoint).  "save" writes :func:`global_state` sharded over a (2, 2) mesh with Orbax;
"restore" restores the checkpoint onto a (4,) mesh with other shardings and checks every
addressable shard bit for bit against :func:`global_state`, then writes
``{dir}.p{PROCESS_ID}.json`` with the shards it checked.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import ml_dtypes
import numpy as np


def global_state() -> dict[str, Any]:
    """The state every test job holds: a mix of shardings, dtypes and a Python scalar."""
    rng = np.random.default_rng(13)
    raw = rng.integers(0, 2**16, size=12, dtype=np.uint16)
    return {
        "params": {"w": rng.standard_normal((8, 12)).astype(np.float32),
                   "b": raw.view(ml_dtypes.bfloat16)},
        "opt": {"mu": rng.standard_normal((8, 12)).astype(np.float32),
                "count": np.arange(4, dtype=np.int32)},
        "big": rng.standard_normal((64, 32)).astype(np.float32),
        "step": 7,
    }


# Saved on a (2, 2) mesh ("a", "b"); restored on a (4,) mesh ("x",).
SAVE_SPECS = {"params": {"w": ("a", "b"), "b": ("b",)}, "opt": {"mu": (None, "b"), "count": ()},
              "big": ("a",)}
RESTORE_SPECS = {"params": {"w": (None, "x"), "b": ("x",)}, "opt": {"mu": ("x",), "count": ()},
                 "big": ("x", None)}


def _shard(mesh: Any, spec: tuple, a: np.ndarray) -> Any:
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    return jax.make_array_from_callback(a.shape, NamedSharding(mesh, PartitionSpec(*spec)),
                                        lambda idx: a[idx])


def main(cfg: dict, pid: int) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{cfg['port']}", num_processes=cfg["processes"],
                               process_id=pid, initialization_timeout=60)
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding, PartitionSpec

    state = global_state()
    if cfg["mode"] == "save":
        mesh = jax.make_mesh((2, 2), ("a", "b"))
        tree = jax.tree_util.tree_map(lambda spec, a: _shard(mesh, spec, a), SAVE_SPECS,
                                      {k: v for k, v in state.items() if k != "step"},
                                      is_leaf=lambda x: isinstance(x, tuple))
        assert not tree["params"]["w"].is_fully_addressable  # noqa: S101
        with ocp.StandardCheckpointer() as ck:
            ck.save(cfg["dir"], {**tree, "step": state["step"]})
            ck.wait_until_finished()
    else:
        mesh = jax.make_mesh((4,), ("x",))
        arrays = {k: v for k, v in state.items() if k != "step"}
        target = jax.tree_util.tree_map(
            lambda spec, a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(
                mesh, PartitionSpec(*spec))), RESTORE_SPECS, arrays,
            is_leaf=lambda x: isinstance(x, tuple))
        with ocp.StandardCheckpointer() as ck:
            got = ck.restore(cfg["dir"], {**target, "step": 0})
        checked = []
        got_arrays = {k: v for k, v in got.items() if k != "step"}
        for (path, want), arr, tgt in zip(jax.tree_util.tree_leaves_with_path(arrays),
                                          jax.tree_util.tree_leaves(got_arrays),
                                          jax.tree_util.tree_leaves(target)):
            name = jax.tree_util.keystr(path)
            if arr.is_fully_addressable or arr.sharding != tgt.sharding or \
                    arr.dtype != want.dtype or arr.shape != want.shape:
                raise AssertionError(f"{name}: {arr.dtype}{arr.shape} on {arr.sharding}")
            for sh in arr.addressable_shards:
                if np.asarray(sh.data).tobytes() != want[sh.index].tobytes():
                    raise AssertionError(f"{name}: shard {sh.index} differs")
                checked.append([name, str(sh.index)])
        if int(got["step"]) != state["step"]:
            raise AssertionError(f"step {got['step']!r}")
        with open(f"{cfg['dir']}.p{pid}.json", "w") as f:
            json.dump(checked, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]), int(sys.argv[2]))
