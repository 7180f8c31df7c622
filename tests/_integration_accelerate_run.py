"""Accelerate training loop for tests/test_integration_accelerate.py (run as a subprocess).

    kill ROOT K      train with a CheckpointManager (save every 3 steps); SIGKILL after step K
    resume ROOT OUT  resume from ROOT to the end, final state to OUT/resumed, then an
                     uninterrupted run in a fresh root, final state to OUT/reference
"""

from __future__ import annotations

import os
import signal
import sys

import accelerate  # noqa: E402
import torch  # noqa: E402

import unickpt  # noqa: E402
from unickpt.integrations.accelerate import DataPosition  # noqa: E402

EPOCHS = 3  # 8 batches each: 24 steps


def train(root: str, kill_at: int | None = None) -> dict:
    accelerate.utils.set_seed(5)
    acc = accelerate.Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
    g = torch.Generator().manual_seed(99)
    x = torch.randn(32, 6, generator=g)
    ds = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    dl = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True)
    model, opt, sched, dl = acc.prepare(model, opt, sched, dl)
    data = DataPosition(dl)
    state = {"model": model, "optimizer": opt, "scheduler": sched, "data": data,
             "rng": unickpt.RNG(), "step": 0}
    with unickpt.CheckpointManager(root, save_every=3, keep_last=2) as mgr:
        r = mgr.restore(state)
        state, step = r.state, r.state["step"]
        while data.epoch < EPOCHS:
            for xb, yb in data:
                loss = torch.nn.functional.mse_loss(model(xb), yb)
                acc.backward(loss)
                opt.step()
                sched.step()
                opt.zero_grad()
                step += 1
                state["step"] = step
                mgr.save(step, state)
                if step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
    return {"model": model, "optimizer": opt, "scheduler": sched, "step": step}


def main() -> None:
    torch.set_num_threads(1)
    mode, root = sys.argv[1], sys.argv[2]
    if mode == "kill":
        train(root, int(sys.argv[3]))
        raise SystemExit("not killed")
    out = sys.argv[3]
    unickpt.save(os.path.join(out, "resumed"), train(root))
    unickpt.save(os.path.join(out, "reference"), train(os.path.join(out, "reference_root")))
    print("done")


if __name__ == "__main__":
    main()
