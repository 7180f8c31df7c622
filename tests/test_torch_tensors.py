"""torch.Tensor leaves: every dtype bit for bit, aliasing rules, devices, errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _torch_helpers import assert_bitwise_equal
from hypothesis import given, settings
from hypothesis import strategies as st
from unickpt_torch.tensors import from_numpy, numpy_dtype, to_numpy

import unickpt
from unickpt.state import restore_tree, to_tree

BIT_VIEW = [torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz,
            torch.float8_e5m2fnuz, torch.float8_e8m0fnu]
NATIVE = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
          torch.uint16, torch.uint32, torch.uint64, torch.float16, torch.float32,
          torch.float64, torch.complex64, torch.complex128]


def _every_bit_pattern(dtype: torch.dtype) -> torch.Tensor:
    """All 2**8 / 2**16 bit patterns (NaN payloads, -0, inf included) as ``dtype``."""
    if dtype == torch.bfloat16:
        return torch.arange(0, 2**16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    return torch.arange(0, 256, dtype=torch.int16).to(torch.uint8).view(dtype)


@pytest.mark.parametrize("dtype", BIT_VIEW, ids=str)
def test_bf16_and_float8_round_trip_every_bit_pattern(tmp_path, dtype):
    t = _every_bit_pattern(dtype)
    unickpt.save(tmp_path / "c", {"t": t})
    loaded = unickpt.load(tmp_path / "c")["t"]
    assert loaded.dtype == numpy_dtype(dtype)
    # the bits torch itself reports (no adapter involved) are the bits numpy reads back
    carrier, np_carrier = (torch.int16, np.uint16) if dtype == torch.bfloat16 else \
        (torch.uint8, np.uint8)
    assert (loaded.view(np_carrier) == t.view(carrier).numpy().view(np_carrier)).all()
    assert len(np.unique(loaded.view(np_carrier))) == t.numel()  # every pattern, none lost
    target = torch.zeros_like(t)
    restore_tree({"t": target}, unickpt.load(tmp_path / "c"))
    assert_bitwise_equal(target, t)


def test_bf16_and_float8_are_zero_copy_bit_views():
    # Not routed through float32: the numpy array is a view of the tensor's own bytes.
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        t = torch.tensor([1.0, float("nan"), -0.0], dtype=dtype)
        a = to_numpy(t)
        carrier = torch.int16 if dtype == torch.bfloat16 else torch.int8
        assert np.shares_memory(a, t.view(carrier).numpy())
        assert a.dtype == numpy_dtype(dtype)


@pytest.mark.parametrize("dtype", NATIVE + BIT_VIEW, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (4, 5)], ids=str)
def test_every_dtype_and_shape_round_trips(tmp_path, dtype, shape):
    g = torch.Generator().manual_seed(1)
    raw = torch.randint(0, 256, (*shape, torch.empty(0, dtype=dtype).element_size()),
                        dtype=torch.uint8, generator=g)
    t = raw.view(dtype).reshape(shape) if dtype != torch.bool else (raw[..., 0] & 1).bool()
    unickpt.save(tmp_path / "c", {"t": t})
    target = torch.empty(shape, dtype=dtype)
    out = restore_tree({"t": target}, unickpt.load(tmp_path / "c"))
    assert out["t"] is target
    assert_bitwise_equal(target, t)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=3), st.integers(0, 2**32 - 1),
       st.sampled_from([torch.float32, torch.bfloat16, torch.float8_e5m2, torch.int64]))
def test_noncontiguous_views_round_trip(shape, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn([s * 2 for s in shape], generator=g).to(dtype)
    view = base[tuple(slice(None, None, 2) for _ in shape)]
    if len(shape) > 1:
        view = view.transpose(0, -1)
    tree, _ = to_tree({"t": view})
    back = from_numpy(tree["t"])
    assert_bitwise_equal(back, view)


def test_cpu_tensor_aliases_memory_unless_snapshot():
    t = torch.arange(4, dtype=torch.float32)
    live, _ = to_tree({"t": t})
    snap, _ = to_tree({"t": t}, snapshot=True)
    t.add_(10)
    assert live["t"].tolist() == [10.0, 11.0, 12.0, 13.0]  # zero-copy view of the tensor
    assert snap["t"].tolist() == [0.0, 1.0, 2.0, 3.0]       # private copy


def test_parameter_is_a_tensor_leaf_and_restored_in_place(tmp_path):
    p = torch.nn.Parameter(torch.randn(3))
    unickpt.save(tmp_path / "c", {"p": p})
    q = torch.nn.Parameter(torch.zeros(3))
    out = restore_tree({"p": q}, unickpt.load(tmp_path / "c"))
    assert out["p"] is q and q.requires_grad and q.grad is None
    assert torch.equal(q, p)


def test_restore_from_read_only_memory_map(tmp_path):
    t = torch.randn(5, dtype=torch.float64)
    unickpt.save(tmp_path / "c", {"t": t})
    target = torch.zeros(5, dtype=torch.float64)
    restore_tree({"t": target}, unickpt.load(tmp_path / "c", mmap=True))
    assert torch.equal(target, t)


def test_shape_and_dtype_mismatch_listed_and_nothing_modified(tmp_path):
    unickpt.save(tmp_path / "c", {"a": torch.zeros(3), "b": torch.zeros(2, dtype=torch.int32),
                                  "c": torch.zeros(1)})
    a, b, c = torch.ones(4), torch.ones(2, dtype=torch.int64), torch.ones(1)
    with pytest.raises(unickpt.IncompatibleCheckpointError) as ei:
        restore_tree({"a": a, "b": b, "c": c}, unickpt.load(tmp_path / "c"))
    msg = str(ei.value)
    assert "a: target float32[4], checkpoint float32[3]" in msg
    assert "b: target int64[2], checkpoint int32[2]" in msg
    assert [p for p, _ in ei.value.mismatched] == ["a", "b"]
    assert c.item() == 1.0  # planning found problems: nothing was applied


def _complex32() -> torch.Tensor:
    # torch warns once per process that complex32 is experimental; that is not under test
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.zeros(2, dtype=torch.complex32)


def test_unsupported_tensors_name_the_path():
    with pytest.raises(unickpt.UnsupportedLeafError, match=r"cannot save x/s: .*sparse_coo"):
        to_tree({"x": {"s": torch.zeros(2, 2).to_sparse()}})
    half = _complex32()
    with pytest.raises(unickpt.UnsupportedLeafError, match=r"cannot save h: .*complex32"):
        to_tree({"h": half})


def test_sharded_array_copied_piecewise_into_tensor():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    s = unickpt.ShardedArray((3, 4), a.dtype, [unickpt.Piece(((0, 3), (0, 2)), a[:, :2]),
                                               unickpt.Piece(((0, 3), (2, 4)), a[:, 2:])])
    t = torch.zeros(3, 4)
    restore_tree({"t": t}, {"t": s})
    assert t.numpy().tolist() == a.tolist()


def test_restore_into_unsupported_dtype_is_a_listed_mismatch():
    target = _complex32()
    with pytest.raises(unickpt.IncompatibleCheckpointError,
                       match=r"t: torch dtype torch.complex32 has no lossless numpy"):
        restore_tree({"t": target}, {"t": np.zeros(2, np.complex64)})
