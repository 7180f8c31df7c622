"""Fine-tunes with frozen weights resume bitwise with incremental saves on, and the frozen
weights are written once: a LoRA-style torch fine-tune (frozen base, trained adapters) and a
Flax model whose backbone is frozen with ``optax.multi_transform``."""

from __future__ import annotations

import os

import numpy as np
import pytest

import unickpt
from unickpt.format import groups
from unickpt.manager import RunRoot


@pytest.fixture(autouse=True)
def small_groups(monkeypatch):
    monkeypatch.setattr(groups, "SPLIT_BYTES", 0)
    monkeypatch.setattr(groups, "ALONE_BYTES", 8192)
    monkeypatch.setattr(groups, "GROUP_BYTES", 1 << 16)
    monkeypatch.setattr(groups, "MERGE_BYTES", 0)


def _assert_shared(root: str, step: int, frozen_bytes: int) -> None:
    info = RunRoot(root).read_info(step)
    assert info["shared_files"] >= 2, info
    assert info["nbytes"] - info["written_bytes"] >= frozen_bytes, info


# ----------------------------------------------------------------- torch LoRA


def test_torch_lora_fine_tune_resumes_bitwise_with_sharing(tmp_path):
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class LoRALinear(nn.Module):
        def __init__(self, d: int, r: int):
            super().__init__()
            self.base = nn.Linear(d, d)
            self.base.requires_grad_(False)  # the frozen pretrained weight
            self.A = nn.Parameter(torch.randn(r, d) * 0.01)
            self.B = nn.Parameter(torch.zeros(d, r))

        def forward(self, x):
            return self.base(x) + x @ self.A.T @ self.B.T

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(LoRALinear(64, 4), nn.ReLU(), LoRALinear(64, 4))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        return {"model": model, "opt": opt}

    def step_fn(state, step):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 64, generator=g), torch.randn(8, 64, generator=g)
        state["opt"].zero_grad()
        loss = ((state["model"](x) - y) ** 2).mean()
        loss.backward()
        state["opt"].step()

    def run(root, until, every_save=True):
        state = build()
        with unickpt.CheckpointManager(root) as m:
            start = m.restore(state).step
            for s in range(start + 1, until + 1):
                step_fn(state, s)
                if every_save:
                    m.save(s, state)
        return state

    root = str(tmp_path / "run")
    run(root, 3)
    resumed = run(root, 6)  # resumes from step 3, saves 4..6
    straight = run(str(tmp_path / "straight"), 6, every_save=False)
    a, b = resumed["model"].state_dict(), straight["model"].state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype, k
    oa, ob = resumed["opt"].state_dict()["state"], straight["opt"].state_dict()["state"]
    for i in ob:
        for k in ob[i]:
            assert torch.equal(oa[i][k], ob[i][k]), (i, k)
    base = 2 * 64 * 64 * 4  # both frozen base weights, in files of their own
    for s in (2, 3, 4, 5, 6):
        _assert_shared(root, s, base)
    ino = [{os.stat(f"{root}/step_{s}/{f}").st_ino for f in os.listdir(f"{root}/step_{s}")
            if f.endswith(".safetensors")} for s in (1, 6)]
    assert len(ino[0] & ino[1]) >= 2  # the base weights: written at step 1, never again
    assert unickpt.verify(f"{root}/step_6").ok


# ----------------------------------------------------------------- Flax, frozen backbone


def test_flax_frozen_backbone_resumes_bitwise_with_sharing(tmp_path):
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    nn = pytest.importorskip("flax.linen")
    jnp = jax.numpy

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(64, name="backbone_0")(x))
            x = nn.relu(nn.Dense(64, name="backbone_1")(x))
            return nn.Dense(4, name="head")(x)

    net = Net()
    labels = {"backbone_0": "frozen", "backbone_1": "frozen", "head": "train"}
    tx = optax.multi_transform({"frozen": optax.set_to_zero(), "train": optax.adam(1e-2)},
                               lambda p: {k: labels[k] for k in p})

    def build():
        params = net.init(jax.random.key(0), jnp.zeros((1, 32)))["params"]
        return {"params": params, "opt": tx.init(params), "step": 0}

    @jax.jit
    def train_step(params, opt, x, y):
        loss = lambda p: ((net.apply({"params": p}, x) - y) ** 2).mean()  # noqa: E731
        g = jax.grad(loss)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt

    def run(root, until, save=True):
        state = build()
        with unickpt.CheckpointManager(root) as m:
            state = m.restore(state).state
            for s in range(state["step"] + 1, until + 1):
                k = jax.random.fold_in(jax.random.key(1), s)
                x = jax.random.normal(k, (8, 32))
                y = jax.random.normal(jax.random.fold_in(k, 1), (8, 4))
                p, o = train_step(state["params"], state["opt"], x, y)
                state = {"params": p, "opt": o, "step": s}
                if save:
                    m.save(s, state)
        return state

    root = str(tmp_path / "run")
    run(root, 3)
    resumed = run(root, 6)
    straight = run(str(tmp_path / "straight"), 6, save=False)
    la, lb = jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(straight)
    assert len(la) == len(lb)
    for a, b in zip(la, lb):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    # the frozen backbone kernels: 32x64 and 64x64 float32, shared at every save
    for s in (2, 3, 4, 5, 6):
        _assert_shared(root, s, (32 * 64 + 64 * 64) * 4)
    assert unickpt.verify(f"{root}/step_6").ok
