"""Resumable multi-process training with unickpt: DDP (or FSDP2) under ``torchrun``.

    torchrun --nproc_per_node 2 examples/torch_distributed.py runs/ddp_demo
    torchrun --nproc_per_node 2 examples/torch_distributed.py runs/fsdp_demo --fsdp

Every rank runs the same code it would run alone; the manager detects ``torch.distributed``.
Kill the job at any moment (Ctrl-C, SIGKILL, a lost node) and run the same command again: it
resumes from the newest committed checkpoint, with each rank's RNG and data position back.
A checkpoint written with ``--fsdp`` restores at any number of processes (and into a plain
model: ``unickpt.CheckpointManager(root).restore({"model": plain_model}, select=["model"])``).
See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import unickpt_torch.data  # noqa: F401  (tracks data loader positions; before any loader)

import unickpt


def main(root: str, steps: int, fsdp: bool) -> None:
    if "RANK" not in os.environ:  # run without torchrun: a job of one process
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))
    dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights everywhere
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                torch.nn.Dropout(0.1), torch.nn.Linear(32, 1))
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (world,))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        model = fully_shard(model, mesh=mesh)
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    data = torch.utils.data.TensorDataset(torch.randn(512, 16), torch.randn(512, 1))
    sampler = torch.utils.data.distributed.DistributedSampler(data, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=16, sampler=sampler,
                                         generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1000 + rank)  # per-rank randomness (dropout); saved per rank

    with unickpt.CheckpointManager(root, resume="auto", save_every=20, keep_last=2,
                                   dist_timeout=300) as mgr:
        # per_rank="keep": at another world size than the checkpoint's, each rank keeps its
        # own RNG and data position as built above (at the same world size they come back).
        r = mgr.restore({"model": model, "opt": opt, "sched": sched, "data": loader,
                         "rng": unickpt.RNG(), "step": 0}, per_rank="keep")
        step = r.state["step"]
        batches = iter(loader)
        while step < steps:
            try:
                x, y = next(batches)
            except StopIteration:
                sampler.set_epoch(sampler.epoch + 1)
                batches = iter(loader)
                x, y = next(batches)
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            mgr.save(step, {"model": model, "opt": opt, "sched": sched, "data": loader,
                            "rng": unickpt.RNG(), "step": step},
                     metrics={"loss": loss.item()})
        mgr.save(step, {"model": model, "opt": opt, "sched": sched, "data": loader,
                        "rng": unickpt.RNG(), "step": step}, force=True)  # the final state
    if rank == 0:
        print(f"done at step {step}; checkpoints: {[c.step for c in mgr.checkpoints()]}")
    dist.destroy_process_group()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", nargs="?", default=os.path.join("runs", "distributed_demo"))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--fsdp", action="store_true")
    a = p.parse_args()
    main(a.root, a.steps, a.fsdp)
