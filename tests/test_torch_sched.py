"""Schedulers, GradScaler, generators, the global torch RNG, and save side effects."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _torch_helpers import assert_bitwise_equal
from unickpt_torch.adapter import TorchAdapter

import unickpt
from unickpt.state import restore_tree, to_tree

L = torch.optim.lr_scheduler


def _opt():
    return torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1, momentum=0.9)


SCHEDULERS = {
    "StepLR": lambda o: L.StepLR(o, step_size=2, gamma=0.5),
    "warmup+cosine": lambda o: L.SequentialLR(
        o, [L.LinearLR(o, 0.1, total_iters=3), L.CosineAnnealingLR(o, T_max=7)], milestones=[3]),
    "OneCycleLR": lambda o: L.OneCycleLR(o, max_lr=1.0, total_steps=20),
    "CosineWarmRestarts": lambda o: L.CosineAnnealingWarmRestarts(o, T_0=3),
    "CyclicLR": lambda o: L.CyclicLR(o, 0.01, 0.1, step_size_up=2),
    "Chained": lambda o: L.ChainedScheduler([L.ExponentialLR(o, 0.9), L.ConstantLR(o, 0.5)]),
    "Polynomial": lambda o: L.PolynomialLR(o, total_iters=6, power=2.0),
    "LambdaLR": lambda o: L.LambdaLR(o, lambda e: 0.9 ** e),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_resumes_exactly(tmp_path, name):
    o = _opt()
    s = SCHEDULERS[name](o)
    for _ in range(5):
        o.step()
        s.step()
    unickpt.save(tmp_path / "c", {"optimizer": o, "scheduler": s})
    kinds = unickpt.inspect(tmp_path / "c").kinds
    assert kinds["scheduler"] == "torch:torch.optim.lr_scheduler.LRScheduler"
    o2 = _opt()
    s2 = SCHEDULERS[name](o2)
    restore_tree({"optimizer": o2, "scheduler": s2}, unickpt.load(tmp_path / "c"))
    assert_bitwise_equal(s2.state_dict(), s.state_dict())
    for _ in range(4):
        o.step()
        s.step()
        o2.step()
        s2.step()
        assert o2.param_groups[0]["lr"] == o.param_groups[0]["lr"]
    assert_bitwise_equal(s2.state_dict(), s.state_dict())


def test_lambda_lr_stores_what_torch_stores():
    o = _opt()
    s = L.LambdaLR(o, lambda e: 0.5)
    tree, _ = to_tree({"s": s})
    assert tree["s"]["lr_lambdas"] == [None]


def test_reduce_on_plateau_including_inf(tmp_path):
    o = _opt()
    s = L.ReduceLROnPlateau(o, patience=1)
    tree, _ = to_tree({"s": s})
    assert tree["s"]["best"] == float("inf")
    for loss in (1.0, 2.0, 2.0, 2.0):
        s.step(loss)
    unickpt.save(tmp_path / "c", {"s": s, "o": o})
    o2 = _opt()
    s2 = L.ReduceLROnPlateau(o2, patience=1)
    restore_tree({"s": s2, "o": o2}, unickpt.load(tmp_path / "c"))
    assert_bitwise_equal(s2.state_dict(), s.state_dict())
    assert o2.param_groups[0]["lr"] == o.param_groups[0]["lr"] < 0.1


def test_scheduler_mismatch_is_reported():
    o = _opt()
    tree, _ = to_tree({"s": L.StepLR(o, 2)})
    with pytest.raises(unickpt.IncompatibleCheckpointError) as ei:
        restore_tree({"s": L.ExponentialLR(_opt(), 0.9)}, tree)
    assert ei.value.unexpected == ["s/step_size"] and ei.value.missing == []


def test_grad_scaler_round_trip(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    p = torch.nn.Parameter(torch.ones(2))
    o = torch.optim.SGD([p], lr=0.1)
    for _ in range(4):
        o.zero_grad()
        scaler.scale(p.sum()).backward()
        scaler.step(o)
        scaler.update()
    unickpt.save(tmp_path / "c", {"scaler": scaler})
    assert unickpt.inspect(tmp_path / "c").kinds["scaler"] == "torch:torch.amp.GradScaler"
    s2 = torch.amp.GradScaler("cpu")
    restore_tree({"scaler": s2}, unickpt.load(tmp_path / "c"))
    assert s2.state_dict() == scaler.state_dict()
    assert s2.get_scale() == 2048.0


def test_generator_round_trip_and_device_check(tmp_path):
    g = torch.Generator().manual_seed(123)
    torch.rand(7, generator=g)
    unickpt.save(tmp_path / "c", {"gen": g})
    saved = unickpt.load(tmp_path / "c")["gen"]
    assert saved["device"] == "cpu" and saved["initial_seed"] == 123
    assert saved["state"].dtype == np.uint8 and saved["state"].shape == (5056,)
    g2 = torch.Generator().manual_seed(9)
    out = restore_tree({"gen": g2}, unickpt.load(tmp_path / "c"))
    assert out["gen"] is g2 and g2.initial_seed() == 123
    assert torch.equal(torch.rand(5, generator=g2), torch.rand(5, generator=g))
    bad = {"gen": {"device": "cuda:0", "state": np.zeros(16, np.uint8), "initial_seed": 1}}
    with pytest.raises(unickpt.IncompatibleCheckpointError,
                       match="gen: generator was saved on cuda:0, target is on cpu"):
        restore_tree({"gen": torch.Generator()}, bad)
    with pytest.raises(unickpt.IncompatibleCheckpointError, match="gen/state: RNG state of 3"):
        restore_tree({"gen": torch.Generator()},
                     {"gen": {"device": "cpu", "state": np.zeros(3, np.uint8)}})


def test_global_rng_capture_restore():
    a = TorchAdapter()
    torch.manual_seed(5)
    state = a.capture_rng()
    assert state["cpu"].dtype == np.uint8 and isinstance(state["cuda"], list)
    x = torch.rand(4)
    torch.rand(100)
    assert a.restore_rng(state) == []
    assert torch.equal(torch.rand(4), x)


def test_global_rng_with_cuda_state_but_no_cuda_warns_and_restores_cpu():
    a = TorchAdapter()
    torch.manual_seed(6)
    state = a.capture_rng()
    x = torch.rand(3)
    state = {**state, "cuda": [np.zeros(16, np.uint8), np.zeros(16, np.uint8)]}
    warnings = a.restore_rng(state)
    assert torch.equal(torch.rand(3), x)  # the CPU part was restored
    if not torch.cuda.is_available():
        assert warnings == ["torch CUDA RNG of 2 device(s) not restored: CUDA is not available "
                            "in this process (CUDA random streams will differ from the saved "
                            "run)"]


def test_global_rng_bad_cpu_state_warns_never_raises():
    warnings = TorchAdapter().restore_rng({"cpu": np.zeros(3, np.uint8), "cuda": []})
    assert warnings == ["torch CPU RNG not restored: RNG state of 3 bytes, this generator's "
                        "state has 5056 (a different RNG algorithm or device type)"]


def test_saving_never_changes_training(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3),
                                torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = L.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    gen = torch.Generator().manual_seed(3)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    sched.step()
    model(torch.randn(5, 4)).sum().backward()  # live gradients at save time
    grads = [p.grad.clone() for p in model.parameters()]
    params = {k: v.clone() for k, v in model.state_dict().items()}
    opt_before = repr(opt.state_dict())
    rng_before = torch.get_rng_state().clone()
    gen_before = gen.get_state().clone()
    state = {"model": model, "optimizer": opt, "scheduler": sched, "gen": gen,
             "rng": unickpt.RNG()}
    unickpt.save(tmp_path / "a", state)
    to_tree(state, snapshot=True)
    with unickpt.CheckpointManager(tmp_path / "run", async_save=True) as mgr:
        assert mgr.save(1, state)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.equal(gen.get_state(), gen_before)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert_bitwise_equal(dict(model.state_dict()), params)
    assert repr(opt.state_dict()) == opt_before
    assert model.training


def test_adapter_kinds_and_protocol():
    from unickpt.adapters import Adapter, adapter_for

    a = TorchAdapter()
    assert isinstance(a, Adapter)
    o = _opt()
    cases = {torch.zeros(1): "torch.Tensor", torch.nn.Parameter(torch.zeros(1)): "torch.Tensor",
             torch.nn.Linear(1, 1): "torch.nn.Module", o: "torch.optim.Optimizer",
             L.StepLR(o, 1): "torch.optim.lr_scheduler.LRScheduler",
             L.ReduceLROnPlateau(o): "torch.optim.lr_scheduler.LRScheduler",
             torch.amp.GradScaler("cpu"): "torch.amp.GradScaler",
             torch.Generator(): "torch.Generator"}
    for obj, kind in cases.items():
        assert a.kind_of(obj) == kind
        assert adapter_for(obj)[1] == kind
    assert a.kind_of(torch.device("cpu")) is None


def test_iterable_dataset_loader_is_refused_with_the_path():
    # Map-style DataLoaders are state leaves (unickpt_torch.data); an IterableDataset has no
    # index sampler to fast-forward.
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(3))

    loader = torch.utils.data.DataLoader(Stream())
    with pytest.raises(unickpt.UnsupportedLeafError,
                       match=r"cannot save data: a DataLoader over an IterableDataset"):
        to_tree({"data": loader})


def test_async_save_snapshots_before_returning(tmp_path):
    model = torch.nn.Linear(3, 3)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    exp_avg = opt.state[model.weight]["exp_avg"].clone()
    with unickpt.CheckpointManager(tmp_path, async_save=True) as mgr:
        assert mgr.save(1, {"model": model, "optimizer": opt})
        with torch.no_grad():  # training goes on while the checkpoint is written
            model.weight.add_(1.0)
            opt.state[model.weight]["exp_avg"].mul_(0.0)
    tree = unickpt.load(tmp_path / "step_1")
    assert tree["model"]["weight"].tobytes() == expected["weight"].numpy().tobytes()
    assert tree["optimizer"]["state"]["weight"]["exp_avg"].tobytes() == exp_avg.numpy().tobytes()


@pytest.mark.skipif(torch.cuda.is_available(), reason="simulates a machine without CUDA")
def test_rng_leaf_from_a_gpu_machine_restores_on_cpu_with_a_warning():
    torch.manual_seed(3)
    tree, _ = to_tree({"rng": unickpt.RNG()})
    x = torch.rand(2)
    tree["rng"]["torch"]["cuda"] = [np.zeros(16, np.uint8)] * 4  # saved on a 4-GPU machine
    with pytest.warns(UserWarning, match=r"torch CUDA RNG of 4 device\(s\) not restored: CUDA "
                                         r"is not available"):
        restore_tree({"rng": unickpt.RNG()}, tree)
    assert torch.equal(torch.rand(2), x)
