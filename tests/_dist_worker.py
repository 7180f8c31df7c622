"""One rank of a multi-process training job (DDP or FSDP2 on CPU/gloo) for the tests.

Run as ``python _dist_worker.py CONFIG_JSON RANK``; CONFIG holds ``world``, ``port``, ``root``,
``out``, ``mode`` ("ddp" | "fsdp" | "restore"), ``steps``, ``save_every``, ``timeout`` and an
optional ``kill``: ``{"step": S, "phase": "report"|"commit"|"after", "ranks": [..]}`` SIGKILLs
the listed ranks when the save of step S reaches that phase ("after": once step S is saved).
A rank whose collective fails writes ``{out}.r{rank}.error.json`` (type, message, seconds) and
exits with status 3.  A finished rank writes its final state (full tensors) with
``unickpt.save`` to ``{out}.r{rank}``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import unickpt_torch.data  # noqa: F401  (tracks loader positions; before any loader)

import unickpt


def build(cfg: dict, rank: int, world: int) -> dict[str, Any]:
    torch.manual_seed(0)  # the same initial weights on every rank
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(8, 3))
    if cfg["mode"] == "fsdp" or (cfg["mode"] == "restore" and world > 1):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for m in model:
            if isinstance(m, torch.nn.Linear):
                fully_shard(m, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    elif world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        wrapped = model
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 5, generator=g)
    y = torch.randn(40, 3, generator=g)
    ds = torch.utils.data.TensorDataset(x, y)
    sampler = torch.utils.data.distributed.DistributedSampler(
        ds, num_replicas=world, rank=rank, shuffle=True, seed=3)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler,
                                         generator=torch.Generator().manual_seed(0))
    random.seed(100 + rank)
    np.random.seed(100 + rank)
    torch.manual_seed(100 + rank)  # per-rank RNG (dropout differs per rank); restore overrides
    return {"model": wrapped, "opt": opt, "sched": sched, "sampler": sampler,
            "loader": loader}


def state(objs: dict, step: int) -> dict:
    return {"model": objs["model"], "opt": objs["opt"], "sched": objs["sched"],
            "data": objs["loader"], "rng": unickpt.RNG(), "step": step}


def full(t: Any) -> Any:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def final_tree(objs: dict) -> dict:
    """Full (gathered) parameters and optimizer state, and this rank's RNG."""
    model = objs["model"]
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) \
        else model
    params = {k: full(v).detach().clone().numpy() for k, v in inner.state_dict().items()}
    opt = {}
    names = {id(p): n for n, p in inner.named_parameters()}
    for p, st in objs["opt"].state.items():
        opt[names[id(p)]] = {k: full(v).detach().clone().numpy() for k, v in st.items()}
    rng = unickpt.state.to_tree({"rng": unickpt.RNG()}, snapshot=True)[0]["rng"]
    return {"params": params, "opt": opt, "rng": rng}


def arm_kill(mgr: Any, kill: dict | None, rank: int) -> None:
    if not kill or rank not in kill["ranks"] or kill["phase"] == "after":
        return
    coord = mgr.coordinator
    real = coord.all_gather if kill["phase"] == "report" else coord.broadcast
    target = f"save step_{kill['step']}: {kill['phase']}"

    def wrapped(phase: str, *a: Any, **k: Any) -> Any:
        if phase == target:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(phase, *a, **k)

    if kill["phase"] == "report":
        coord.all_gather = wrapped
    else:
        coord.broadcast = wrapped


def run(cfg: dict, rank: int) -> None:
    world = cfg["world"]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{cfg['port']}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    objs = build(cfg, rank, world)
    mgr = unickpt.CheckpointManager(cfg["root"], resume="auto", save_every=cfg["save_every"],
                                    keep_last=2, dist_timeout=cfg["timeout"])
    kill = cfg.get("kill")
    arm_kill(mgr, kill, rank)
    out = f"{cfg['out']}.r{rank}"
    try:
        if cfg["mode"] == "restore":
            restore_only(cfg, mgr, objs, out)
            return
        r = mgr.restore(state(objs, 0))
        step = r.state["step"]
        batches = iter(objs["loader"])
        model, opt, sched = objs["model"], objs["opt"], objs["sched"]
        while step < cfg["steps"]:
            try:
                xb, yb = next(batches)
            except StopIteration:
                objs["sampler"].set_epoch(objs["sampler"].epoch + 1)
                batches = iter(objs["loader"])
                xb, yb = next(batches)
            torch.nn.functional.mse_loss(model(xb), yb).backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            mgr.save(step, state(objs, step))
            if kill and kill["phase"] == "after" and step == kill["step"] \
                    and rank in kill["ranks"]:
                os.kill(os.getpid(), signal.SIGKILL)
        mgr.close()
        unickpt.save(out, final_tree(objs), overwrite=True)
    except unickpt.UnickptError as e:
        with open(out + ".error.json", "w") as f:
            json.dump({"type": type(e).__name__, "message": str(e),
                       "missing": getattr(e, "missing", None),
                       "seconds": time.monotonic() - T0}, f)
        os._exit(3)
    dist.destroy_process_group()


def restore_only(cfg: dict, mgr: Any, objs: dict, out: str) -> None:
    """Restore the latest checkpoint at this world size and write the gathered state."""
    st = state(objs, 0)
    refused = ""
    try:
        mgr.restore(st)
    except unickpt.IncompatibleCheckpointError as e:  # per-rank state at another world size
        refused = str(e)
        mgr.restore(st, per_rank="keep")
    tree = final_tree(objs)
    tree["refused"] = refused
    tree["step"] = int(mgr.resolve_start().step)
    unickpt.save(out, tree, overwrite=True)


T0 = time.monotonic()

if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    run(json.loads(sys.argv[1]), int(sys.argv[2]))
