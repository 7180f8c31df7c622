"""A tiny numpy training loop that survives being killed, and resumes bit for bit.

Run it, kill it (here: ``--crash-at`` sends itself SIGKILL at that step, like a preempted
job), run it again with the same arguments: it resumes from the newest committed checkpoint
and ends with exactly the same weights as an uninterrupted run.

    python examples/numpy_resume.py /tmp/run --crash-at 37   # dies at step 37
    python examples/numpy_resume.py /tmp/run                 # resumes from step 30
    python examples/numpy_resume.py /tmp/other               # uninterrupted: same digest

(``UNICKPT_CRASH_AT=37`` in the environment does the same as ``--crash-at 37``.)
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal

import numpy as np

import unickpt


class Sampler:
    """Which example comes next: a Stateful object (state_dict / load_state_dict)."""

    def __init__(self, n: int, seed: int):
        self.rng = np.random.default_rng(seed)
        self.n = n
        self.order = self.rng.permutation(n)
        self.pos = 0
        self.epoch = 0

    def next_batch(self, size: int) -> np.ndarray:
        if self.pos + size > self.n:  # new epoch: reshuffle with the sampler's own generator
            self.order, self.pos, self.epoch = self.rng.permutation(self.n), 0, self.epoch + 1
        idx = self.order[self.pos:self.pos + size]
        self.pos += size
        return idx

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "order": self.order, "pos": self.pos,
                "epoch": self.epoch}

    def load_state_dict(self, sd: dict) -> None:
        self.rng.bit_generator.state = sd["rng"]
        self.order, self.pos, self.epoch = np.array(sd["order"]), sd["pos"], sd["epoch"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--crash-at", type=int, default=int(os.environ.get("UNICKPT_CRASH_AT", -1)))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    data_rng = np.random.default_rng(0)  # the data set is fixed: not part of the state
    x = data_rng.standard_normal((512, 8))
    y = x @ data_rng.standard_normal(8) + 0.1 * data_rng.standard_normal(512)

    np.random.seed(1)  # the legacy global RNG drives dropout below; unickpt.RNG() saves it
    state = {
        "params": {"w": np.zeros(8), "b": np.zeros(())},
        "opt": {"m": np.zeros(8), "v": np.zeros(8)},
        "sampler": Sampler(len(x), seed=2),
        "rng": unickpt.RNG(),
        "step": 0,
    }
    with unickpt.CheckpointManager(args.root, resume="auto", save_every=10, keep_last=2,
                                   keep_best=1, best_metric="loss") as mgr:
        restored = mgr.restore(state)
        state = restored.state
        print(f"start: step {restored.step} ({mgr.resolve_start().reason})")
        w, b, m, v = (state["params"]["w"], state["params"]["b"], state["opt"]["m"],
                      state["opt"]["v"])
        for step in range(restored.step + 1, args.steps + 1):
            if step == args.crash_at:
                print(f"crashing at step {step}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            idx = state["sampler"].next_batch(32)
            keep = np.random.rand(8) > 0.1  # "dropout" on the features
            err = x[idx] * keep @ w + b - y[idx]
            gw, gb = (x[idx] * keep).T @ err / len(idx), err.mean()
            m = 0.9 * m + 0.1 * gw
            v = 0.999 * v + 0.001 * gw**2
            w = w - 0.05 * m / (np.sqrt(v) + 1e-8)
            b = b - 0.05 * gb
            loss = float((err**2).mean())
            state.update(params={"w": w, "b": b}, opt={"m": m, "v": v}, step=step)
            mgr.save(step, state, metrics={"loss": loss}, force=step == args.steps)
    digest = hashlib.sha256(w.tobytes() + b.tobytes() + m.tobytes() + v.tobytes()).hexdigest()
    print(f"done: step {args.steps}, loss {loss:.6f}, digest {digest[:16]}")


if __name__ == "__main__":
    main()
