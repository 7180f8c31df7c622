"""Optimizers: every built-in torch.optim optimizer, state keyed by parameter name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _torch_helpers import assert_bitwise_equal

import unickpt
from unickpt.state import restore_tree, to_tree

OPTIMIZERS = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.1),
    "SGD-nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "Adam-amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-2),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5, centered=True),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
    "Adadelta": lambda p: torch.optim.Adadelta(p),
    "Adamax": lambda p: torch.optim.Adamax(p),
    "NAdam": lambda p: torch.optim.NAdam(p),
    "RAdam": lambda p: torch.optim.RAdam(p),
    "ASGD": lambda p: torch.optim.ASGD(p, t0=1),
    "Rprop": lambda p: torch.optim.Rprop(p),
    "LBFGS": lambda p: torch.optim.LBFGS(p, history_size=3, max_iter=4),
}


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))


def _train(model, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(6, 3, generator=g)

        def closure(x=x):
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            return loss

        opt.step(closure)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_builtin_optimizer_resumes_bitwise(tmp_path, name):
    make = OPTIMIZERS[name]
    m = _model(0)
    opt = make(m.parameters())
    _train(m, opt, 3)
    unickpt.save(tmp_path / "c", {"model": m, "optimizer": opt})
    saved = unickpt.load(tmp_path / "c")["optimizer"]
    assert saved["type"] == f"{type(opt).__module__}.{type(opt).__qualname__}"
    assert set(saved["state"]) <= {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert saved["param_groups"][0]["params"] == ["0.weight", "0.bias", "2.weight", "2.bias"]

    m2 = _model(1)
    opt2 = make(m2.parameters())
    restore_tree({"model": m2, "optimizer": opt2}, unickpt.load(tmp_path / "c"))
    assert_bitwise_equal(opt2.state_dict(), opt.state_dict())
    _train(m, opt, 2, seed=1)
    _train(m2, opt2, 2, seed=1)
    assert_bitwise_equal(dict(m2.state_dict()), dict(m.state_dict()))
    assert_bitwise_equal(opt2.state_dict(), opt.state_dict())


def test_sparse_adam(tmp_path):
    def build(seed):
        torch.manual_seed(seed)
        emb = torch.nn.Embedding(10, 3, sparse=True)
        return emb, torch.optim.SparseAdam(emb.parameters(), lr=0.1)

    def step(emb, opt, idx):
        opt.zero_grad()
        emb(torch.tensor(idx)).sum().backward()
        opt.step()

    emb, opt = build(0)
    step(emb, opt, [1, 2])
    unickpt.save(tmp_path / "c", {"emb": emb, "opt": opt})
    emb2, opt2 = build(1)
    restore_tree({"emb": emb2, "opt": opt2}, unickpt.load(tmp_path / "c"))
    for e, o in ((emb, opt), (emb2, opt2)):
        step(e, o, [2, 7])
    assert_bitwise_equal(emb2.weight, emb.weight)
    assert_bitwise_equal(opt2.state_dict(), opt.state_dict())


def test_lbfgs_non_tensor_state_kept_exactly():
    m = _model(0)
    opt = torch.optim.LBFGS(m.parameters(), history_size=3, max_iter=4)
    _train(m, opt, 2)
    tree, _ = to_tree({"model": m, "optimizer": opt})
    st = tree["optimizer"]["state"]["0.weight"]
    live = opt.state_dict()["state"][0]
    assert type(st["func_evals"]) is int and st["func_evals"] == live["func_evals"]
    assert type(st["n_iter"]) is int and st["n_iter"] == live["n_iter"]
    assert type(st["t"]) is type(live["t"]) and st["t"] == live["t"]
    assert isinstance(st["old_dirs"], list) and len(st["old_dirs"]) == len(live["old_dirs"])
    group = tree["optimizer"]["param_groups"][0]
    assert group["tolerance_change"] == 1e-9 and group["line_search_fn"] is None


def test_hyperparameters_and_tuples_kept_and_restored(tmp_path):
    m = _model(0)
    opt = torch.optim.Adam([{"params": m[0].parameters(), "lr": 0.25},
                            {"params": m[2].parameters(), "betas": (0.5, 0.75)}], lr=0.125)
    _train(m, opt, 1)
    unickpt.save(tmp_path / "c", {"model": m, "optimizer": opt})
    groups = unickpt.load(tmp_path / "c")["optimizer"]["param_groups"]
    assert [g["params"] for g in groups] == [["0.weight", "0.bias"], ["2.weight", "2.bias"]]
    assert groups[0]["lr"] == 0.25 and groups[1]["betas"] == (0.5, 0.75)
    m2 = _model(0)
    opt2 = torch.optim.Adam([{"params": m2[0].parameters()}, {"params": m2[2].parameters()}])
    restore_tree({"model": m2, "optimizer": opt2}, unickpt.load(tmp_path / "c"))
    assert opt2.param_groups[0]["lr"] == 0.25 and opt2.param_groups[1]["betas"] == (0.5, 0.75)
    assert opt2.param_groups[1]["lr"] == 0.125


def test_tensor_learning_rate(tmp_path):
    m = _model(0)
    opt = torch.optim.Adam(m.parameters(), lr=torch.tensor(0.01))
    _train(m, opt, 1)
    unickpt.save(tmp_path / "c", {"model": m, "optimizer": opt})
    assert isinstance(unickpt.load(tmp_path / "c")["optimizer"]["param_groups"][0]["lr"],
                      np.ndarray)
    m2 = _model(0)
    opt2 = torch.optim.Adam(m2.parameters(), lr=torch.tensor(0.5))
    restore_tree({"model": m2, "optimizer": opt2}, unickpt.load(tmp_path / "c"))
    assert_bitwise_equal(opt2.param_groups[0]["lr"], torch.tensor(0.01))


def test_names_qualified_when_params_span_several_modules():
    gen, disc = _model(0), _model(1)
    ema = _model(2)  # a module owning none of the optimizer's params does not qualify names
    opt = torch.optim.SGD([*gen.parameters(), *disc.parameters()], lr=0.1, momentum=0.9)
    _train(gen, opt, 1)
    tree, _ = to_tree({"nets": {"gen": gen, "disc": disc}, "ema": ema, "opt": opt})
    assert tree["opt"]["param_groups"][0]["params"] == [
        "nets/gen/0.weight", "nets/gen/0.bias", "nets/gen/2.weight", "nets/gen/2.bias",
        "nets/disc/0.weight", "nets/disc/0.bias", "nets/disc/2.weight", "nets/disc/2.bias"]
    tree2, _ = to_tree({"gen": gen, "ema": ema, "opt": torch.optim.SGD(gen.parameters())})
    assert tree2["opt"]["param_groups"][0]["params"][0] == "0.weight"


def test_params_without_module_use_index_names_or_param_names(tmp_path):
    w = torch.nn.Parameter(torch.randn(3))
    b = torch.nn.Parameter(torch.randn(1))
    opt = torch.optim.Adam([w, b])
    (w.sum() + b.sum()).backward()
    opt.step()
    tree, _ = to_tree({"opt": opt})
    assert tree["opt"]["param_groups"][0]["params"] == ["param_0", "param_1"]
    named = torch.optim.Adam([("w", w), ("b", b)])
    tree, _ = to_tree({"opt": named})
    assert tree["opt"]["param_groups"][0]["params"] == ["w", "b"]
    assert "param_names" not in tree["opt"]["param_groups"][0]
    unickpt.save(tmp_path / "c", {"opt": opt})
    w2, b2 = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(1))
    opt2 = torch.optim.Adam([w2, b2])
    restore_tree({"opt": opt2}, unickpt.load(tmp_path / "c"))
    assert_bitwise_equal(opt2.state_dict(), opt.state_dict())


def test_state_follows_names_not_positions(tmp_path):
    # The same parameters given to the optimizer in another order still get their own state.
    m = _model(0)
    opt = torch.optim.Adam(m.parameters())
    _train(m, opt, 2)
    unickpt.save(tmp_path / "c", {"model": m, "optimizer": opt})
    m2 = _model(0)
    opt2 = torch.optim.Adam(list(m2.parameters())[::-1])
    restore_tree({"model": m2, "optimizer": opt2}, unickpt.load(tmp_path / "c"))
    assert_bitwise_equal(opt2.state[m2[0].weight]["exp_avg"], opt.state[m[0].weight]["exp_avg"])
    assert_bitwise_equal(opt2.state[m2[2].bias]["exp_avg_sq"], opt.state[m[2].bias]["exp_avg_sq"])


def test_incompatible_optimizer_lists_every_problem(tmp_path):
    m = _model(0)
    opt = torch.optim.Adam(m.parameters())
    _train(m, opt, 1)
    unickpt.save(tmp_path / "c", {"model": m, "optimizer": opt})
    m2 = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2),
                             torch.nn.Linear(2, 2))
    opt2 = torch.optim.SGD(m2.parameters())
    before = [p.clone() for p in m2.parameters()]
    with pytest.raises(unickpt.IncompatibleCheckpointError) as ei:
        restore_tree({"model": m2, "optimizer": opt2}, unickpt.load(tmp_path / "c"))
    e = ei.value
    assert ("optimizer/type", "target is torch.optim.sgd.SGD, checkpoint holds "
            "torch.optim.adam.Adam state") in e.mismatched
    assert 'optimizer/param_groups/0/params/"3.weight"' in e.missing
    assert 'optimizer/param_groups/0/params/"3.bias"' in e.missing
    assert 'model/"3.weight"' in e.missing
    assert all(torch.equal(a, b) for a, b in zip(before, m2.parameters()))
    assert opt2.state_dict()["state"] == {}


def test_optimizer_state_shape_mismatch_and_group_count(tmp_path):
    m = _model(0)
    opt = torch.optim.Adam(m.parameters())
    _train(m, opt, 1)
    tree, _ = to_tree({"model": m, "optimizer": opt})
    tree["optimizer"]["state"]["0.bias"]["exp_avg"] = np.zeros(4, np.float32)
    m2 = _model(0)
    with pytest.raises(unickpt.IncompatibleCheckpointError,
                       match=r'optimizer/state/"0.bias"/exp_avg: parameter shape \[5\], '
                             r"checkpoint float32\[4\]"):
        restore_tree({"model": m2, "optimizer": torch.optim.Adam(m2.parameters())}, tree)
    two = torch.optim.Adam([{"params": m2[0].parameters()}, {"params": m2[2].parameters()}])
    with pytest.raises(unickpt.IncompatibleCheckpointError,
                       match="optimizer/param_groups: target has 2 parameter groups, "
                             "checkpoint 1"):
        restore_tree({"model": m2, "optimizer": two}, tree)


def test_partial_restore_of_a_grown_model(tmp_path):
    m = _model(0)
    opt = torch.optim.Adam(m.parameters())
    _train(m, opt, 2)
    unickpt.save(tmp_path / "c", {"model": m, "optimizer": opt})
    torch.manual_seed(0)
    m2 = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2),
                             torch.nn.Linear(2, 2))
    opt2 = torch.optim.Adam(m2.parameters())
    restore_tree({"model": m2, "optimizer": opt2}, unickpt.load(tmp_path / "c"), strict=False)
    assert_bitwise_equal(opt2.state[m2[0].weight]["exp_avg"], opt.state[m[0].weight]["exp_avg"])
    assert m2[3].weight not in opt2.state
    _train(m2, opt2, 1)  # the new layer's state starts fresh
    assert opt2.state[m2[3].weight]["step"].item() == 1.0
