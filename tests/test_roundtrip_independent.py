"""Round trips checked against expectations computed without unickpt's adapters.

Comparing a tensor with what the library's own adapter restores hides a conversion bug that hits
both directions (bf16 -> zeros would pass).  Here the expected bits come from the frameworks
themselves (``Tensor.view(int)``, ``jax.lax.bitcast_convert_type``) and from numpy/ml_dtypes,
and are compared with the numpy arrays the core loads (save direction) or with the framework
objects restored from a checkpoint written from plain numpy (restore direction).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import unickpt
from unickpt.state import restore_tree

torch = pytest.importorskip("torch")
pytest.importorskip("unickpt_torch")

# torch dtype -> (numpy dtype of the loaded array, torch integer carrier of the same width)
TORCH = {
    torch.bfloat16: (ml_dtypes.bfloat16, torch.int16),
    torch.float8_e4m3fn: (ml_dtypes.float8_e4m3fn, torch.int8),
    torch.float8_e5m2: (ml_dtypes.float8_e5m2, torch.int8),
    torch.float16: (np.float16, torch.int16),
    torch.float32: (np.float32, torch.int32),
    torch.float64: (np.float64, torch.int64),
    torch.int64: (np.int64, torch.int64),
    torch.uint8: (np.uint8, torch.uint8),
}
VALUES = [1.5, -2.0, 0.0, -0.0, 3.25, float("inf"), 0.1, 448.0]


def _patterns(carrier: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    info = torch.iinfo(carrier)
    n = 512 if info.bits <= 16 else 64
    return torch.randint(info.min, info.max, (n,), dtype=carrier, generator=g)


@pytest.mark.parametrize("dtype", list(TORCH), ids=str)
def test_torch_save_writes_torchs_own_bits(tmp_path, dtype):
    np_dtype, carrier = TORCH[dtype]
    t = _patterns(carrier).view(dtype) if dtype.is_floating_point else _patterns(carrier)
    expected = t.view(carrier).numpy().tobytes()  # torch's own bit view, no adapter
    unickpt.save(tmp_path / "c", {"t": t})
    got = unickpt.load(tmp_path / "c")["t"]
    assert type(got) is np.ndarray and got.dtype == np.dtype(np_dtype)
    assert got.tobytes() == expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
                                   torch.float16], ids=str)
def test_torch_values_survive_as_numbers(tmp_path, dtype):
    np_dtype, carrier = TORCH[dtype]
    t = torch.tensor(VALUES, dtype=dtype)
    unickpt.save(tmp_path / "c", {"t": t})
    got = unickpt.load(tmp_path / "c")["t"]
    # numbers as torch rounds them (to float64 by torch), read by ml_dtypes on the other side
    assert got.astype(np.float64).tolist() == t.to(torch.float64).tolist()
    if dtype == torch.bfloat16:
        assert (got.view(np.uint16) == t.view(torch.int16).numpy().view(np.uint16)).all()


@pytest.mark.parametrize("dtype", list(TORCH), ids=str)
def test_torch_restore_from_plain_numpy_bits(tmp_path, dtype):
    np_dtype, carrier = TORCH[dtype]
    rng = np.random.default_rng(3)
    width = np.dtype(np_dtype).itemsize
    raw = rng.integers(0, 256, 64 * width, dtype=np.uint8)
    unickpt.save(tmp_path / "c", {"t": raw.view(np_dtype)})  # written by the numpy core only
    target = torch.zeros(64, dtype=dtype)
    restore_tree({"t": target}, unickpt.load(tmp_path / "c"))
    assert target.view(carrier).numpy().tobytes() == raw.tobytes()


# ---------------------------------------------------------------- JAX
def _jax():
    jax = pytest.importorskip("jax")
    pytest.importorskip("unickpt_jax")
    return jax


JAX_DTYPES = ["bfloat16", "float8_e4m3fn", "float16", "float32", "int32"]
JAX_CARRIER = {1: "uint8", 2: "uint16", 4: "uint32"}


@pytest.mark.parametrize("name", JAX_DTYPES)
def test_jax_save_writes_jaxs_own_bits(tmp_path, name):
    jax = _jax()
    import jax.numpy as jnp

    dt = jnp.dtype(name)
    carrier = JAX_CARRIER[dt.itemsize]
    bits = jax.random.bits(jax.random.key(1), (300,), dtype=jnp.dtype(carrier))
    x = jax.lax.bitcast_convert_type(bits, dt)
    expected = np.asarray(jax.lax.bitcast_convert_type(x, jnp.dtype(carrier))).tobytes()
    unickpt.save(tmp_path / "c", {"x": x})
    got = unickpt.load(tmp_path / "c")["x"]
    assert type(got) is np.ndarray and got.dtype == np.dtype(dt)
    assert got.tobytes() == expected


@pytest.mark.parametrize("name", JAX_DTYPES)
def test_jax_restore_from_plain_numpy_bits(tmp_path, name):
    jax = _jax()
    import jax.numpy as jnp

    dt = jnp.dtype(name)
    raw = np.random.default_rng(5).integers(0, 256, 40 * dt.itemsize, dtype=np.uint8)
    unickpt.save(tmp_path / "c", {"x": raw.view(dt)})
    out = restore_tree({"x": jnp.zeros(40, dt)}, unickpt.load(tmp_path / "c"))["x"]
    assert isinstance(out, jax.Array) and out.dtype == dt
    carrier = jnp.dtype(JAX_CARRIER[dt.itemsize])
    assert np.asarray(jax.lax.bitcast_convert_type(out, carrier)).tobytes() == raw.tobytes()
