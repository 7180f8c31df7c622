"""End to end: migrate runs between PyTorch and Flax NNX through the adapters and continue them.

Measured (see the report printed with ``-s``): the maximum relative parameter difference
after continuing K steps in both frameworks, checked against per-direction, per-optimizer,
per-dtype tolerances set from the measured figures (``TOL``).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
nnx = pytest.importorskip("flax.nnx")

pytest.importorskip("unickpt_torch.adapter", reason="the torch adapter is not in this tree")
pytest.importorskip("unickpt_jax.nnx", reason="the jax adapter is not in this tree")

import _migrate_models as M  # noqa: E402

import unickpt  # noqa: E402
from unickpt.migration import describe_optimizer  # noqa: E402
from unickpt.migration.rules import flatten_rules  # noqa: E402
from unickpt.state import restore_tree  # noqa: E402

N, K, T = 3, 3, 12  # steps before the switch, steps after, schedule length
# Max relative parameter difference after continuing K steps in both frameworks, per direction,
# optimizer and dtype: measured (x86-64 CPU, torch 2.13, jax 0.10.2; mlp / cnn) and set at
# about 2.2x the larger of the two, so that a float64 state rounded through float32 anywhere
# (relative error ~6e-8) fails every float64 case.
TOL = {
    ("torch->jax", "sgd", "f64"): 4e-8,     # 1.799e-08 / 1.711e-08
    ("torch->jax", "adam", "f64"): 1.5e-8,  # 6.063e-09 / 1.149e-09
    ("torch->jax", "adamw", "f64"): 1.5e-8,  # 6.063e-09 / 1.150e-09
    ("torch->jax", "sgd", "f32"): 1.6e-7,   # 7.148e-08 / 6.539e-08
    ("torch->jax", "adam", "f32"): 8e-6,    # 3.441e-06 / 6.352e-07
    ("torch->jax", "adamw", "f32"): 8e-6,   # 3.520e-06 / 6.209e-07
    ("jax->torch", "adamw", "f64"): 1.6e-8,  # 7.197e-09 (mlp)
    ("jax->torch", "sgd", "f64"): 1e-7,     # 4.367e-08 (mlp)
    ("jax->torch", "adam", "f64"): 4e-8,    # 1.825e-08 (cnn)
    ("jax->torch", "adamw", "f32"): 6.5e-6,  # 2.834e-06 (mlp)
    ("jax->torch", "sgd", "f32"): 1.2e-6,   # 5.479e-07 (mlp)
    ("jax->torch", "adam", "f32"): 7.5e-6,  # 3.347e-06 (cnn)
}
MEASURED: dict[str, float] = {}


def _dtypes(dt):
    return (np.float64, torch.float64) if dt == "f64" else (np.float32, torch.float32)


def _rules(kind):
    return flatten_rules("head", (M.C, M.HW, M.HW)) if kind == "cnn" else None


def _torch_run(kind, algo, tdt):
    m = M.torch_model(kind, tdt)
    o = M.torch_optimizer(m, algo)
    return m, o, M.torch_scheduler(o, T)


def _nnx_run(kind, algo, npdt):
    m = M.nnx_model(kind, npdt)
    return m, nnx.Optimizer(m, M.optax_tx(algo, total=T), wrt=nnx.Param)


@pytest.mark.parametrize("dt", ["f32", "f64"])
@pytest.mark.parametrize("algo", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_torch_to_jax_continues_like_torch(tmp_path, kind, algo, dt):
    npdt, tdt = _dtypes(dt)
    with jax.enable_x64(dt == "f64"):
        tm, to, ts = _torch_run(kind, algo, tdt)
        M.torch_train(kind, tm, to, ts, N, 0, npdt)
        unickpt.save(tmp_path / f"src/step_{N}",
                     {"model": tm, "optimizer": to, "scheduler": ts, "step": N})
        jm, jo = _nnx_run(kind, algo, npdt)
        target = {"model": jm, "optimizer": jo, "step": 0}
        rep = unickpt.migrate(tmp_path / f"src/step_{N}", tmp_path / "dst", to="jax",
                              target=target, rules=_rules(kind))
        assert rep.path == str(tmp_path / "dst" / f"step_{N}") and rep.step == N
        info = unickpt.inspect(rep.path).info
        assert info["migrated_from"]["source_framework"] == "torch"
        assert info["migrated_from"]["source"] == str(tmp_path / f"src/step_{N}")
        with unickpt.CheckpointManager(tmp_path / "dst", resume="auto") as mgr:
            restored = mgr.restore(target)
        assert restored.resumed and restored.step == N and restored.state["step"] == N
        assert int(jo.step[...]) == N
        M.torch_train(kind, tm, to, ts, K, N, npdt)
        M.nnx_train(kind, jm, jo, K, N, npdt)
        diff = M.max_rel_diff(M.nnx_params_as_torch(kind, jm), M.torch_params(tm))
    MEASURED[f"torch->jax {kind} {algo} {dt}"] = diff
    print(f"\ntorch->jax {kind} {algo} {dt}: max relative parameter difference {diff:.3e}")
    assert diff <= TOL["torch->jax", algo, dt], diff


@pytest.mark.parametrize("dt", ["f32", "f64"])
@pytest.mark.parametrize("kind,algo", [("mlp", "adamw"), ("mlp", "sgd"), ("cnn", "adam")])
def test_jax_to_torch_continues_like_jax(tmp_path, kind, algo, dt):
    npdt, tdt = _dtypes(dt)
    with jax.enable_x64(dt == "f64"):
        jm, jo = _nnx_run(kind, algo, npdt)
        M.nnx_train(kind, jm, jo, N, 0, npdt)
        unickpt.save(tmp_path / f"src/step_{N}", {"model": jm, "optimizer": jo, "step": N},
                     metadata={"unickpt.optimizer": describe_optimizer(jo, N)})
        tm, to, ts = _torch_run(kind, algo, tdt)
        target = {"model": tm, "optimizer": to, "scheduler": ts, "step": 0}
        rep = unickpt.migrate(tmp_path / f"src/step_{N}", tmp_path / "dst", to="torch",
                              target=target, rules=_rules(kind))
        restored = restore_tree(target, unickpt.load(rep.path))
        assert restored["step"] == N and ts.last_epoch == N
        M.torch_train(kind, tm, to, ts, K, N, npdt)
        M.nnx_train(kind, jm, jo, K, N, npdt)
        diff = M.max_rel_diff(M.torch_params(tm), M.nnx_params_as_torch(kind, jm))
    print(f"\njax->torch {kind} {algo} {dt}: max relative parameter difference {diff:.3e}")
    assert diff <= TOL["jax->torch", algo, dt], diff


def _flat(tree, prefix=()):
    from unickpt.tree import iter_leaves

    return {p: v for p, v in iter_leaves(tree)}


@pytest.mark.parametrize("kind,algo", [("mlp", "adamw"), ("cnn", "sgd")])
def test_torch_jax_torch_round_trip_is_bit_exact(tmp_path, kind, algo):
    tm, to, ts = _torch_run(kind, algo, torch.float32)
    M.torch_train(kind, tm, to, ts, N, 0, np.float32)
    unickpt.save(tmp_path / f"a/step_{N}", {"model": tm, "optimizer": to, "scheduler": ts,
                                            "step": N})
    jm, jo = _nnx_run(kind, algo, np.float32)
    unickpt.migrate(tmp_path / f"a/step_{N}", tmp_path / "b", to="jax",
                    target={"model": jm, "optimizer": jo, "step": 0}, rules=_rules(kind))
    tm2, to2, ts2 = _torch_run(kind, algo, torch.float32)
    rep = unickpt.migrate(tmp_path / f"b/step_{N}", tmp_path / "c", to="torch",
                          target={"model": tm2, "optimizer": to2, "scheduler": ts2, "step": 0},
                          rules=_rules(kind))
    a = _flat(unickpt.load(tmp_path / f"a/step_{N}"))
    c = _flat(unickpt.load(rep.path))
    arrays = 0
    for p, v in a.items():
        if p[0] in ("model", "optimizer") and isinstance(v, np.ndarray):
            assert p in c, p
            assert c[p].dtype == v.dtype and c[p].tobytes() == v.tobytes(), p
            arrays += 1
    assert arrays >= 8
    assert c[("scheduler", "last_epoch")] == N
    assert c[("scheduler", "_last_lr", 0)] == a[("scheduler", "_last_lr", 0)]


def test_bfloat16_stays_bfloat16(tmp_path):
    import ml_dtypes

    tm = M.torch_model("mlp", torch.bfloat16)
    unickpt.save(tmp_path / "s/step_0", {"model": tm, "step": 0})
    jm = M.nnx_model("mlp", jax.numpy.bfloat16)
    rep = unickpt.migrate(tmp_path / "s/step_0", tmp_path / "d", to="jax",
                          target={"model": jm, "step": 0})
    out = unickpt.load(rep.path)["model"]
    w = tm.fc1.weight.detach().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    assert out["fc1"]["kernel"].dtype == ml_dtypes.bfloat16
    assert out["fc1"]["kernel"].tobytes() == np.ascontiguousarray(w.T).tobytes()


def _torch_ckpt(tmp_path, algo="adamw", **opt_kw):
    tm = M.torch_model("mlp", torch.float32)
    to = (torch.optim.AdamW(tm.parameters(), lr=1e-3, **opt_kw) if algo == "adamw"
          else M.torch_optimizer(tm, algo))
    M.torch_train("mlp", tm, to, None, 2, 0, np.float32)
    unickpt.save(tmp_path / "s/step_2", {"model": tm, "optimizer": to, "step": 2})
    return tmp_path / "s/step_2"


def test_adamw_weight_decay_default_trap_is_an_error_unless_overridden(tmp_path):
    src = _torch_ckpt(tmp_path)  # torch AdamW default weight_decay=1e-2
    jm = M.nnx_model("mlp", np.float32)
    jo = nnx.Optimizer(jm, optax.adamw(1e-3), wrt=nnx.Param)  # optax default 1e-4
    target = {"model": jm, "optimizer": jo, "step": 0}
    with pytest.raises(unickpt.HyperparameterMismatchError) as e:
        unickpt.migrate(src, tmp_path / "d", to="jax", target=target)
    assert "weight_decay: source 0.01, target 0.0001" in str(e.value)
    assert "torch.optim.AdamW defaults to weight_decay=1e-2" in str(e.value)
    assert not (tmp_path / "d" / "step_2").exists()
    rep = unickpt.migrate(src, tmp_path / "d", to="jax", target=target,
                          overrides={"weight_decay": "target"})
    assert any("weight_decay" in n for n in rep.notes)


def test_amsgrad_is_refused_with_an_explanation(tmp_path):
    src = _torch_ckpt(tmp_path, amsgrad=True)
    jm = M.nnx_model("mlp", np.float32)
    jo = nnx.Optimizer(jm, optax.adamw(1e-3, weight_decay=1e-2), wrt=nnx.Param)
    with pytest.raises(unickpt.UnsupportedOptimizerError, match="AMSGrad has no faithful optax"):
        unickpt.migrate(src, tmp_path / "d", to="jax",
                        target={"model": jm, "optimizer": jo, "step": 0})


def test_every_unmatched_leaf_is_listed_and_partial_migration_is_opt_in(tmp_path):
    src = _torch_ckpt(tmp_path)

    class Other(nnx.Module):
        def __init__(self, rngs):
            self.fc1 = nnx.Linear(M.IN, M.HID, rngs=rngs)
            self.extra = nnx.Linear(M.HID, 2, rngs=rngs)

    jm = Other(nnx.Rngs(0))
    with pytest.raises(unickpt.IncompatibleCheckpointError) as e:
        unickpt.migrate(src, tmp_path / "d", to="jax", target={"model": jm, "step": 0})
    err = e.value
    assert err.missing == ["model/extra.bias", "model/extra.kernel"]
    assert err.unexpected == ["model/fc2.bias", "model/fc2.weight", "model/ln.bias",
                              "model/ln.weight", "optimizer"]
    rep = unickpt.migrate(src, tmp_path / "d", to="jax", target={"model": jm, "step": 0},
                          strict=False)
    assert rep.partial["kept_initial"] == ["model/extra.bias", "model/extra.kernel"]
    out = unickpt.load(rep.path)["model"]
    tm = M.torch_model("mlp", torch.float32)
    assert out["fc1"]["kernel"].shape == tuple(tm.fc1.weight.shape[::-1])


class _TorchBN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(M.C_IN, M.C, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(M.C)
        self.head = torch.nn.Linear(M.C * M.HW * M.HW, M.OUT)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


class _NnxBN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(M.C_IN, M.C, (3, 3), padding="SAME", rngs=rngs)
        self.bn = nnx.BatchNorm(M.C, momentum=0.9, epsilon=1e-5, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.head = nnx.Linear(M.C * M.HW * M.HW, M.OUT, rngs=rngs)


def test_batchnorm_stats_and_rng_streams(tmp_path):
    import random

    torch.manual_seed(0)
    tm = _TorchBN()
    to = torch.optim.SGD(tm.parameters(), lr=0.05, momentum=0.9)
    for s in range(N):  # train mode: running stats and num_batches_tracked advance
        x, y = M.data("cnn", np.float32, s)
        to.zero_grad()
        ((tm(torch.from_numpy(x)) - torch.from_numpy(y)) ** 2).mean().backward()
        to.step()
    src = tmp_path / f"s/step_{N}"
    unickpt.save(src, {"model": tm, "optimizer": to, "step": N, "rng": unickpt.RNG()},
                 metadata={"seed": 1234})
    jm = _NnxBN(nnx.Rngs(0, dropout=1))
    jo = nnx.Optimizer(jm, optax.sgd(0.05, momentum=0.9), wrt=nnx.Param)
    rules = flatten_rules("head", (M.C, M.HW, M.HW))
    random.seed(7)
    np.random.seed(7)
    rep = unickpt.migrate(src, tmp_path / "d", to="jax", rules=rules,
                          target={"model": jm, "optimizer": jo, "step": 0, "rng": unickpt.RNG()})
    assert (random.random(), np.random.random()) == (random.Random(7).random(),
                                                      np.random.RandomState(7).random_sample())
    out = unickpt.load(rep.path)
    bn = out["model"]["bn"]
    assert bn["mean"].tobytes() == tm.bn.running_mean.numpy().tobytes()
    assert bn["var"].tobytes() == tm.bn.running_var.numpy().tobytes()  # unbiased, as stored
    assert "model/bn.num_batches_tracked" in rep.dropped
    # the dropout stream is re-derived from the recorded seed and the step, deterministically
    key = out["model"]["drop"]["rngs"]["key"]["key_data"]
    assert out["model"]["drop"]["rngs"]["count"] == 0
    info = unickpt.inspect(rep.path).info["migrated_from"]
    assert info["seed"] == 1234 and "statistically, not bitwise" in info["rng"]
    rep2 = unickpt.migrate(src, tmp_path / "d2", to="jax", rules=rules,
                           target={"model": jm, "optimizer": jo, "step": 0,
                                   "rng": unickpt.RNG()})
    out2 = unickpt.load(rep2.path)
    r1, r2 = _flat(out["rng"]), _flat(out2["rng"])
    assert r1.keys() == r2.keys() and all(
        np.asarray(r1[p]).tobytes() == np.asarray(r2[p]).tobytes() for p in r1)
    key2 = out2["model"]["drop"]["rngs"]["key"]["key_data"]
    assert key2.tobytes() == key.tobytes()
    rep3 = unickpt.migrate(src, tmp_path / "d3", to="jax", rules=rules,
                           target={"model": jm, "optimizer": jo, "step": 0},
                           overrides={"seed": 99})
    key3 = unickpt.load(rep3.path)["model"]["drop"]["rngs"]["key"]["key_data"]
    assert key3.tobytes() != key.tobytes()
    # and back to torch: bit exact weights, stats, momentum; num_batches_tracked = step
    tm2 = _TorchBN()
    to2 = torch.optim.SGD(tm2.parameters(), lr=0.05, momentum=0.9)
    back = unickpt.migrate(rep.path, tmp_path / "t", to="torch", rules=rules,
                           target={"model": tm2, "optimizer": to2, "step": 0},
                           overrides={"source_optimizer": describe_optimizer(to2)})
    a, c = unickpt.load(src), unickpt.load(back.path)
    for k, v in a["model"].items():
        assert c["model"][k].tobytes() == v.tobytes(), k
    for k, v in a["optimizer"]["state"].items():
        assert c["optimizer"]["state"][k]["momentum_buffer"].tobytes() == \
            v["momentum_buffer"].tobytes()
    assert any("drop/rngs" in d for d in back.dropped)


def test_cli_migrate_command(tmp_path, monkeypatch, capsys):
    from unickpt.cli.cmd_migrate import migrate_command

    src = _torch_ckpt(tmp_path)
    (tmp_path / "mig_target.py").write_text(
        "import numpy as np, optax\nfrom flax import nnx\nimport _migrate_models as M\n"
        "def state():\n    m = M.nnx_model('mlp', np.float32)\n"
        "    return {'model': m, 'optimizer': nnx.Optimizer(m, optax.adamw(1e-3, "
        "weight_decay=1e-2), wrt=nnx.Param), 'step': 0}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert migrate_command(str(src), str(tmp_path / "d"), "jax", "mig_target:state",
                           progress=True) == 0
    assert f"wrote {tmp_path / 'd' / 'step_2'} (step 2, torch -> jax)" in capsys.readouterr().out
    assert migrate_command(str(src), str(tmp_path / "e"), "jax", "mig_target:nope",
                           progress=False) == 4
    assert "module 'mig_target' has no function 'nope'" in capsys.readouterr().err
    assert migrate_command(str(src), str(tmp_path / "d"), "jax", "mig_target:state",
                           progress=False) == 4
    assert "already exists" in capsys.readouterr().err
    # the same through the command line (`unickpt migrate SRC DST --to jax --target M:F`)
    from unickpt.cli import main

    assert main(["migrate", str(src), str(tmp_path / "f"), "--to", "jax",
                 "--target", "mig_target:state", "--no-progress"]) == 0
    assert (tmp_path / "f" / "step_2" / "manifest.msgpack").exists()


@pytest.mark.parametrize("algo", ["adam", "sgd"])
def test_float64_with_constant_lr_agrees_to_double_rounding(tmp_path, algo):
    # With a schedule, optax evaluates the learning rate in float32 (int32 count) even in x64
    # mode, which bounds agreement near 1e-8; with a constant lr it is double rounding.
    with jax.enable_x64(True):
        tm = M.torch_model("mlp", torch.float64)
        to = M.torch_optimizer(tm, algo)
        M.torch_train("mlp", tm, to, None, N, 0, np.float64)
        unickpt.save(tmp_path / f"s/step_{N}", {"model": tm, "optimizer": to, "step": N})
        jm, _ = _nnx_run("mlp", algo, np.float64)
        jo = nnx.Optimizer(jm, M.optax_tx(algo), wrt=nnx.Param)
        target = {"model": jm, "optimizer": jo, "step": 0}
        rep = unickpt.migrate(tmp_path / f"s/step_{N}", tmp_path / "d", to="jax", target=target)
        restore_tree(target, unickpt.load(rep.path))
        M.torch_train("mlp", tm, to, None, K, N, np.float64)
        M.nnx_train("mlp", jm, jo, K, N, np.float64)
        diff = M.max_rel_diff(M.nnx_params_as_torch("mlp", jm), M.torch_params(tm))
    print(f"\ntorch->jax mlp {algo} f64 constant lr: max relative parameter difference {diff:.3e}")
    assert diff <= 1e-13


def test_jax_source_hyperparameters_checked_when_recorded(tmp_path):
    jm, jo = _nnx_run("mlp", "adamw", np.float32)
    M.nnx_train("mlp", jm, jo, 2, 0, np.float32)
    unickpt.save(tmp_path / "a/step_2", {"model": jm, "optimizer": jo, "step": 2},
                 metadata={"unickpt.optimizer": describe_optimizer(jo, 2)})
    unickpt.save(tmp_path / "b/step_2", {"model": jm, "optimizer": jo, "step": 2})

    def target(wd):
        tm = M.torch_model("mlp", torch.float32)
        to = torch.optim.AdamW(tm.parameters(), lr=5e-3, weight_decay=wd)
        return {"model": tm, "optimizer": to, "scheduler": M.torch_scheduler(to, T), "step": 0}

    with pytest.raises(unickpt.HyperparameterMismatchError) as e:
        unickpt.migrate(tmp_path / "a/step_2", tmp_path / "x", to="torch", target=target(1e-4))
    assert e.value.differences == [("weight_decay", 1e-2, 1e-4)]
    rep = unickpt.migrate(tmp_path / "a/step_2", tmp_path / "y", to="torch", target=target(1e-2))
    assert rep.notes == []
    rep = unickpt.migrate(tmp_path / "b/step_2", tmp_path / "z", to="torch", target=target(1e-4))
    assert any("records no optimizer hyperparameters" in n for n in rep.notes)
    assert unickpt.inspect(rep.path).info["migrated_from"]["notes"] == rep.notes


def test_tied_torch_weights_feed_an_untied_flax_twin(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(7, 4)
            self.head = torch.nn.Linear(4, 7, bias=False)
            self.head.weight = self.embed.weight

    class Untied(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(7, 4, rngs=rngs)
            self.head = nnx.Linear(4, 7, use_bias=False, rngs=rngs)

    tm = Tied()
    to = torch.optim.SGD(tm.parameters(), lr=0.1, momentum=0.9)
    out = tm.head(tm.embed(torch.tensor([1, 2, 3])))
    out.square().mean().backward()
    to.step()
    unickpt.save(tmp_path / "s/step_1", {"model": tm, "optimizer": to, "step": 1})
    jm = Untied(nnx.Rngs(0))
    jo = nnx.Optimizer(jm, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    rep = unickpt.migrate(tmp_path / "s/step_1", tmp_path / "d", to="jax",
                          target={"model": jm, "optimizer": jo, "step": 0})
    got = unickpt.load(rep.path)
    w = tm.embed.weight.detach().numpy()
    assert got["model"]["embed"]["embedding"].tobytes() == w.tobytes()
    assert got["model"]["head"]["kernel"].tobytes() == np.ascontiguousarray(w.T).tobytes()
    buf = to.state[tm.embed.weight]["momentum_buffer"].numpy()
    trace = got["optimizer"]["opt_state"][0]["trace"]
    assert trace["head"]["kernel"].tobytes() == np.ascontiguousarray(buf.T).tobytes()
    assert trace["embed"]["embedding"].tobytes() == buf.tobytes()
