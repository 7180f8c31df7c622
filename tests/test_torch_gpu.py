"""CUDA paths: device placement, lazy/pinned host copies, bf16 on device, CUDA RNG.

Skipped without CUDA.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _torch_helpers import assert_bitwise_equal
from unickpt_torch.adapter import TorchAdapter

import unickpt
from unickpt.state import restore_tree, to_tree

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _net(device):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
                               torch.nn.Linear(8, 2)).to(device)


def test_cuda_tensors_are_lazy_unless_snapshot():
    t = torch.arange(6, dtype=torch.float32, device="cuda")
    live, _ = to_tree({"t": t})
    assert isinstance(live["t"], unickpt.LazyArray)
    snap, _ = to_tree({"t": t}, snapshot=True)
    assert isinstance(snap["t"], np.ndarray)
    t.add_(100)  # enqueued after the snapshot's copy on the same stream
    assert snap["t"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert live["t"].materialize().tolist()[0] == 100.0


def test_snapshot_uses_pinned_host_memory(monkeypatch):
    pinned = []
    real_empty = torch.empty

    def spy(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if kwargs.get("pin_memory"):
            pinned.append(out)
        return out

    monkeypatch.setattr(torch, "empty", spy)
    to_tree({"m": _net("cuda")}, snapshot=True)
    assert pinned and all(p.is_pinned() for p in pinned)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float16])
def test_low_precision_on_device_round_trip(tmp_path, dtype):
    t = torch.randn(64, device="cuda").to(dtype)
    unickpt.save(tmp_path / "c", {"t": t})
    target = torch.zeros(64, device="cuda", dtype=dtype)
    restore_tree({"t": target}, unickpt.load(tmp_path / "c"))
    assert target.device.type == "cuda"
    assert_bitwise_equal(target, t)


def test_cuda_checkpoint_restores_onto_cpu_and_back(tmp_path):
    m = _net("cuda")
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(5, 4, device="cuda")).sum().backward()
    opt.step()
    unickpt.save(tmp_path / "gpu", {"model": m, "optimizer": opt})
    cpu = _net("cpu")
    cpu_opt = torch.optim.AdamW(cpu.parameters())
    restore_tree({"model": cpu, "optimizer": cpu_opt}, unickpt.load(tmp_path / "gpu"))
    assert all(p.device.type == "cpu" for p in cpu.parameters())
    assert all(v.device.type == "cpu" for s in cpu_opt.state.values() for k, v in s.items()
               if k != "step")
    assert_bitwise_equal(dict(cpu.state_dict()), dict(m.state_dict()))
    unickpt.save(tmp_path / "cpu", {"model": cpu, "optimizer": cpu_opt})
    back = _net("cuda")
    back_opt = torch.optim.AdamW(back.parameters())
    restore_tree({"model": back, "optimizer": back_opt}, unickpt.load(tmp_path / "cpu"))
    assert all(v.device.type == "cuda" for s in back_opt.state.values()
               for k, v in s.items() if k != "step")
    assert_bitwise_equal(back_opt.state_dict(), opt.state_dict())


def test_cuda_rng_captured_and_restored():
    a = TorchAdapter()
    torch.cuda.manual_seed_all(11)
    state = a.capture_rng()
    assert len(state["cuda"]) == torch.cuda.device_count()
    x = torch.rand(4, device="cuda")
    torch.rand(100, device="cuda")
    assert a.restore_rng(state) == []
    assert torch.equal(torch.rand(4, device="cuda"), x)


def test_more_saved_cuda_devices_than_present_warns():
    a = TorchAdapter()
    state = a.capture_rng()
    n = len(state["cuda"])
    state["cuda"] = state["cuda"] + [state["cuda"][0]] * 2
    warnings = a.restore_rng(state)
    assert warnings == [f"torch CUDA RNG saved for {n + 2} devices, this process has {n}; "
                        f"devices {n}, {n + 1} not restored"]


def test_cuda_generator(tmp_path):
    g = torch.Generator(device="cuda").manual_seed(4)
    torch.rand(3, device="cuda", generator=g)
    unickpt.save(tmp_path / "c", {"g": g})
    g2 = torch.Generator(device="cuda")
    restore_tree({"g": g2}, unickpt.load(tmp_path / "c"))
    assert torch.equal(torch.rand(3, device="cuda", generator=g2),
                       torch.rand(3, device="cuda", generator=g))
