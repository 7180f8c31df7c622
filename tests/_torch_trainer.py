"""A small but complete PyTorch trainer for the bitwise-resume tests.

Everything that makes resumption hard is here: dropout (global RNG), a shuffled loader whose
position is saved, an optimizer with state, an LR schedule, gradient accumulation and
clipping.  ``train`` resumes from the latest checkpoint under ``root`` if there is one.

Run as a script (``python _torch_trainer.py CONFIG_JSON ROOT [KILL_AFTER]``) it trains in a
subprocess that the tests SIGKILL; on completion it writes its final state to ``ROOT.final``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

import unickpt
from unickpt.state import to_tree


@dataclass(frozen=True)
class Config:
    width: int = 8
    depth: int = 1
    dropout: float = 0.0
    optimizer: str = "adamw"  # sgd | sgd_momentum | adam | adamw | rmsprop
    scheduler: str = "warmup_cosine"  # none | step | warmup_cosine | onecycle
    accum: int = 1
    clip: float | None = None
    batch_size: int = 4
    shuffle: bool = True
    seed: int = 0
    steps: int = 10
    save_every: int = 3
    n_samples: int = 24
    step_sleep: float = 0.0  # lets a test kill the subprocess at an arbitrary moment


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Shuffles each epoch with a generator seeded from (seed, epoch); saves its position."""

    def __init__(self, n: int, seed: int, shuffle: bool):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.pos = 0, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if self.pos >= self.n:  # the previous epoch was fully consumed
            self.epoch, self.pos = self.epoch + 1, 0
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        while self.pos < self.n:
            i = order[self.pos]
            self.pos += 1
            yield i

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


def build(cfg: Config, init_seed: int) -> dict[str, Any]:
    """All training objects; ``init_seed`` differs between runs to prove restore overrides."""
    random.seed(init_seed)  # every global RNG is seeded; unickpt.RNG() carries all of them
    np.random.seed(init_seed)
    torch.manual_seed(init_seed)
    data_g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.n_samples, 5, generator=data_g)
    y = (x.sum(1, keepdim=True) > 0).float()
    layers: list[torch.nn.Module] = []
    d = 5
    for _ in range(cfg.depth):
        layers += [torch.nn.Linear(d, cfg.width), torch.nn.Tanh()]
        if cfg.dropout:
            layers.append(torch.nn.Dropout(cfg.dropout))
        d = cfg.width
    layers.append(torch.nn.Linear(d, 1))
    model = torch.nn.Sequential(*layers)
    opt = {"sgd": lambda p: torch.optim.SGD(p, lr=0.05),
           "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
           "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
           "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
           "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5),
           }[cfg.optimizer](model.parameters())
    L = torch.optim.lr_scheduler
    sched = {"none": lambda: None,
             "step": lambda: L.StepLR(opt, step_size=3, gamma=0.7),
             "warmup_cosine": lambda: L.SequentialLR(
                 opt, [L.LinearLR(opt, 0.1, total_iters=3),
                       L.CosineAnnealingLR(opt, T_max=max(cfg.steps - 3, 1))], milestones=[3]),
             "onecycle": lambda: L.OneCycleLR(opt, max_lr=0.05, total_steps=cfg.steps + 1),
             }[cfg.scheduler]()
    sampler = ResumableSampler(cfg.n_samples, cfg.seed, cfg.shuffle)
    # The loader gets its own generator: without one, every iter(loader) draws a base seed
    # from the *global* RNG, and a resumed run (which calls iter() at another point) diverges.
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                         batch_size=cfg.batch_size, sampler=sampler,
                                         generator=torch.Generator().manual_seed(0))
    return {"model": model, "optimizer": opt, "scheduler": sched, "sampler": sampler,
            "loader": loader}


def checkpoint_state(objs: dict[str, Any], step: int) -> dict[str, Any]:
    state = {"model": objs["model"], "optimizer": objs["optimizer"],
             "sampler": objs["sampler"], "rng": unickpt.RNG(), "step": step}
    if objs["scheduler"] is not None:
        state["scheduler"] = objs["scheduler"]
    return state


def _latest(root: str) -> str | None:
    steps = [int(n[5:]) for n in os.listdir(root) if n.startswith("step_")
             and os.path.exists(os.path.join(root, n, "manifest.msgpack"))] \
        if os.path.isdir(root) else []
    return os.path.join(root, f"step_{max(steps)}") if steps else None


def train(cfg: Config, root: str, *, stop_at: int | None = None,
          kill_after: int | None = None, init_seed: int = 1234) -> dict[str, Any] | None:
    """Train to ``cfg.steps`` (resuming from ``root``); return the final neutral state tree.

    ``stop_at``: abandon the run (return None) once step ``stop_at`` is done: an in-process
    crash, everything after the last save is lost.
    ``kill_after``: SIGKILL this process after that step (a real crash).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # intra-op parallelism may reorder float reductions
    try:
        objs = build(cfg, init_seed)
        with unickpt.CheckpointManager(root, resume="auto", save_every=cfg.save_every,
                                       keep_last=2) as mgr:
            restored = mgr.restore(checkpoint_state(objs, 0))
            step = restored.state["step"]
            assert step == restored.step
            model, opt, sched = objs["model"], objs["optimizer"], objs["scheduler"]
            loss_fn = torch.nn.MSELoss()
            batches = iter(objs["loader"])
            while step < cfg.steps:
                model.train()
                for _ in range(cfg.accum):
                    try:
                        xb, yb = next(batches)
                    except StopIteration:
                        batches = iter(objs["loader"])
                        xb, yb = next(batches)
                    (loss_fn(model(xb), yb) / cfg.accum).backward()
                if cfg.clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
                opt.step()
                if sched is not None:
                    sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                mgr.save(step, checkpoint_state(objs, step))
                if cfg.step_sleep:
                    time.sleep(cfg.step_sleep)
                if kill_after is not None and step == kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
                if stop_at is not None and step == stop_at:
                    return None
        tree, _ = to_tree(checkpoint_state(objs, step), snapshot=True)
        return tree
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    torch.use_deterministic_algorithms(True)
    cfg = Config(**json.loads(sys.argv[1]))
    root = sys.argv[2]
    kill = int(sys.argv[3]) if len(sys.argv) > 3 else None
    final = train(cfg, root, kill_after=kill)
    unickpt.save(root + ".final", final, overwrite=True)
    print(json.dumps(asdict(cfg)))
