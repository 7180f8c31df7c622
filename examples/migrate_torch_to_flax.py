"""Train in PyTorch, move the run to Flax NNX mid-training, and check it continues the same.

An MLP with LayerNorm (or, with ``--cnn``, a conv net whose flatten order differs between
NCHW and NHWC) is trained with AdamW and a linear schedule in PyTorch; the run is saved, then
``unickpt.migrate`` converts it (weights, Adam moments, step count, schedule position) for a
Flax NNX model + optax optimizer.  Both the Flax run and the original PyTorch run continue;
the script plots both loss curves across the switch and prints the max parameter difference.

    python examples/migrate_torch_to_flax.py [--cnn] [--out losses.png]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import _migrate_models as M  # noqa: E402  (twin model definitions, shared with the tests)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cnn", action="store_true", help="conv net (NCHW/NHWC flatten)")
    ap.add_argument("--steps", type=int, default=60, help="steps before and after the switch")
    ap.add_argument("--out", default="migrate_losses.png", help="PNG plot of the loss curves")
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optax
    import torch
    from flax import nnx

    import unickpt
    from unickpt.migration.rules import flatten_rules
    from unickpt.state import restore_tree

    kind, n = ("cnn" if args.cnn else "mlp"), args.steps
    total = 2 * n
    torch.set_num_threads(1)

    # 1. PyTorch: AdamW (weight decay 1e-2, torch's default) and a linear LR schedule.
    model = M.torch_model(kind, torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=1e-2)
    sched = M.torch_scheduler(opt, total)
    before = M.torch_train(kind, model, opt, sched, n, 0, np.float32)
    root = tempfile.mkdtemp(prefix="unickpt-migrate-")
    src = os.path.join(root, "torch", f"step_{n}")
    unickpt.save(src, {"model": model, "optimizer": opt, "scheduler": sched, "step": n})

    # 2. Flax NNX twin: the same hyperparameters, stated explicitly (optax's AdamW default
    #    weight decay is 1e-4; unickpt refuses the mismatch rather than changing the run).
    fmodel = M.nnx_model(kind, np.float32)
    fopt = nnx.Optimizer(fmodel, optax.adamw(optax.linear_schedule(5e-3, 5e-4, total),
                                             weight_decay=1e-2), wrt=nnx.Param)
    target = {"model": fmodel, "optimizer": fopt, "step": 0}
    rules = flatten_rules("head", (M.C, M.HW, M.HW)) if kind == "cnn" else None
    report = unickpt.migrate(src, os.path.join(root, "flax"), to="jax", target=target,
                             rules=rules)
    print(f"migrated {src} -> {report.path}")
    for r in report.rules_applied:
        print(f"  rule: {r}")
    restored = restore_tree(target, unickpt.load(report.path))
    print(f"  resumed at step {restored['step']}")

    # 3. Continue both runs on the same batches.
    after_flax = M.nnx_train(kind, fmodel, fopt, n, n, np.float32)
    after_torch = M.torch_train(kind, model, opt, sched, n, n, np.float32)
    diff = M.max_rel_diff(M.nnx_params_as_torch(kind, fmodel), M.torch_params(model))
    abs_diff = max(float(np.abs(a - M.torch_params(model)[k]).max())
                   for k, a in M.nnx_params_as_torch(kind, fmodel).items())
    print(f"after {n} more steps: max |param difference| {abs_diff:.3e} "
          f"(max relative {diff:.3e}); final loss torch {after_torch[-1]:.6f}, "
          f"flax {after_flax[-1]:.6f}")

    steps = np.arange(total)
    plt.figure(figsize=(7, 4))
    plt.plot(steps[:n], before, label="PyTorch (before the switch)", color="C0")
    plt.plot(steps[n:], after_torch, label="PyTorch (continued)", color="C0", ls="--")
    plt.plot(steps[n:], after_flax, label="Flax NNX (migrated)", color="C1", ls=":", lw=2)
    plt.axvline(n - 0.5, color="gray", lw=0.8)
    plt.xlabel("step")
    plt.ylabel("loss")
    plt.yscale("log")
    plt.title(f"{kind.upper()} + AdamW: PyTorch -> Flax at step {n}")
    plt.legend()
    plt.tight_layout()
    plt.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
