"""One rank of a DCP (torch.distributed.checkpoint) job for the interop tests.

Run as ``python _dcp_worker.py CONFIG_JSON RANK`` (launched by ``_dist_launch.launch`` with
``worker=``).  CONFIG holds ``world``, ``port``, ``mode`` and ``dir``, ``out``:

* ``"save"``: FSDP2 (world > 1) or a plain model trains 3 steps (AdamW), then ``dcp.save``
  writes ``{"model": ..., "optim": ...}`` from ``get_state_dict`` to ``dir`` as torchtitan
  does; each rank writes the gathered (full) state with ``unickpt.save`` to ``{out}.r{rank}``.
* ``"load"``: a fresh model and optimizer at this world size (FSDP2 when world > 1), filled
  with ``dcp.load`` from ``dir`` and ``set_state_dict``; the gathered state goes to
  ``{out}.r{rank}``.
"""

from __future__ import annotations

import json
import sys
import warnings
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import unickpt


def build(world: int) -> tuple[Any, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for m in model:
            if isinstance(m, torch.nn.Linear):
                fully_shard(m, mesh=mesh)
        model = fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, opt


def full(t: Any) -> Any:
    t = t.full_tensor() if hasattr(t, "full_tensor") else t
    return t.detach().clone().numpy() if isinstance(t, torch.Tensor) else t


def gathered(model: Any, opt: Any) -> dict:
    msd, osd = get_state_dict(model, opt)
    return {"model": {k: full(v) for k, v in msd.items()},
            "opt": {n: {k: full(v) for k, v in st.items()} for n, st in osd["state"].items()},
            "lr": [g["lr"] for g in osd["param_groups"]]}


def run(cfg: dict, rank: int) -> None:
    world = cfg["world"]
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{cfg['port']}",
                                rank=rank, world_size=world, timeout=timedelta(seconds=60))
    model, opt = build(world)
    if cfg["mode"] == "save":
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.randn(8, 5, generator=g)
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=cfg["dir"], no_dist=world == 1)
    else:
        msd, osd = get_state_dict(model, opt)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=cfg["dir"], no_dist=world == 1)
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    unickpt.save(f"{cfg['out']}.r{rank}", gathered(model, opt), overwrite=True)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    run(json.loads(sys.argv[1]), int(sys.argv[2]))
