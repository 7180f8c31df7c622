"""Shared helpers of the torch adapter tests: bit-for-bit comparison of torch states."""

from __future__ import annotations

from typing import Any

import torch

from unickpt.testing import assert_trees_equal


def _bits(t: torch.Tensor) -> bytes:
    from unickpt_torch.tensors import to_numpy

    return to_numpy(t.detach().to("cpu").contiguous()).tobytes()


def assert_bitwise_equal(a: Any, b: Any, path: str = "") -> None:
    """Compare tensors, arrays, scalars and containers bit for bit (NaNs by their bits).

    Delegates to :func:`unickpt.testing.assert_trees_equal`, the checker users get, so the
    project's own adapter tests exercise it.  ``path`` is kept for call sites that name the
    subtree being compared; the report names every differing leaf itself.
    """
    try:
        assert_trees_equal(a, b)
    except AssertionError as e:
        raise AssertionError(f"{path}: {e}" if path else str(e)) from None


def full_state(model: torch.nn.Module, opt: Any = None, sched: Any = None) -> dict:
    """Everything that must match after a bitwise resume, as plain torch structures."""
    out: dict[str, Any] = {"model": dict(model.state_dict()),
                           "cpu_rng": torch.get_rng_state()}
    if opt is not None:
        out["opt"] = opt.state_dict()
    if sched is not None:
        out["sched"] = sched.state_dict()
    return out
