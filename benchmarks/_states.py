"""The benchmark states: nested dicts of numpy arrays, built deterministically.

(a) ``big``: ~1 GiB in 64 float32 arrays.
(b) ``small``: 10,000 small arrays of mixed shapes and dtypes (per-array overhead dominates).
(c) ``transformer``: a decoder-only transformer's bf16 weights plus fp32 Adam moments and a step.
``quick=True`` shrinks each of them so the whole benchmark runs in seconds.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)


def _fill(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Random bytes reinterpreted (cheap for 1 GiB, and incompressible like real weights)."""
    dt = np.dtype(dtype)
    n = int(np.prod(shape)) * dt.itemsize
    raw = rng.integers(0, 256, size=n, dtype=np.uint8)
    a = raw.view(dt).reshape(shape)
    if dt.kind == "f":  # keep floats finite so every system round-trips them unchanged
        a[~np.isfinite(a)] = 0
    return a


def big(quick: bool = False) -> dict:
    rng = np.random.default_rng(1)
    n = 64
    per = (16 << 20) if not quick else (256 << 10)  # bytes per array: 64 x 16 MiB = 1 GiB
    cols = 1024
    return {f"layer{i:02d}": {"w": _fill(rng, (per // 4 // cols, cols), np.float32)}
            for i in range(n)}


def small(quick: bool = False) -> dict:
    rng = np.random.default_rng(2)
    n = 10_000 if not quick else 1_000
    shapes = [(16,), (64,), (8, 8), (32, 4), (256,), (4, 4, 4), (128,), (1,)]
    dtypes = [np.float32, np.float32, np.float32, np.int32, np.float16]
    out: dict = {}
    for i in range(n):
        group = out.setdefault(f"g{i // 100:03d}", {})
        group[f"p{i % 100:02d}"] = _fill(rng, shapes[i % len(shapes)], dtypes[i % len(dtypes)])
    return out


def transformer(quick: bool = False) -> dict:
    """A decoder-only LM (GPT-2-small-like widths) with AdamW state, stored as a training would."""
    rng = np.random.default_rng(3)
    d, layers, vocab = (768, 8, 32000) if not quick else (128, 2, 1000)
    params: dict = {"embed": {"weight": _fill(rng, (vocab, d), BF16)}, "layers": {}}
    for i in range(layers):
        params["layers"][str(i)] = {
            "attn": {"qkv": _fill(rng, (3 * d, d), BF16), "qkv_bias": _fill(rng, (3 * d,), BF16),
                     "out": _fill(rng, (d, d), BF16), "out_bias": _fill(rng, (d,), BF16)},
            "mlp": {"up": _fill(rng, (4 * d, d), BF16), "up_bias": _fill(rng, (4 * d,), BF16),
                    "down": _fill(rng, (d, 4 * d), BF16), "down_bias": _fill(rng, (d,), BF16)},
            "ln1": {"scale": _fill(rng, (d,), BF16), "bias": _fill(rng, (d,), BF16)},
            "ln2": {"scale": _fill(rng, (d,), BF16), "bias": _fill(rng, (d,), BF16)},
        }
    params["ln_f"] = {"scale": _fill(rng, (d,), BF16), "bias": _fill(rng, (d,), BF16)}

    def moments(tree: Any) -> Any:
        if isinstance(tree, dict):
            return {k: moments(v) for k, v in tree.items()}
        return _fill(rng, tree.shape, np.float32)

    return {"params": params,
            "opt": {"mu": moments(params), "nu": moments(params),
                    "count": np.array(1000, np.int64)}}


STATES = {"big": big, "small": small, "transformer": transformer}
DESCRIPTIONS = {
    "big": "~1 GiB in 64 float32 arrays",
    "small": "10,000 small arrays (f32/i32/f16, 4 B - 1 KiB each)",
    "transformer": "transformer (d=768, 8 layers, vocab 32k): bf16 weights + fp32 Adam mu/nu",
}


def flatten(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dict -> {"a/b/c": array} (the flat naming torch/safetensors/npz users use)."""
    out: dict[str, np.ndarray] = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "/"))
        else:
            out[name] = v
    return out


def nbytes(tree: Any) -> int:
    return sum(a.nbytes for a in flatten(tree).values())
