"""Twin PyTorch / Flax NNX models, optimizers and training steps for the migration tests.

Shared by tests/test_migrate_e2e.py and examples/migrate_torch_to_flax.py: each model exists in
both frameworks with the same attribute names, so the built-in rules map them.
"""

from __future__ import annotations

import numpy as np

IN, HID, OUT = 6, 8, 3
C_IN, C, HW = 2, 3, 5  # CNN: 2 input channels, 3 conv channels, 5x5 images


def torch_model(kind: str, dtype):
    import torch

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(IN, HID)
            self.ln = torch.nn.LayerNorm(HID)
            self.fc2 = torch.nn.Linear(HID, OUT)

        def forward(self, x):
            return self.fc2(torch.tanh(self.ln(self.fc1(x))))

    class CNN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(C_IN, C, 3, padding=1)
            self.head = torch.nn.Linear(C * HW * HW, OUT)

        def forward(self, x):  # x: NCHW
            return self.head(torch.relu(self.conv(x)).flatten(1))

    torch.manual_seed(0)
    return (MLP() if kind == "mlp" else CNN()).to(dtype)


def nnx_model(kind: str, dtype):
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.fc1 = nnx.Linear(IN, HID, rngs=rngs, param_dtype=dtype, dtype=dtype)
            self.ln = nnx.LayerNorm(HID, epsilon=1e-5, rngs=rngs, param_dtype=dtype, dtype=dtype)
            self.fc2 = nnx.Linear(HID, OUT, rngs=rngs, param_dtype=dtype, dtype=dtype)

        def __call__(self, x):
            import jax.numpy as jnp

            return self.fc2(jnp.tanh(self.ln(self.fc1(x))))

    class CNN(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(C_IN, C, (3, 3), padding="SAME", rngs=rngs, param_dtype=dtype,
                                 dtype=dtype)
            self.head = nnx.Linear(C * HW * HW, OUT, rngs=rngs, param_dtype=dtype, dtype=dtype)

        def __call__(self, x):  # x: NHWC
            import jax

            h = jax.nn.relu(self.conv(x))
            return self.head(h.reshape(h.shape[0], -1))

    return (MLP if kind == "mlp" else CNN)(nnx.Rngs(1))


def torch_optimizer(model, algo: str, lr: float = 0.05, wd: float = 1e-2):
    import torch

    if algo == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    if algo == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr / 10)
    return torch.optim.AdamW(model.parameters(), lr=lr / 10, weight_decay=wd)


def optax_tx(algo: str, lr=0.05, wd: float = 1e-2, total: int = 0):
    import optax

    def sched(base):
        return optax.linear_schedule(base, base * 0.1, total) if total else base

    if algo == "sgd":
        return optax.sgd(sched(lr), momentum=0.9, nesterov=True)
    if algo == "adam":
        return optax.adam(sched(lr / 10))
    return optax.adamw(sched(lr / 10), weight_decay=wd)


def torch_scheduler(opt, total: int):
    import torch

    return torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.1,
                                             total_iters=total)


def data(kind: str, dtype, step: int, n: int = 8):
    """Batch ``step`` as numpy: (x in torch layout, y)."""
    rng = np.random.default_rng(1000 + step)
    shape = (n, IN) if kind == "mlp" else (n, C_IN, HW, HW)
    x = rng.standard_normal(shape)
    # A fixed random teacher makes the task learnable, so loss curves go down.
    dim = int(np.prod(shape[1:]))
    teacher = np.random.default_rng(0).standard_normal((dim, OUT)) / np.sqrt(dim)
    y = np.tanh(x.reshape(n, dim) @ teacher)
    return x.astype(dtype), y.astype(dtype)


def to_jax_x(kind: str, x: np.ndarray) -> np.ndarray:
    return x if kind == "mlp" else np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def torch_train(kind, model, opt, sched, steps, start, dtype):
    import torch

    losses = []
    for s in range(start, start + steps):
        x, y = data(kind, dtype, s)
        opt.zero_grad()
        loss = ((model(torch.from_numpy(x)) - torch.from_numpy(y)) ** 2).mean()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


def nnx_train(kind, model, opt, steps, start, dtype):
    import jax.numpy as jnp
    from flax import nnx

    def loss_fn(m, x, y):
        return ((m(x) - y) ** 2).mean()

    losses = []
    for s in range(start, start + steps):
        x, y = data(kind, dtype, s)
        loss, grads = nnx.value_and_grad(loss_fn)(model, jnp.asarray(to_jax_x(kind, x)),
                                                  jnp.asarray(y))
        opt.update(model, grads)
        losses.append(float(loss))
    return losses


def torch_params(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def nnx_params_as_torch(kind, model) -> dict[str, np.ndarray]:
    """The nnx model's parameters in torch layout and names (for comparisons)."""
    from flax import nnx

    from unickpt.migration.rules import conv_to_torch, nhwc_flatten_to_torch

    out = {}
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = ".".join(str(p) for p in path)
        a = np.asarray(v.get_value())
        mod, leaf = name.rsplit(".", 1)
        if leaf == "kernel":
            if kind == "cnn" and mod == "head":
                a = nhwc_flatten_to_torch((C, HW, HW))(a)
            else:
                a = conv_to_torch(a)
            leaf = "weight"
        elif leaf == "scale":
            leaf = "weight"
        out[f"{mod}.{leaf}"] = a
    return out


def max_rel_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """max |a - b| / max(|b|) over all parameters (relative to each tensor's scale)."""
    worst = 0.0
    for k in a:
        d = np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max()
        scale = max(np.abs(b[k].astype(np.float64)).max(), 1e-30)
        worst = max(worst, float(d / scale))
    return worst
