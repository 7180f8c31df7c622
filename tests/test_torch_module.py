"""nn.Module state: flat name -> array layout, tied weights, validation, partial restores."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _torch_helpers import assert_bitwise_equal

import unickpt
from unickpt.state import restore_tree, to_tree


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=11, dim=6, tie=True):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.norm = torch.nn.LayerNorm(dim)
        self.bn = torch.nn.BatchNorm1d(dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        if tie:
            self.head.weight = self.embed.weight
        self.register_buffer("scratch", torch.zeros(2), persistent=False)

    def forward(self, ids):
        return self.head(self.norm(self.embed(ids)))


def _trained(seed=0, tie=True):
    torch.manual_seed(seed)
    m = TinyLM(tie=tie)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    m.train()
    m.bn(torch.randn(4, 6))  # moves running stats and num_batches_tracked
    return m


def test_layout_is_flat_state_dict_with_aliases():
    m = _trained()
    tree, kinds = to_tree({"model": m})
    t = tree["model"]
    assert list(t) == ["embed.weight", "norm.weight", "norm.bias", "bn.weight", "bn.bias",
                       "bn.running_mean", "bn.running_var", "bn.num_batches_tracked",
                       "__aliases__"]
    assert t["__aliases__"] == {"head.weight": "embed.weight"}
    assert kinds[("model",)] == "torch:torch.nn.Module"
    assert t["bn.num_batches_tracked"].dtype == np.int64 and t["bn.num_batches_tracked"] == 1
    assert np.shares_memory(t["embed.weight"], m.embed.weight.detach().numpy())


def test_round_trip_bitwise_and_tie_survives(tmp_path):
    m = _trained(0)
    unickpt.save(tmp_path / "c", {"model": m})
    m2 = _trained(1)
    ids = {k: id(v) for k, v in m2.state_dict(keep_vars=True).items()}
    out = restore_tree({"model": m2}, unickpt.load(tmp_path / "c"))
    assert out["model"] is m2
    assert m2.head.weight is m2.embed.weight  # still tied: one Parameter
    assert {k: id(v) for k, v in m2.state_dict(keep_vars=True).items()} == ids  # in place
    assert_bitwise_equal(dict(m2.state_dict()), dict(m.state_dict()))
    with torch.no_grad():
        m2.embed.weight[0, 0] = 42.0
    assert m2.head.weight[0, 0].item() == 42.0


def test_tied_checkpoint_into_untied_model_fills_both(tmp_path):
    m = _trained(0, tie=True)
    unickpt.save(tmp_path / "c", {"model": m})
    m2 = _trained(1, tie=False)
    restore_tree({"model": m2}, unickpt.load(tmp_path / "c"))
    assert m2.head.weight is not m2.embed.weight
    assert torch.equal(m2.head.weight, m.embed.weight)
    assert torch.equal(m2.embed.weight, m.embed.weight)


def test_untied_checkpoint_into_tied_model(tmp_path):
    m = _trained(0, tie=False)
    unickpt.save(tmp_path / "c", {"model": m})
    m2 = _trained(1, tie=True)
    restore_tree({"model": m2}, unickpt.load(tmp_path / "c"))
    assert m2.head.weight is m2.embed.weight and torch.equal(m2.embed.weight, m.embed.weight)


def test_every_problem_listed_and_nothing_modified(tmp_path):
    src = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    unickpt.save(tmp_path / "c", {"model": src, "epoch": 1})
    dst = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2),
                              torch.nn.Linear(2, 2))
    dst[2] = torch.nn.Linear(5, 2, bias=False)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(unickpt.IncompatibleCheckpointError) as ei:
        restore_tree({"model": dst, "epoch": 0}, unickpt.load(tmp_path / "c"))
    e = ei.value
    # (format_path quotes keys that start with a digit)
    assert e.missing == ['model/"3.bias"', 'model/"3.weight"']
    assert e.unexpected == ['model/"2.bias"']
    assert e.mismatched == [
        ('model/"0.bias"', "target float32[5], checkpoint float32[4]"),
        ('model/"0.weight"', "target float32[5, 3], checkpoint float32[4, 3]"),
        ('model/"2.weight"', "target float32[2, 5], checkpoint float32[2, 4]")]
    assert "strict=False" in str(e)
    assert_bitwise_equal(dict(dst.state_dict()), before)


def test_strict_false_loads_what_fits_but_shapes_still_error(tmp_path):
    src = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    unickpt.save(tmp_path / "c", {"model": src})
    dst = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2), torch.nn.Linear(2, 7))
    restore_tree({"model": dst}, unickpt.load(tmp_path / "c"), strict=False)
    assert torch.equal(dst[0].weight, src[0].weight) and torch.equal(dst[1].bias, src[1].bias)
    bad = torch.nn.Sequential(torch.nn.Linear(3, 9))
    with pytest.raises(unickpt.IncompatibleCheckpointError, match=r'model/"0.weight": target '
                       r"float32\[9, 3\], checkpoint float32\[4, 3\]"):
        restore_tree({"model": bad}, unickpt.load(tmp_path / "c"), strict=False)


def test_weights_only_restore_with_select(tmp_path):
    m = _trained(0)
    opt = torch.optim.AdamW(m.parameters())
    unickpt.save(tmp_path / "c", {"model": m, "optimizer": opt, "step": 7})
    m2 = _trained(1)
    state = restore_tree({"model": m2, "step": 0}, unickpt.load(tmp_path / "c"),
                         strict=False, select=[("model",)])
    assert state["step"] == 0
    assert_bitwise_equal(dict(m2.state_dict()), dict(m.state_dict()))


class WithExtra(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.counter = 0

    def get_extra_state(self):
        return {"counter": self.counter, "tag": "v1"}

    def set_extra_state(self, state):
        self.counter = state["counter"]


def test_extra_state_round_trips(tmp_path):
    m = torch.nn.Sequential(WithExtra())
    m[0].counter = 5
    unickpt.save(tmp_path / "c", {"m": m})
    assert unickpt.load(tmp_path / "c")["m"]["0._extra_state"] == {"counter": 5, "tag": "v1"}
    m2 = torch.nn.Sequential(WithExtra())
    restore_tree({"m": m2}, unickpt.load(tmp_path / "c"))
    assert m2[0].counter == 5 and torch.equal(m2[0].lin.weight, m[0].lin.weight)


def test_module_restored_from_non_module_tree_is_a_mismatch():
    with pytest.raises(unickpt.IncompatibleCheckpointError,
                       match="model: target is a torch module, checkpoint has a int"):
        restore_tree({"model": torch.nn.Linear(1, 1)}, {"model": 3})


def test_compiled_and_data_parallel_wrappers_are_transparent(tmp_path):
    m = _trained(0)
    wrapped = torch.nn.DataParallel(m)
    assert next(iter(wrapped.state_dict())).startswith("module.")
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
    wrapped(torch.tensor([1, 2])).sum().backward()
    opt.step()
    unickpt.save(tmp_path / "c", {"model": wrapped, "optimizer": opt})
    tree = unickpt.load(tmp_path / "c")
    assert "embed.weight" in tree["model"] and "embed.weight" in tree["optimizer"]["state"]
    plain = _trained(1)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    restore_tree({"model": plain, "optimizer": plain_opt}, tree)
    assert_bitwise_equal(dict(plain.state_dict()), dict(m.state_dict()))
    assert_bitwise_equal(plain_opt.state_dict(), opt.state_dict())
    with warnings.catch_warnings():  # torch's own import-time deprecation noise
        warnings.simplefilter("ignore", DeprecationWarning)
        compiled = torch.compile(_trained(2))
    restore_tree({"model": compiled}, tree, select=[("model",)])
    assert_bitwise_equal(dict(compiled._orig_mod.state_dict()), dict(m.state_dict()))
