"""Flax NNX quickstart: checkpoint a training run, kill it, resume it, bit for bit.

Trains a small NNX model (with dropout) with optax AdamW and a warmup + cosine learning-rate
schedule on synthetic data that is reshuffled every epoch from a PRNG key kept in the state.

The demo runs the training three times:

1. uninterrupted, in this process (the reference);
2. in a subprocess that checkpoints every few steps and is killed with SIGKILL part-way;
3. in a subprocess that resumes from the newest checkpoint and finishes.

It then compares the final checkpoints of (1) and (3) leaf by leaf and prints whether they are
bitwise identical (exit status 1 if not)::

    python examples/flax_quickstart.py

``python examples/flax_quickstart.py --worker ROOT`` is one training process (resumes from ROOT
if it holds a checkpoint); add ``--kill-at STEP`` to have it SIGKILL itself after that step.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import unickpt

STEPS = 40
SAVE_EVERY = 6
BATCH = 16
N_DATA, D_IN = 128, 8


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(D_IN, 32, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.l2 = nnx.Linear(32, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.l2(self.drop(nnx.gelu(self.l1(x))))


def synthetic_data() -> tuple[jax.Array, jax.Array]:
    kx, kw = jax.random.split(jax.random.key(1234))
    x = jax.random.normal(kx, (N_DATA, D_IN))
    return x, jnp.tanh(x @ jax.random.normal(kw, (D_IN, 1)))


def initial_state() -> dict:
    model = MLP(nnx.Rngs(params=0, dropout=1))
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, warmup_steps=5, decay_steps=STEPS)
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=1e-2), wrt=nnx.Param)
    return {"model": model, "optimizer": optimizer, "data_key": jax.random.key(42), "step": 0}


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
    def loss_fn(m: MLP) -> jax.Array:
        return ((m(x) - y) ** 2).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def batch_at(data: tuple[jax.Array, jax.Array], data_key: jax.Array,
             step: int) -> tuple[jax.Array, jax.Array]:
    """The batch of ``step`` (0-based): epoch order is a permutation drawn from the state key."""
    per_epoch = N_DATA // BATCH
    epoch, i = divmod(step, per_epoch)
    order = jax.random.permutation(jax.random.fold_in(data_key, epoch), N_DATA)
    idx = order[i * BATCH:(i + 1) * BATCH]
    return data[0][idx], data[1][idx]


def train(root: str, kill_at: int | None = None) -> None:
    """One training process: resume from ``root`` if possible, save on schedule, finish."""
    data = synthetic_data()
    state = initial_state()
    with unickpt.CheckpointManager(root, save_every=SAVE_EVERY, keep_last=2) as mgr:
        restored = mgr.restore(state)
        state = restored.state  # model/optimizer: the same objects, updated in place
        if restored.resumed:
            print(f"  resumed from step {state['step']} ({restored.path})", flush=True)
        for step in range(state["step"], STEPS):
            train_step(state["model"], state["optimizer"], *batch_at(data, state["data_key"],
                                                                     step))
            state["step"] = step + 1
            mgr.save(state["step"], state)
            if state["step"] == kill_at:
                print(f"  SIGKILL after step {kill_at}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        mgr.save(state["step"], state, force=True)
        mgr.wait()


def final_bytes(root: str) -> list[tuple[str, bytes]]:
    tree = unickpt.load(os.path.join(root, f"step_{STEPS}"))
    return [(jax.tree_util.keystr(p), np.asarray(v).tobytes() if not isinstance(
        v, (str, int, float)) else repr(v).encode())
        for p, v in jax.tree_util.tree_leaves_with_path(tree)]


def main() -> int:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ref, run = os.path.join(tmp, "reference"), os.path.join(tmp, "interrupted")
        print(f"1. uninterrupted run, {STEPS} steps")
        train(ref)
        me = [sys.executable, os.path.abspath(__file__), "--worker", run]
        kill_at = STEPS // 2 + 3
        print(f"2. run in a subprocess, killed after step {kill_at}")
        killed = subprocess.run([*me, "--kill-at", str(kill_at)])
        if killed.returncode != -signal.SIGKILL:
            print(f"expected the worker to die of SIGKILL, got exit {killed.returncode}")
            return 1
        print("3. resume in a new subprocess")
        if subprocess.run(me).returncode != 0:
            return 1
        a, b = final_bytes(ref), final_bytes(run)
        same = a == b
        nbytes = sum(len(x) for _, x in a)
        print(f"final state ({len(a)} leaves, {nbytes} bytes: parameters, AdamW moments, "
              f"step, dropout RNG stream, data key) bitwise identical to the uninterrupted "
              f"run: {same}  [{time.perf_counter() - t0:.1f} s]")
        if not same:
            for (p, x), (_, y) in zip(a, b):
                if x != y:
                    print(f"  differs: {p}")
        return 0 if same else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", metavar="ROOT", help="run one training process in ROOT")
    ap.add_argument("--kill-at", type=int, default=None)
    args = ap.parse_args()
    if args.worker:
        train(args.worker, args.kill_at)
        sys.exit(0)
    sys.exit(main())
