"""One process of a multi-process JAX job on CPU (jax.distributed + gloo) for the tests.

Run as ``python _jax_dist_worker.py CONFIG_JSON PROCESS_ID``.  CONFIG holds ``world``
(processes), ``devices`` (CPU devices per process), ``port``, ``root``, ``out``, ``timeout``,
``mesh`` (the global mesh shape, axes "a" and "b"), ``specs`` (name -> partition spec) and
``mode``:

* ``"save"``: coordinator checks, then a CheckpointManager saves steps 1 and 2 (async);
  a new manager (resume="auto", as a relaunch) restores step 2 onto ``mesh2``/``specs2``
  (another mesh and partition) and checks it bitwise, per-process state included; then it
  saves step 3, during which process 1 SIGKILLs itself while writing its file (timeout
  ``save_timeout``): process 0 must get a CoordinationError naming it, nothing committed;
* ``"restore"``: restore the latest checkpoint onto this layout (world, devices, mesh,
  specs): per-process state is refused at another process count, the rest restores bitwise.

Each process writes ``{out}.p{id}.json`` with its findings (checked by the test) and leaves
with ``os._exit`` (a jax.distributed shutdown would wait for a dead process).  The expected
values are a pure function of the step, so every layout can check them bitwise.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from typing import Any

MAIN = __name__ == "__main__"  # imported (doctest collection): nothing to run
CFG: dict = json.loads(sys.argv[1]) if MAIN else {}
PID = int(sys.argv[2]) if MAIN else 0
if MAIN:  # before jax is imported
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={CFG['devices']}"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from _jax_dist_values import values  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import unickpt  # noqa: E402
from unickpt.tree import LazyArray  # noqa: E402

T0 = time.monotonic()


class Data:
    """A per-process data position (get_state/set_state, like a Grain iterator)."""

    def __init__(self, pos: int = -1, bomb: bool = False):
        self.pos, self.bomb = pos, bomb

    def get_state(self) -> dict:
        st: dict = {"pos": self.pos}
        if self.bomb:  # kill this process while its file is being written
            st["blob"] = LazyArray((4,), np.dtype(np.float32), _die)
        return st

    def set_state(self, st: dict) -> None:
        self.pos = int(st["pos"])


def _die() -> np.ndarray:
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")


def mesh(shape: list | None = None) -> Mesh:
    devs = np.array(jax.devices()).reshape(shape or CFG["mesh"])
    return Mesh(devs, ("a", "b")[:devs.ndim])


def spec(s: list | None) -> P:
    return P(*(s or []))


def local_key(step: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(100 + PID), step)


def state_at(step: int, specs: dict, *, bomb: bool = False) -> dict:
    m = mesh()
    arrays = {}
    for name, v in values(step).items():
        sh = NamedSharding(m, spec(specs.get(name)))
        arrays[name] = jax.make_array_from_callback(v.shape, sh, lambda idx, v=v: np.asarray(v[idx]))
    return {"params": {k: arrays[k] for k in ("w", "v", "u", "c")}, "count": arrays["count"],
            "key": local_key(step), "data": Data(10 * PID + step, bomb), "step": step}


def target(specs: dict, shape: list | None = None) -> dict:
    m = mesh(shape)
    v = values(0)
    sds = {k: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                   sharding=NamedSharding(m, spec(specs.get(k))))
           for k, a in v.items()}
    return {"params": {k: sds[k] for k in ("w", "v", "u", "c")}, "count": sds["count"],
            "key": jax.random.key(7), "data": Data(), "step": 0}


def check_restored(st: dict, step: int, specs: dict, *, per_process: bool,
                   shape: list | None = None) -> list[str]:
    """Bitwise differences between ``st`` and the state of ``step`` (empty: equal)."""
    bad = []
    want = values(step)
    got = {**st["params"], "count": st["count"]}
    for name, a in got.items():
        if a.sharding != NamedSharding(mesh(shape), spec(specs.get(name))):
            bad.append(f"{name}: sharding {a.sharding}")
        full = np.asarray(multihost_utils.process_allgather(a, tiled=True))
        if full.dtype != want[name].dtype or full.tobytes() != want[name].tobytes():
            bad.append(f"{name}: values differ")
    if per_process:
        if (np.asarray(jax.random.key_data(st["key"])).tobytes()
                != np.asarray(jax.random.key_data(local_key(step))).tobytes()):
            bad.append("key differs")
        if st["data"].pos != 10 * PID + step:
            bad.append(f"data.pos {st['data'].pos}")
    if st["step"] != step:
        bad.append(f"step {st['step']}")
    return bad


def coordinator_checks(coord: Any) -> dict:
    from unickpt_jax.dist import JaxCoordinator, _client

    res: dict = {"type": type(coord).__name__, "rank": coord.rank, "world": coord.world_size}
    assert isinstance(coord, JaxCoordinator)
    got = coord.all_gather("t: gather", {"p": PID, "b": bytes([PID])})
    res["gather_ok"] = got == [{"p": p, "b": bytes([p])} for p in range(coord.world_size)]
    res["bcast"] = coord.broadcast("t: bcast", ["from", PID] if PID == 1 else None, root=1)
    coord.barrier("t: barrier")
    try:  # processes at different operations: each names the other's phase, no hang
        coord.all_gather(f"t: op {PID}", PID)
        res["mismatch"] = None
    except unickpt.CoordinationError as e:
        res["mismatch"] = str(e)
    for i in range(40):
        assert coord.all_gather("t: loop", i) == [i] * coord.world_size
    coord.barrier("t: loop done")
    res["keys"] = len(_client().key_value_dir_get_bytes(coord._base + "/"))
    return res


def run_save(res: dict) -> None:
    # async: host snapshot of this process's shards now, collectives in the background
    mgr = unickpt.CheckpointManager(CFG["root"], resume="auto", save_every=1,
                                    dist_timeout=CFG["timeout"], async_save=True)
    res["coord"] = coordinator_checks(mgr.coordinator)
    r = mgr.restore(state_at(0, CFG["specs"]))
    res["start"] = r.step
    for step in (1, 2):
        assert mgr.save(step, state_at(step, CFG["specs"]))
    mgr.close()
    # as a relaunch would: back onto another mesh shape / partition, same process count
    mgr = unickpt.CheckpointManager(CFG["root"], resume="auto", save_every=1,
                                    dist_timeout=CFG["timeout"])
    got = mgr.restore(target(CFG["specs2"], CFG["mesh2"]))
    res["restored"] = got.step
    res["bad"] = check_restored(got.state, 2, CFG["specs2"], per_process=True,
                                shape=CFG["mesh2"])
    try:  # not collective: an array spanning processes cannot be saved alone
        unickpt.save(os.path.join(CFG["root"] + f".alone{PID}"), state_at(1, CFG["specs"]))
        res["alone"] = None
    except unickpt.UnsupportedLeafError as e:
        res["alone"] = str(e)
    dump(res)  # process 1 is about to die: what it found so far
    # processes are in step now (a slow start must not look like a death): a short timeout
    mgr.coordinator.timeout = CFG["save_timeout"]
    t = time.monotonic()
    try:  # process 1 SIGKILLs itself while writing its file
        mgr.save(3, state_at(3, CFG["specs"], bomb=PID == 1))
        res["error"] = None
    except unickpt.CoordinationError as e:
        res["error"] = {"phase": e.phase, "missing": e.missing, "message": str(e),
                        "seconds": time.monotonic() - t}
    latest = mgr.latest()
    res["latest"] = None if latest is None else latest.step
    res["listing"] = sorted(os.listdir(CFG["root"]))


def count_reads() -> list[int]:
    """The manifest array numbers this process reads (to check it reads only its regions)."""
    from unickpt.format.reader import CheckpointReader

    reads: list[int] = []
    real = CheckpointReader.read_array

    def counting(self: Any, i: int, *a: Any, **k: Any) -> Any:
        reads.append(i)
        return real(self, i, *a, **k)

    CheckpointReader.read_array = counting  # type: ignore[method-assign]
    return reads


def pieces_of(shape: tuple) -> set[int]:
    from unickpt.format.reader import CheckpointReader

    with CheckpointReader(os.path.join(CFG["root"], "step_2")) as r:
        (s,) = [s for s in r.manifest.sharded if tuple(s.shape) == shape]
        return {a for _i, a in s.pieces}


def run_restore(res: dict) -> None:
    reads = count_reads()
    mgr = unickpt.CheckpointManager(CFG["root"], resume="auto", dist_timeout=CFG["timeout"])
    res["coordinator"] = type(mgr.coordinator).__name__
    try:
        mgr.restore(target(CFG["specs"]))
        res["refused"] = None
    except unickpt.IncompatibleCheckpointError as e:
        res["refused"] = str(e)
    got = mgr.restore(target(CFG["specs"]), per_rank="keep")
    res["restored"] = got.step
    res["w_reads"] = len(set(reads) & pieces_of((8, 12)))
    res["bad"] = check_restored(got.state, 2, CFG["specs"], per_process=False)
    res["kept_pos"] = got.state["data"].pos
    mgr.close()


def dump(res: dict) -> None:
    res["seconds"] = time.monotonic() - T0
    with open(f"{CFG['out']}.p{PID}.json", "w") as f:
        json.dump(res, f, default=repr)


def main() -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if CFG["world"] > 1:
        jax.distributed.initialize(f"127.0.0.1:{CFG['port']}", num_processes=CFG["world"],
                                   process_id=PID, initialization_timeout=60)
    res: dict = {"pid": PID}
    code = 0
    try:
        {"save": run_save, "restore": run_restore}[CFG["mode"]](res)
    except BaseException as e:  # noqa: BLE001 - reported to the test, which fails on it
        res["crash"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"
        code = 3
    dump(res)
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
