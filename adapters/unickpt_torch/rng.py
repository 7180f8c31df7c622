"""torch random number generators: ``torch.Generator`` objects and the global RNG.

A ``torch.Generator`` is stored as ``{"device": "cpu", "state": uint8[N], "initial_seed": int}``
(``state`` is exactly ``get_state()``: 5056 bytes of MT19937 on the CPU, seed + offset of
Philox on CUDA).  The global RNG (captured by ``unickpt.RNG()``) is
``{"cpu": uint8[N], "cuda": [uint8[M], ...]}`` with one entry per visible CUDA device.

>>> import torch
>>> g = torch.Generator().manual_seed(7)
>>> s = capture_generator(g)
>>> a = torch.rand(2, generator=g)
>>> restore_generator(g, s)
>>> bool((torch.rand(2, generator=g) == a).all())
True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from unickpt.tree import Path

__all__ = ["capture_generator", "restore_generator", "prepare_generator_restore",
           "capture_global", "restore_global"]


def _bytes(state: torch.Tensor) -> np.ndarray:
    return state.detach().cpu().numpy().astype(np.uint8, copy=True)


def capture_generator(g: torch.Generator) -> dict[str, Any]:
    return {"device": str(g.device), "state": _bytes(g.get_state()),
            "initial_seed": int(g.initial_seed())}


def restore_generator(g: torch.Generator, tree: dict[str, Any]) -> None:
    g.set_state(torch.from_numpy(np.array(tree["state"], dtype=np.uint8, copy=True)))


def _state_problem(current: torch.Tensor, saved: Any) -> str | None:
    if not isinstance(saved, np.ndarray) or saved.dtype != np.uint8 or saved.ndim != 1:
        return "expected a uint8 vector (torch RNG state)"
    if saved.shape[0] != current.numel():
        return (f"RNG state of {saved.shape[0]} bytes, this generator's state has "
                f"{current.numel()} (a different RNG algorithm or device type)")
    return None


def prepare_generator_restore(g: torch.Generator, tree: Any, ctx: Any,
                              path: Path) -> Callable[[], Any]:
    if not isinstance(tree, dict) or "state" not in tree:
        ctx.mismatch(path, "target is a torch.Generator, checkpoint holds no generator state")
        return lambda: g
    saved_dev = str(tree.get("device", "cpu"))
    if saved_dev.split(":")[0] != g.device.type:
        ctx.mismatch(path, f"generator was saved on {saved_dev}, target is on {g.device}; "
                           "CPU and CUDA generators use different algorithms")
        return lambda: g
    why = _state_problem(g.get_state(), tree["state"])
    if why:
        ctx.mismatch((*path, "state"), why)
        return lambda: g

    def apply() -> torch.Generator:
        restore_generator(g, tree)
        return g

    return apply


def _cuda_ready() -> bool:
    try:
        return torch.cuda.is_initialized() or torch.cuda.is_available()
    except Exception:  # a broken driver must not break saving
        return False


def capture_global() -> dict[str, Any]:
    """torch's CPU RNG state and, when CUDA is usable, every device's CUDA RNG state."""
    cuda: list[np.ndarray] = []
    if _cuda_ready():
        try:
            cuda = [_bytes(s) for s in torch.cuda.get_rng_state_all()]
        except Exception:  # e.g. CUDA unusable in a forked child: nothing consumed, skip it
            cuda = []
    return {"cpu": _bytes(torch.get_rng_state()), "cuda": cuda}


def restore_global(state: Any) -> list[str]:
    """Restore :func:`capture_global`'s output; never raises, returns warnings instead."""
    warnings: list[str] = []
    if not isinstance(state, dict):
        return [f"torch RNG state not restored: expected a dict, found {type(state).__name__}"]
    cpu = state.get("cpu")
    why = None if cpu is None else _state_problem(torch.get_rng_state(), cpu)
    if cpu is None or why:
        warnings.append(f"torch CPU RNG not restored: {why or 'absent from the checkpoint'}")
    else:
        torch.set_rng_state(torch.from_numpy(np.array(cpu, dtype=np.uint8, copy=True)))
    saved = state.get("cuda") or []
    if not isinstance(saved, (list, tuple)):
        return [*warnings, "torch CUDA RNG not restored: malformed entry"]
    if not saved:
        return warnings
    n_here = 0
    if _cuda_ready():
        try:
            n_here = torch.cuda.device_count()
        except Exception:
            n_here = 0
    if n_here == 0:
        warnings.append(f"torch CUDA RNG of {len(saved)} device(s) not restored: CUDA is not "
                        "available in this process (CUDA random streams will differ from the "
                        "saved run)")
        return warnings
    for i, s in enumerate(saved[:n_here]):
        try:
            torch.cuda.set_rng_state(torch.from_numpy(np.array(s, dtype=np.uint8, copy=True)),
                                     device=i)
        except Exception as e:  # wrong size/format: keep going, report it
            warnings.append(f"torch CUDA RNG of device {i} not restored: {e}")
    if len(saved) > n_here:
        rest = ", ".join(str(i) for i in range(n_here, len(saved)))
        warnings.append(f"torch CUDA RNG saved for {len(saved)} devices, this process has "
                        f"{n_here}; devices {rest} not restored")
    elif len(saved) < n_here:
        rest = ", ".join(str(i) for i in range(len(saved), n_here))
        warnings.append(f"torch CUDA RNG saved for {len(saved)} devices, this process has "
                        f"{n_here}; devices {rest} keep their current state")
    return warnings

