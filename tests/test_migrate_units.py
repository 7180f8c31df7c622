"""Framework-neutral tests of the migration building blocks (numpy trees only)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unickpt.migration import HyperparameterMismatchError, UnsupportedOptimizerError
from unickpt.migration.optim import OptimizerSpec, compare_specs, from_torch, to_torch_state
from unickpt.migration.rules import (
    Rule,
    conv_to_flax,
    conv_to_torch,
    match_leaves,
    nchw_flatten_to_flax,
    nhwc_flatten_to_torch,
)
from unickpt.migration.schedule import cosine_note, torch_position


def spec(a):
    return (a.shape, a.dtype)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 3), st.lists(st.integers(1, 4), min_size=2, max_size=2))
def test_conv_layouts_round_trip_and_match_flax_convention(nspatial, io):
    shape = (io[0], io[1], *([3] * nspatial))  # torch O, I, *k
    w = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    k = conv_to_flax(w)
    assert k.shape == (*([3] * nspatial), io[1], io[0])
    assert conv_to_torch(k).tobytes() == w.tobytes()
    # element [o, i, *s] of the torch weight is element [*s, i, o] of the flax kernel
    idx = tuple(n - 1 for n in shape)
    assert k[(*idx[2:], idx[1], idx[0])] == w[idx]


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))
def test_flatten_permutation_matches_nchw_vs_nhwc_flatten(c, h, w, out):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((out, c * h * w))
    act = rng.standard_normal((c, h, w))
    y_torch = weight @ act.reshape(-1)                            # torch: NCHW flatten
    kernel = nchw_flatten_to_flax((c, h, w))(weight)
    y_flax = act.transpose(1, 2, 0).reshape(-1) @ kernel          # flax: NHWC flatten
    np.testing.assert_allclose(y_flax, y_torch, rtol=1e-12)
    assert nhwc_flatten_to_torch((c, h, w))(kernel).tobytes() == weight.tobytes()


def test_builtin_rules_torch_to_flax_cover_every_layer_kind():
    f = np.float32
    src = {"fc.weight": ((4, 3), f), "fc.bias": ((4,), f), "conv.weight": ((5, 2, 3, 3), f),
           "emb.weight": ((10, 4), f), "ln.weight": ((4,), f), "ln.bias": ((4,), f),
           "bn.weight": ((5,), f), "bn.bias": ((5,), f), "bn.running_mean": ((5,), f),
           "bn.running_var": ((5,), f), "bn.num_batches_tracked": ((), np.int64)}
    tgt = {"fc.kernel": ((3, 4), f), "fc.bias": ((4,), f), "conv.kernel": ((3, 3, 2, 5), f),
           "emb.embedding": ((10, 4), f), "ln.scale": ((4,), f), "ln.bias": ((4,), f),
           "bn.scale": ((5,), f), "bn.bias": ((5,), f), "bn.mean": ((5,), f),
           "bn.var": ((5,), f)}
    m = match_leaves(tgt, src, to="jax")
    assert not (m.missing or m.unexpected or m.mismatched)
    assert m.dropped == ["bn.num_batches_tracked"]
    assert {t: p.source for t, p in m.pairs.items()} == {
        "fc.kernel": "fc.weight", "fc.bias": "fc.bias", "conv.kernel": "conv.weight",
        "emb.embedding": "emb.weight", "ln.scale": "ln.weight", "ln.bias": "ln.bias",
        "bn.scale": "bn.weight", "bn.bias": "bn.bias", "bn.mean": "bn.running_mean",
        "bn.var": "bn.running_var"}
    assert m.pairs["conv.kernel"].transform_name == "conv2d: O,I,*k -> *k,I,O"
    # and back: num_batches_tracked is synthesised for torch
    back = match_leaves(src, tgt, to="torch")
    assert not (back.missing or back.unexpected or back.mismatched)
    assert back.synthesised == ["bn.num_batches_tracked"]
    assert back.pairs["emb.weight"].source == "emb.embedding"


def test_every_problem_is_collected():
    f = np.float32
    m = match_leaves({"a.kernel": ((3, 4), f), "b.kernel": ((2, 2), f), "c.bias": ((2,), f),
                      "d.scale": ((2,), np.float64)},
                     {"a.weight": ((3, 4), f), "b.weight": ((2, 2), f), "x.bias": ((2,), f),
                      "d.weight": ((2,), f)}, to="jax")
    assert m.missing == ["c.bias"]
    assert m.unexpected == ["x.bias"]
    assert [p for p, _ in m.mismatched] == ["a.kernel", "d.scale"]
    assert "becomes [4, 3] after linear" in m.mismatched[0][1]
    assert "no silent casts" in m.mismatched[1][1]


def test_user_rules_rename_and_transform():
    f = np.float32
    rules = [Rule(r"backbone\.(\w+)\.kernel", r"encoder.\1.weight"),
             Rule(r"head\.w", "out.w", transform=lambda a: a * 2, name="double"),
             Rule(r"extra\.p", None)]
    m = match_leaves({"backbone.l1.kernel": ((3, 2), f), "head.w": ((2,), f),
                      "extra.p": ((1,), f)},
                     {"encoder.l1.weight": ((2, 3), f), "out.w": ((2,), f)}, to="jax",
                     rules=rules)
    assert not (m.missing or m.unexpected or m.mismatched)
    assert m.pairs["backbone.l1.kernel"].transform_name.startswith("linear")
    assert m.pairs["head.w"].apply(np.ones(2, f)).tolist() == [2.0, 2.0]
    assert m.synthesised == ["extra.p"]
    bad = match_leaves({"head.w": ((2,), f)}, {}, to="jax", rules=rules)
    assert "'out.w', which the source checkpoint does not have" in bad.mismatched[0][1]


def _adam_sd(steps, amsgrad=False, wd=0.01, decoupled=True):
    state = {i: {"step": np.float32(s), "exp_avg": np.full(2, i, np.float32),
                 "exp_avg_sq": np.full(2, i + 1, np.float32)} for i, s in enumerate(steps)}
    return {"state": state, "param_groups": [{
        "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": wd, "amsgrad": amsgrad,
        "maximize": False, "decoupled_weight_decay": decoupled,
        "params": list(range(len(steps)))}]}


def test_adam_state_round_trips_through_neutral_form():
    st_ = from_torch(_adam_sd([5, 5]), ["a.weight", "b.weight"])
    assert st_.spec.algorithm == "adamw" and st_.count == 5
    assert st_.spec.hparams["weight_decay"] == 0.01
    back = to_torch_state(st_, ["a.weight", "b.weight"])
    assert back[1]["exp_avg_sq"].tolist() == [2.0, 2.0]
    assert back[0]["step"].dtype == np.float32 and float(back[0]["step"]) == 5.0
    assert from_torch(_adam_sd([5, 5], decoupled=False), ["a", "b"]).spec.algorithm == "adam"


def test_uneven_steps_amsgrad_dampening_and_maximize_are_refused():
    with pytest.raises(UnsupportedOptimizerError, match=r"different numbers of optimizer steps "
                                                        r"\(step 4: b; step 5: a\)"):
        from_torch(_adam_sd([5, 4]), ["a", "b"])
    with pytest.raises(UnsupportedOptimizerError, match="AMSGrad has no faithful optax twin"):
        from_torch(_adam_sd([5], amsgrad=True), ["a"])
    sgd = {"state": {}, "param_groups": [{"lr": 0.1, "momentum": 0.9, "dampening": 0.1,
                                          "nesterov": False, "weight_decay": 0,
                                          "maximize": False, "params": [0]}]}
    with pytest.raises(UnsupportedOptimizerError, match="SGD dampening != 0 has no optax twin"):
        from_torch(sgd, ["a"])
    sgd["param_groups"][0].update(dampening=0, maximize=True)
    with pytest.raises(UnsupportedOptimizerError, match="maximize=True has no optax twin"):
        from_torch(sgd, ["a"])
    with pytest.raises(UnsupportedOptimizerError, match=r"torch.optim.RMSprop is not supported"):
        from_torch({"state": {}, "param_groups": [{"lr": 1, "params": []}]}, [],
                   class_name="RMSprop")


def test_hyperparameter_mismatch_lists_every_difference_and_can_be_overridden():
    src = OptimizerSpec("adamw", {"lr": 1e-3, "b1": 0.9, "b2": 0.999, "eps": 1e-8,
                                  "weight_decay": 1e-2}, "torch")
    tgt = OptimizerSpec("adamw", {"lr": 1e-3, "b1": 0.9, "b2": 0.99, "eps": 1e-8,
                                  "weight_decay": 1e-4}, "jax")
    with pytest.raises(HyperparameterMismatchError) as e:
        compare_specs(src, tgt)
    assert e.value.differences == [("b2", 0.999, 0.99), ("weight_decay", 1e-2, 1e-4)]
    msg = str(e.value)
    assert "weight_decay: source 0.01, target 0.0001" in msg
    assert "torch.optim.AdamW defaults to weight_decay=1e-2, optax.adamw to 1e-4" in msg
    assert "overrides={'b2': 'target', 'weight_decay': 'target'}" in msg
    notes = compare_specs(src, tgt, {"b2": "target", "weight_decay": "target"})
    assert len(notes) == 2
    with pytest.raises(HyperparameterMismatchError, match="algorithms differ: source .* adamw"):
        compare_specs(src, OptimizerSpec("adam", tgt.hparams, "jax"))
    # learning rates are compared with a float32-level tolerance (optax schedules are f32)
    compare_specs(OptimizerSpec("sgd", {"lr": 0.1}), OptimizerSpec("sgd", {"lr": 0.1 + 1e-9}))


def test_optax_chains_are_read_from_their_closures():
    optax = pytest.importorskip("optax")
    from unickpt.migration.optax_spec import optax_spec

    s, stages = optax_spec(optax.adamw(optax.linear_schedule(1e-3, 1e-4, 10), b2=0.99,
                                       weight_decay=1e-4), count=5)
    assert s.algorithm == "adamw" and s.hparams["b2"] == 0.99
    assert s.hparams["weight_decay"] == 1e-4
    assert abs(s.hparams["lr"] - 5.5e-4) < 1e-9
    s, _ = optax_spec(optax.sgd(0.1, momentum=0.9, nesterov=True))
    assert s.hparams == {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.0}
    s, _ = optax_spec(optax.chain(optax.add_decayed_weights(1e-3), optax.scale_by_adam(),
                                  optax.scale(-1e-3)))
    assert s.algorithm == "adam" and s.hparams["weight_decay"] == 1e-3
    with pytest.raises(UnsupportedOptimizerError, match="optax chain .* is not supported"):
        optax_spec(optax.lion(1e-3))


def test_schedule_position_and_cosine_warning():
    assert torch_position({"last_epoch": 12}) == 12
    with pytest.raises(UnsupportedOptimizerError, match="no last_epoch"):
        torch_position({"best": 1.0})
    assert "periodic beyond T_max" in cosine_note({"T_max": 10}, 11)
    assert cosine_note({"T_max": 10}, 10) is None


def test_torch_scheduler_replay_matches_stepping_exactly():
    torch = pytest.importorskip("torch")
    from unickpt.migration.schedule import replay_torch_scheduler

    def build():
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=0.3)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7)

    opt, s = build()
    for _ in range(11):
        opt.step()
        s.step()
    opt2, s2 = build()
    sd, lrs = replay_torch_scheduler(s2, 11)
    assert lrs == [g["lr"] for g in opt.param_groups]  # bit-exact floats
    assert sd["last_epoch"] == 11 and sd["_last_lr"] == s.get_last_lr()
    assert s2.last_epoch == 0 and opt2.param_groups[0]["lr"] == 0.3  # target untouched
