"""Rank functions of a 2-process DDP trainer for multiprocess_train (test helper).

``correct`` keeps each rank's RNG in its checkpoints; ``forgets_rng`` does not, so after a
resume every rank's dropout replays the masks of its first steps: the final parameters differ
from the uninterrupted run's, which the resume check must catch.
"""

from __future__ import annotations

import os
import warnings
from datetime import timedelta

import unickpt


def _train(root: str, total_steps: int, stop_at: int | None, keep_rng: bool) -> dict:
    import torch  # here, not at the top: the crashing rank below starts without torch
    import torch.distributed as dist

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # env://, as torchrun
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same initial weights on every rank
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.5),
                                torch.nn.Linear(16, 2))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    torch.manual_seed(100 + rank)  # per-rank dropout masks
    state: dict = {"model": model, "opt": opt, "step": 0}
    if keep_rng:
        state["rng"] = unickpt.RNG()
    mgr = unickpt.CheckpointManager(root, resume="auto", dist_timeout=60)
    step = mgr.restore(state).state["step"]
    x = torch.linspace(-1, 1, 32).reshape(8, 4) * (rank + 1)
    for s in range(step + 1, total_steps + 1):
        ddp(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if s == stop_at:
            break  # the whole job stops here, without saving step s
        mgr.save(s, {**state, "step": s})
    else:
        mgr.close()
    out = {"params": {k: v.detach().clone() for k, v in model.state_dict().items()},
           "rng": torch.get_rng_state()}
    dist.destroy_process_group()
    return out


def correct(root: str, total_steps: int, stop_at: int | None = None) -> dict:
    return _train(root, total_steps, stop_at, keep_rng=True)


def forgets_rng(root: str, total_steps: int, stop_at: int | None = None) -> dict:
    return _train(root, total_steps, stop_at, keep_rng=False)


def crashes(root: str, total_steps: int, stop_at: int | None = None) -> dict:
    """Rank 1 fails at once; rank 0 waits for it forever (the harness must not wait)."""
    if os.environ["RANK"] == "1":
        raise SystemExit("rank 1 gave up")
    import time

    time.sleep(600)
    return {}
