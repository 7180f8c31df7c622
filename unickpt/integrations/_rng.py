"""The process-global RNG states (python, numpy, torch CPU and CUDA) as plain data.

Integrations decide *when* a state is captured and applied (a trainer's hooks), so they
need the capture and the restore as two separate calls on plain data that fits a state
tree: uint32/uint8 arrays and scalars, no pickle.

>>> import random, numpy as np, torch
>>> s = capture()
>>> a = (random.random(), np.random.rand(), torch.rand(1).item())
>>> restore(s)
[]
>>> (random.random(), np.random.rand(), torch.rand(1).item()) == a
True
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

__all__ = ["capture", "restore"]


def _cuda_ready(torch: Any) -> bool:
    # Never initialise CUDA just to read its RNG: only when this process already uses it.
    return bool(torch.cuda.is_available() and torch.cuda.is_initialized())


def capture() -> dict[str, Any]:
    """The global RNG states of this process as plain arrays and scalars."""
    import torch

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out: dict[str, Any] = {
        "python": {"version": int(version), "mt": np.array(internal[:-1], dtype=np.uint32),
                   "pos": int(internal[-1]), "gauss_next": gauss},
        "numpy": {"algorithm": str(name), "keys": np.array(keys, dtype=np.uint32),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state().numpy().copy(),
        "cuda": [],
    }
    if _cuda_ready(torch):
        out["cuda"] = [s.numpy().copy() for s in torch.cuda.get_rng_state_all()]
    return out


def restore(state: Any) -> list[str]:
    """Apply :func:`capture`'s output; returns what could not be restored (never raises).

    A checkpoint written on a machine with GPUs resumes on one without (and the reverse):
    the CUDA states that do not fit are reported, the others applied.
    """
    import torch

    notes: list[str] = []
    if not isinstance(state, dict):
        return [f"RNG state is a {type(state).__name__}, expected a dict"]
    py = state.get("python")
    if isinstance(py, dict):
        mt = np.asarray(py["mt"], dtype=np.uint32)
        gauss = py["gauss_next"]
        random.setstate((int(py["version"]), (*(int(x) for x in mt), int(py["pos"])),
                         None if gauss is None else float(gauss)))
    else:
        notes.append("python (not in the checkpoint)")
    npy = state.get("numpy")
    if isinstance(npy, dict):
        np.random.set_state((str(npy["algorithm"]), np.asarray(npy["keys"], dtype=np.uint32),
                             int(npy["pos"]), int(npy["has_gauss"]),
                             float(npy["cached_gaussian"])))
    else:
        notes.append("numpy (not in the checkpoint)")
    cpu = state.get("torch")
    if cpu is not None:
        torch.set_rng_state(torch.from_numpy(np.array(cpu, dtype=np.uint8, copy=True)))
    else:
        notes.append("torch (not in the checkpoint)")
    cuda = list(state.get("cuda") or [])
    if cuda:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        for i, s in enumerate(cuda[:n]):
            torch.cuda.set_rng_state(torch.from_numpy(np.array(s, dtype=np.uint8, copy=True)), i)
        if len(cuda) > n:
            notes.append(f"CUDA of {len(cuda) - n} device(s) (this process has {n})")
    return notes
