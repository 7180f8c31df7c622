"""Multi-process JAX checkpoints on CPU: jax.distributed + gloo, processes as subprocesses.

Every job runs in its own process group under a hard timeout (tests/_dist_launch.py).  The
checkpoint is saved by 2 processes x 2 devices with arrays that span processes (sharded over
processes, over local devices only, fully replicated), a per-process PRNG key and a
per-process data position.  Checked, bitwise after an all-gather:

* the coordinator's collectives on the coordination service and its key cleanup;
* who wrote what (each unique shard once, replicated arrays once);
* restore onto 2 x 2 with another mesh shape and partition specs (per-process state back),
  onto 1 x 4 and onto 4 x 1 (per-process state refused with the documented error, then
  ``per_rank="keep"``);
* one process SIGKILLed while writing its file (the manager with resume="auto", as every
  process runs it): the other gets a CoordinationError naming it and the phase within the
  timeout, nothing is committed, ``latest`` is still the previous checkpoint.

Three launches in all (2 x 2 saves, 1 x 4 and 4 x 1 restore): each JAX process costs ~2 s
to import and initialize, so every check of one layout shares one launch.
"""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("jax")

from _dist_launch import launch  # noqa: E402
from _jax_dist_values import values  # noqa: E402

import unickpt  # noqa: E402
from unickpt.format.reader import CheckpointReader  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_jax_dist_worker.py")
SPECS = {"w": ["a", "b"], "v": ["b"], "u": ["a"], "c": [], "count": []}
ENV = {"JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": os.pathsep.join(
    [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "adapters"),
     os.environ.get("PYTHONPATH", "")])}


def run_job(tmp, name: str, mode: str, world: int, devices: int, mesh: list, specs: dict,
            root: str, **kw) -> list[dict]:
    cfg = {"world": world, "devices": devices, "mode": mode, "root": root, "mesh": mesh,
           "specs": specs, "out": str(tmp / name), "timeout": 20, **kw}
    codes = launch(cfg, timeout=120, worker=WORKER, env=ENV)
    out = []
    for p in range(world):
        with open(f"{cfg['out']}.p{p}.json") as f:
            res = json.load(f)
        res["killed"] = codes[p] == -9
        assert "crash" not in res, f"process {p}: {res['crash']}"
        out.append(res)
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Steps 1 and 2 saved by 2 processes x 2 devices (plus the same-count checks)."""
    tmp = tmp_path_factory.mktemp("jaxdist")
    root = str(tmp / "run")
    res = run_job(tmp, "save", "save", 2, 2, [2, 2], SPECS, root,
                  specs2={"w": [None, "a"], "v": ["a"], "u": [], "c": ["a"], "count": []},
                  mesh2=[4], save_timeout=4)
    return tmp, root, res


def test_coordinator_collectives_and_key_cleanup(saved):
    _tmp, _root, res = saved
    for p, r in enumerate(res):
        c = r["coord"]
        assert (c["type"], c["rank"], c["world"]) == ("JaxCoordinator", p, 2)
        assert c["gather_ok"]
        assert c["bcast"] == ["from", 1]
        other = 1 - p
        assert c["mismatch"] and (f"t: op {p}: process {other} is at 't: op {other}' instead"
                                  in c["mismatch"])
        # 45 collectives ran, one of them refused (the phase mismatch): left in the store are
        # this process's last message, the other's, and at most the other's previous one (it
        # deletes that after the last barrier, maybe after this read); nothing leaked
        assert c["keys"] <= 3


def test_each_region_written_once_by_the_process_holding_it(saved):
    _tmp, root, _res = saved
    with CheckpointReader(os.path.join(root, "step_2")) as r:
        m = r.manifest
        assert [f.name for f in m.files] == ["arrays-r0.safetensors", "arrays-r1.safetensors"]
        assert m.info["distributed"] == {"world_size": 2, "per_rank": [["data"], ["key"]]}
        assert m.kinds[("key",)] == "jax:ProcessPRNGKey"
        by_shape = {tuple(s.shape): s for s in m.sharded}
        # w: P("a", "b") -> 4 unique pieces, 2 per process
        w = by_shape[(8, 12)]
        assert sorted(m.arrays[a].file for _i, a in w.pieces) == [
            "arrays-r0.safetensors"] * 2 + ["arrays-r1.safetensors"] * 2
        # v: P("b") is replicated over processes: process 0 holds both replica_id 0 shards
        v = by_shape[(8,)]
        assert [m.arrays[a].file for _i, a in v.pieces] == ["arrays-r0.safetensors"] * 2
        # u: P("a"), replicated within each process: one piece per process
        u = by_shape[(8, 4)]
        assert sorted(m.arrays[a].file for _i, a in u.pieces) == [
            "arrays-r0.safetensors", "arrays-r1.safetensors"]
        assert len(m.sharded) == 3  # c and count (fully replicated) are plain arrays, once
    tree = unickpt.load(os.path.join(root, "step_2"))
    assert len(tree["key"]) == 2 and [d["pos"] for d in tree["data"]] == [2, 12]
    want = values(2)
    got = {**tree["params"], "count": tree["count"]}
    for k, a in want.items():
        assert got[k].dtype == a.dtype and got[k].tobytes() == a.tobytes(), k


def test_saving_a_spanning_array_alone_is_refused(saved):
    tmp, root, res = saved
    for p, r in enumerate(res):
        assert r["alone"] and "cannot save params/" in r["alone"]
        assert "spans several processes" in r["alone"] and "CheckpointManager" in r["alone"]
        assert not os.path.exists(f"{root}.alone{p}")


def test_restore_same_count_other_mesh_bitwise(saved):
    _tmp, _root, res = saved
    for r in res:
        assert r["start"] == 0 and r["restored"] == 2
        assert r["bad"] == []


@pytest.mark.parametrize("world,devices,mesh,specs", [
    (1, 4, [2, 2], SPECS),
    (4, 1, [2, 2], {"w": ["b", "a"], "v": ["a"], "u": [None, "b"], "c": ["b"], "count": []}),
], ids=["1x4", "4x1"])
def test_restore_other_process_count(saved, world, devices, mesh, specs):
    tmp, root, _res = saved
    res = run_job(tmp, f"restore{world}x{devices}", "restore", world, devices, mesh, specs,
                  root)
    for p, r in enumerate(res):
        assert r["coordinator"] == ("JaxCoordinator" if world > 1 else "SingleProcess")
        assert r["restored"] == 2
        assert r["bad"] == [], (p, r["bad"])
        assert r["refused"] and (f"written by 2 processes and is restored by {world}"
                                 in r["refused"])
        assert "per_rank='keep'" in r["refused"]
        assert "data" in r["refused"] and "key" in r["refused"]
        assert r["kept_pos"] == -1  # the target's own per-process state, untouched
        # w was saved as four (4, 6) blocks; each device needs one block here
        assert r["w_reads"] == 4 // world


def test_one_process_killed_mid_save_commits_nothing(saved):
    _tmp, root, res = saved
    assert res[1]["killed"] and not res[0]["killed"]
    r = res[0]
    e = r["error"]
    assert e is not None, "process 0 committed step 3 without process 1's file"
    assert e["phase"] == "save step_3: report" and e["missing"] == [1]
    assert "save step_3: report: process(es) 1 did not arrive within 4s" in e["message"]
    assert "dist_timeout" in e["message"]
    assert e["seconds"] < 15
    assert r["latest"] == 2
    assert "step_3" not in r["listing"] and not any(
        n.startswith(".unickpt-tmp") for n in r["listing"]), r["listing"]
    assert "step_3" not in os.listdir(root)
