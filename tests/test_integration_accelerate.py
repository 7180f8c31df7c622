"""Accelerate integration: prepared objects as CheckpointManager targets, a killed loop
resumed bitwise, and DataPosition's exact mid-epoch resume."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
accelerate = pytest.importorskip("accelerate")

from _integration_helpers import run_script  # noqa: E402

import unickpt  # noqa: E402
from unickpt.integrations.accelerate import DataPosition  # noqa: E402
from unickpt.testing import assert_trees_equal  # noqa: E402


def _loader(seed: int = 3) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(list(range(20)), batch_size=3, shuffle=True,
                                       generator=torch.Generator().manual_seed(seed))


def test_data_position_resumes_mid_epoch_same_order_rng_untouched(tmp_path):
    torch.manual_seed(0)
    data = DataPosition(_loader())
    next(iter(data))  # epoch 0 (one batch), then a whole epoch 0 again from a new iterator
    data = DataPosition(_loader())
    seen = []
    with unickpt.CheckpointManager(tmp_path) as mgr:
        for i, b in enumerate(data):
            seen.append(b.tolist())
            if i == 2:
                mgr.save(1, {"data": data})
                rest_rng = torch.get_rng_state()
        tail = seen[3:]
    fresh = DataPosition(_loader(seed=77))  # a different generator: the state brings its own
    torch.manual_seed(123)
    with unickpt.CheckpointManager(tmp_path) as mgr:
        r = mgr.restore({"data": fresh})
    assert r.resumed and (fresh.epoch, fresh.batch) == (0, 3)
    before = torch.get_rng_state()
    assert [b.tolist() for b in fresh] == tail
    assert torch.equal(torch.get_rng_state(), before)  # skipping drew nothing visible
    assert (fresh.epoch, fresh.batch) == (1, 0)
    assert not torch.equal(before, rest_rng)


def test_prepared_objects_are_targets(tmp_path):
    acc = accelerate.Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
    model, opt, sched, dl = acc.prepare(model, opt, sched, _loader())
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    sched.step()
    with unickpt.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt, "scheduler": sched,
                     "data": DataPosition(dl)})
    kinds = unickpt.inspect(tmp_path / "step_1").kinds
    assert kinds["model"] == "torch:torch.nn.Module"
    assert kinds["optimizer"] == "torch:torch.optim.Optimizer"
    m2 = torch.nn.Linear(3, 2)
    o2 = torch.optim.AdamW(m2.parameters(), lr=0.1)
    s2 = torch.optim.lr_scheduler.StepLR(o2, 1, 0.5)
    m2, o2, s2 = acc.prepare(m2, o2, s2)
    with unickpt.CheckpointManager(tmp_path) as mgr:
        mgr.restore({"model": m2, "optimizer": o2, "scheduler": s2, "data": DataPosition(dl)})
    assert torch.equal(m2.weight, model.weight)
    assert torch.equal(o2.state_dict()["state"][0]["exp_avg"],
                       opt.state_dict()["state"][0]["exp_avg"])
    assert s2.state_dict() == sched.state_dict()


@pytest.mark.slow
def test_loop_killed_and_resumed_is_bitwise_equal(tmp_path):
    root, out = str(tmp_path / "root"), str(tmp_path / "out")
    killed = run_script("_integration_accelerate_run.py", "kill", root, "13")
    assert killed.returncode == -9, killed.stdout[-3000:]
    assert sorted(c.step for c in unickpt.CheckpointManager(root).checkpoints()) == [9, 12]
    assert unickpt.load(os.path.join(root, "step_12"))["data"]["batch"] == 4
    cli = subprocess.run([sys.executable, "-m", "unickpt", "inspect",
                          os.path.join(root, "step_12")], capture_output=True, text=True,
                         timeout=120)
    assert cli.returncode == 0 and "exp_avg" in cli.stdout, cli.stdout + cli.stderr
    resumed = run_script("_integration_accelerate_run.py", "resume", root, out)
    assert resumed.returncode == 0 and "done" in resumed.stdout, resumed.stdout[-3000:]
    a, b = unickpt.load(os.path.join(out, "resumed")), unickpt.load(os.path.join(out, "reference"))
    assert a["step"] == b["step"] == 24
    assert_trees_equal(a, b)
