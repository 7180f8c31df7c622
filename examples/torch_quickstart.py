"""unickpt quickstart for PyTorch: crash a training run, resume it, get the same bits.

    python examples/torch_quickstart.py            # ~15 s on 2 CPU cores

It trains a small MLP with dropout on synthetic data (AdamW, linear warmup + cosine decay,
a shuffled DataLoader whose position is checkpointed, gradient clipping) three times:

1. a reference run, uninterrupted;
2. the same run in a subprocess that is killed with SIGKILL part-way (no clean-up, no
   final save: a real crash);
3. a fresh subprocess that resumes from the newest checkpoint and finishes.

Then it compares the final model parameters, optimizer state, scheduler state, data position
and RNG of runs 1 and 3 bit for bit, prints the verdict, and exits non-zero if anything
differs.  Checkpoints are ``ROOT/step_<N>`` (keep_last=3 retention) written by
``unickpt.CheckpointManager``; ``unickpt.RNG()`` in the state saves Python's, NumPy's and
torch's global RNGs (dropout draws from torch's).

Options: ``--root DIR`` (default: a temporary directory), ``--steps N``, ``--crash-at N``.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import unickpt

SAVE_EVERY = 40


class ShuffledSampler(torch.utils.data.Sampler[int]):
    """Reshuffles every epoch from (seed, epoch) and remembers how far into the epoch it is.

    ``state_dict``/``load_state_dict`` make it Stateful, so unickpt saves its position and a
    resumed run continues mid-epoch with the very next sample instead of re-training on data
    it has already seen.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self.epoch, self.pos = 0, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if self.pos >= self.n:  # previous epoch fully consumed: start the next one
            self.epoch, self.pos = self.epoch + 1, 0
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        while self.pos < self.n:
            self.pos += 1
            yield order[self.pos - 1]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


def build(total_steps: int) -> dict:
    random.seed(0)  # seed every global RNG: unickpt.RNG() saves and restores all three
    np.random.seed(0)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(42)
    x = torch.randn(2048, 20, generator=g)
    w_true = torch.randn(20, 1, generator=g)
    y = torch.tanh(x @ w_true) + 0.1 * torch.randn(2048, 1, generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.GELU(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    L = torch.optim.lr_scheduler
    warmup = max(total_steps // 10, 1)
    sched = L.SequentialLR(opt, [L.LinearLR(opt, start_factor=0.05, total_iters=warmup),
                                 L.CosineAnnealingLR(opt, T_max=total_steps - warmup)],
                           milestones=[warmup])
    sampler = ShuffledSampler(len(x), seed=7)
    # The loader's own generator keeps iter(loader) from drawing on the global RNG, which a
    # resumed run would otherwise consume at a different point than the original one.
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32,
                                         sampler=sampler,
                                         generator=torch.Generator().manual_seed(0))
    return {"model": model, "optimizer": opt, "scheduler": sched, "sampler": sampler,
            "loader": loader}


def train(root: str, total_steps: int, crash_at: int | None = None) -> None:
    """Train to ``total_steps``, resuming from ``root`` if it holds a checkpoint."""
    torch.use_deterministic_algorithms(True)  # same kernels, same bits, every run
    torch.set_num_threads(1)  # intra-op threading may reorder float reductions
    objs = build(total_steps)
    model, opt, sched = objs["model"], objs["optimizer"], objs["scheduler"]
    state = {"model": model, "optimizer": opt, "scheduler": sched,
             "sampler": objs["sampler"], "rng": unickpt.RNG()}
    with unickpt.CheckpointManager(root, resume="auto", save_every=SAVE_EVERY,
                                   keep_last=3) as mgr:
        step = mgr.restore(state).step
        if step:
            print(f"  resumed from step {step} (epoch {objs['sampler'].epoch}, sample "
                  f"{objs['sampler'].pos})", flush=True)
        batches = iter(objs["loader"])
        while step < total_steps:
            try:
                xb, yb = next(batches)
            except StopIteration:
                batches = iter(objs["loader"])
                xb, yb = next(batches)
            model.train()
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            mgr.save(step, state, metrics={"loss": float(loss.detach())})
            if step == crash_at:
                print(f"  crashing hard (SIGKILL) at step {step}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        mgr.save(step, state, force=True)  # the final state, whatever the schedule says


def _bits_equal(a, b, path: str, out: list[str]) -> None:
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                out.append(f"{path}/{k}: present in only one run")
            else:
                _bits_equal(a[k], b[k], f"{path}/{k}", out)
    elif isinstance(a, (list, tuple)):
        if len(a) != len(b):
            out.append(f"{path}: lengths differ")
        for i, (x, y) in enumerate(zip(a, b)):
            _bits_equal(x, y, f"{path}/{i}", out)
    elif isinstance(a, np.ndarray):
        if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
            out.append(f"{path}: arrays differ")
    elif isinstance(a, float):
        if np.float64(a).tobytes() != np.float64(b).tobytes():
            out.append(f"{path}: {a!r} != {b!r}")
    elif a != b:
        out.append(f"{path}: {a!r} != {b!r}")


def _worker(root: str, steps: int, crash_at: int | None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--root", root,
           "--steps", str(steps)] + (["--crash-at", str(crash_at)] if crash_at else [])
    return subprocess.run(cmd, check=False)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default=None, help="directory for the runs (default: temporary)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--crash-at", type=int, default=None,
                   help="step at which the interrupted run is killed (default: 55%% of steps)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        train(args.root, args.steps, args.crash_at)
        return 0

    base = args.root or tempfile.mkdtemp(prefix="unickpt-quickstart-")
    crash_at = args.crash_at or int(args.steps * 0.55)
    ref_root, run_root = os.path.join(base, "reference"), os.path.join(base, "interrupted")
    if os.path.exists(ref_root) or os.path.exists(run_root):
        # Both runs resume from what they find: old checkpoints would skip the training.
        print(f"{base} already holds a quickstart run; pass an empty or new --root")
        return 2
    t0 = time.perf_counter()
    print(f"1. reference run: {args.steps} steps without interruption")
    if _worker(ref_root, args.steps, None).returncode != 0:
        return 2
    print(f"2. same run in a subprocess, killed with SIGKILL at step {crash_at}")
    crashed = _worker(run_root, args.steps, crash_at)
    if crashed.returncode != -signal.SIGKILL:
        print(f"   expected the run to die of SIGKILL, got exit code {crashed.returncode}")
        return 2
    print(f"   checkpoints left behind: {sorted(os.listdir(run_root))}")
    print("3. a fresh process resumes from the newest checkpoint and finishes")
    if _worker(run_root, args.steps, None).returncode != 0:
        return 2

    ref = unickpt.load(os.path.join(ref_root, f"step_{args.steps}"))
    got = unickpt.load(os.path.join(run_root, f"step_{args.steps}"))
    diffs: list[str] = []
    _bits_equal(ref, got, "", diffs)
    n_arrays = sum(1 for v in ref["model"].values() if isinstance(v, np.ndarray))
    n_state = sum(len(s) for s in ref["optimizer"]["state"].values())
    print(f"compared {n_arrays} parameter/buffer arrays, {n_state} optimizer state entries, "
          f"the LR schedule, the data position and the RNG states "
          f"({time.perf_counter() - t0:.1f} s)")
    if diffs:
        print("NOT bitwise identical:\n  " + "\n  ".join(diffs[:20]))
        return 1
    print("OK: final parameters and optimizer state are bitwise identical to the "
          "uninterrupted run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
