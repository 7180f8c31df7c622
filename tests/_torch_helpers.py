"""Shared helpers of the torch adapter tests: bit-for-bit comparison of torch states."""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
import torch


def _bits(t: torch.Tensor) -> bytes:
    from unickpt_torch.tensors import to_numpy

    return to_numpy(t.detach().to("cpu").contiguous()).tobytes()


def assert_bitwise_equal(a: Any, b: Any, path: str = "") -> None:
    """Recursively compare tensors (dtype, shape, bits), floats (bits) and containers."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, (path, a.dtype, b.dtype, a.shape,
                                                           b.shape)
        assert _bits(a) == _bits(b), f"{path}: tensors differ"
    elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert a.tobytes() == b.tobytes(), f"{path}: arrays differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (path, list(a), list(b))
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), (path, a, b)
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{path}/{i}")
    elif isinstance(a, float):
        assert isinstance(b, float), (path, a, b)
        assert struct.pack("<d", a) == struct.pack("<d", b) or (math.isnan(a) and math.isnan(b)), \
            (path, a, b)
    else:
        assert type(a) is type(b) and a == b, (path, a, b)


def full_state(model: torch.nn.Module, opt: Any = None, sched: Any = None) -> dict:
    """Everything that must match after a bitwise resume, as plain torch structures."""
    out: dict[str, Any] = {"model": dict(model.state_dict()),
                           "cpu_rng": torch.get_rng_state()}
    if opt is not None:
        out["opt"] = opt.state_dict()
    if sched is not None:
        out["sched"] = sched.state_dict()
    return out
