"""Learning-rate schedule position: torch ``last_epoch`` <-> optax ``count``, exactly.

After ``N`` calls of ``scheduler.step()`` torch's ``last_epoch`` is ``N`` and the next update
uses ``lr(N)``; optax's ``ScaleByScheduleState.count`` is ``N`` after ``N`` updates and the
next update uses ``schedule(N)``.  So the position carries over as the same integer (an off by
one shifts every later learning rate).  Going to torch, the target scheduler's learning rates
at that position are produced by replaying its own ``get_lr`` on a detached copy, so they are
the very floats an uninterrupted torch run would have had (chainable schedulers such as
``CosineAnnealingLR`` accumulate rounding step by step; a closed form would differ).

>>> sd = {"last_epoch": 7, "_step_count": 8, "base_lrs": [0.1]}
>>> torch_position(sd)
7
"""

from __future__ import annotations

import copy
import types
from collections.abc import Mapping
from typing import Any

from .errors import UnsupportedOptimizerError

__all__ = ["torch_position", "replay_torch_scheduler", "REPLAYABLE", "cosine_note"]

# Schedulers whose whole state is (last_epoch, group lrs) plus constructor arguments, so a
# replay of get_lr() reproduces them exactly.
REPLAYABLE = ("LambdaLR", "MultiplicativeLR", "StepLR", "MultiStepLR", "ConstantLR", "LinearLR",
              "ExponentialLR", "CosineAnnealingLR", "PolynomialLR", "OneCycleLR", "CyclicLR")


def torch_position(sd: Mapping[str, Any]) -> int:
    """The schedule position (``last_epoch``) recorded in a torch scheduler ``state_dict``."""
    if "last_epoch" not in sd:
        raise UnsupportedOptimizerError(
            f"the scheduler state has no last_epoch (keys {sorted(sd)}); only epoch-indexed "
            "torch schedulers can be migrated")
    return int(sd["last_epoch"])


def cosine_note(sd: Mapping[str, Any], position: int) -> str | None:
    """A warning when a torch cosine schedule is past ``T_max`` (torch cycles, optax clamps)."""
    t_max = sd.get("T_max")
    if t_max is not None and position > int(t_max):
        return (f"the torch CosineAnnealingLR is at step {position}, past T_max={t_max}: torch's "
                "cosine is periodic beyond T_max while optax.cosine_decay_schedule stays at its "
                "final value, so the learning rates diverge from here on")
    return None


def replay_torch_scheduler(sched: Any, position: int) -> tuple[dict, list[float]]:
    """The ``state_dict`` of ``sched`` advanced to ``position`` and its group learning rates.

    ``sched`` (a freshly built target scheduler, at its initial position) is not modified: a
    shallow copy is stepped against copies of its optimizer's param groups.
    """
    import torch  # lazy: the core never imports a framework at module level

    name = type(sched).__name__
    if name not in REPLAYABLE:
        raise UnsupportedOptimizerError(
            f"torch scheduler {name} cannot be positioned by unickpt.migrate (supported: "
            f"{', '.join(REPLAYABLE)}); ReduceLROnPlateau depends on metrics and "
            "Sequential/Chained schedulers on their children: rebuild the schedule as one of "
            "the supported ones or set its state yourself after migrating")
    start = int(sched.last_epoch)
    if position < start:
        raise UnsupportedOptimizerError(
            f"the target scheduler is already at step {start}, past the checkpoint's {position}; "
            "build a fresh scheduler for the target")
    groups = [dict(g, params=[]) for g in sched.optimizer.param_groups]
    s = copy.copy(sched)
    s.optimizer = types.SimpleNamespace(param_groups=groups)
    enable = torch.optim.lr_scheduler._enable_get_lr_call
    for _ in range(position - start):
        with enable(s):
            s.last_epoch += 1
            lrs = s.get_lr()
        for g, lr in zip(groups, lrs):
            g["lr"] = lr
        s._step_count = getattr(s, "_step_count", 0) + 1
    lrs = [g["lr"] for g in groups]
    s._last_lr = list(lrs)
    sd = s.state_dict()
    return sd, lrs
