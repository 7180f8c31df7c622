"""The global values of the multi-process JAX test state at a step (numpy only, test helper).

A pure function of the step, so that every process layout can check a restore bitwise.
"""

from __future__ import annotations

import numpy as np

SHAPES = {"w": ((8, 12), np.float32), "v": ((8,), np.int32), "u": ((8, 4), np.uint16),
          "c": ((8,), np.float32)}


def values(step: int) -> dict[str, np.ndarray]:
    """The global value of every array of the state at ``step``."""
    out = {}
    for i, (name, (shape, dt)) in enumerate(sorted(SHAPES.items())):
        n = int(np.prod(shape))
        out[name] = ((np.arange(n) * (i + 3) + step * 7) % 251).astype(dt).reshape(shape)
    out["count"] = np.asarray(step, np.int32)
    return out
