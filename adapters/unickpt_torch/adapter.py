"""The torch adapter: dispatches each torch object kind to its converter.

Loaded by the ``torch`` plugin (:mod:`unickpt_torch`) the first time a torch object appears
in a state; users never import it.

>>> import torch, unickpt.state as st
>>> tree, kinds = st.to_tree({"w": torch.arange(3, dtype=torch.int16)})
>>> tree["w"].tolist(), kinds[("w",)]
([0, 1, 2], 'torch:torch.Tensor')
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from unickpt.errors import UnsupportedLeafError
from unickpt.tree import Path, convert_scalar

from . import data as _data
from . import module as _module
from . import optim as _optim
from . import rng as _rng
from . import sched as _sched
from .tensors import check_array, copy_into, host_array, numpy_dtype

__all__ = ["TorchAdapter"]

TENSOR = "torch.Tensor"
MODULE = "torch.nn.Module"
OPTIMIZER = "torch.optim.Optimizer"
SCHEDULER = "torch.optim.lr_scheduler.LRScheduler"
GRAD_SCALER = "torch.amp.GradScaler"
GENERATOR = "torch.Generator"

_SCHEDULER_TYPES: tuple[type, ...] = tuple(
    t for t in (getattr(torch.optim.lr_scheduler, "LRScheduler", None),
                getattr(torch.optim.lr_scheduler, "_LRScheduler", None),
                getattr(torch.optim.lr_scheduler, "ReduceLROnPlateau", None))
    if isinstance(t, type))
_SCALER_TYPES: tuple[type, ...] = tuple(
    t for t in (getattr(getattr(torch, "amp", None), "GradScaler", None),
                getattr(getattr(torch.cuda, "amp", None), "GradScaler", None))
    if isinstance(t, type))


def _scalar_into(target: torch.Tensor, value: bool | int | float) -> Any:
    """A Python scalar as a 0-d array of the target's dtype, when it converts exactly (the
    scalar <-> 0-d array rule of :func:`unickpt.tree.convert_scalar`); else unchanged, so the
    mismatch is reported with both sides."""
    try:
        like = np.zeros((), numpy_dtype(target.dtype))
    except UnsupportedLeafError:
        return value
    ok, converted = convert_scalar(value, like)
    return converted if ok else value


class TorchAdapter:
    """Converts torch objects to neutral state trees and restores them in place.

    >>> import torch, unickpt.state as st
    >>> a = TorchAdapter()
    >>> a.kind_of(torch.nn.Linear(2, 2)), a.kind_of(torch.Generator()), a.kind_of(3)
    ('torch.nn.Module', 'torch.Generator', None)
    >>> src, dst = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    >>> tree, _ = st.to_tree({"m": src})
    >>> sorted(tree["m"])
    ['bias', 'weight']
    >>> st.restore_tree({"m": dst}, tree)["m"] is dst and bool((dst.weight == src.weight).all())
    True
    """

    name = "torch"

    def kind_of(self, obj: Any) -> str | None:
        if isinstance(obj, torch.Tensor):
            return TENSOR
        if isinstance(obj, torch.nn.Module):
            return MODULE
        if isinstance(obj, torch.optim.Optimizer):
            return OPTIMIZER
        if isinstance(obj, _SCHEDULER_TYPES):
            return SCHEDULER
        if isinstance(obj, _SCALER_TYPES):
            return GRAD_SCALER
        if isinstance(obj, torch.Generator):
            return GENERATOR
        return _data.kind_of(obj)  # DataLoader and the standard samplers (data.py)

    def to_tree(self, obj: Any, ctx: Any, path: Path) -> Any:
        kind = self.kind_of(obj)
        if kind == TENSOR:
            return host_array(obj, path, snapshot=ctx.snapshot)
        if kind == MODULE:
            return _module.module_to_tree(obj, ctx, path)
        if kind == OPTIMIZER:
            return _optim.optimizer_to_tree(obj, ctx, path)
        if kind == GENERATOR:
            return _rng.capture_generator(obj)
        if kind in (_data.LOADER, _data.SAMPLER):
            return _data.data_to_tree(obj, ctx, path)
        return _sched.stateful_to_tree(obj, ctx, path)

    def prepare_restore(self, target: Any, tree: Any, ctx: Any,
                        path: Path) -> Callable[[], Any]:
        kind = self.kind_of(target)
        if kind == TENSOR:
            if isinstance(tree, (bool, int, float)) and target.dim() == 0:
                tree = _scalar_into(target, tree)  # a step saved as an int, say
            why = check_array(target, tree)
            if why is not None:
                ctx.mismatch(path, why)
                return lambda: target

            def apply() -> torch.Tensor:
                copy_into(target, tree)
                return target

            return apply
        if kind == MODULE:
            return _module.prepare_module_restore(target, tree, ctx, path)
        if kind == OPTIMIZER:
            return _optim.prepare_optimizer_restore(target, tree, ctx, path)
        if kind == GENERATOR:
            return _rng.prepare_generator_restore(target, tree, ctx, path)
        if kind in (_data.LOADER, _data.SAMPLER):
            return _data.prepare_data_restore(target, tree, ctx, path)
        return _sched.prepare_stateful_restore(target, tree, ctx, path)

    def capture_rng(self) -> dict | None:
        return _rng.capture_global()

    def restore_rng(self, state: dict) -> list[str]:
        return _rng.restore_global(state)

    def seed_rng(self, seed: int) -> None:
        torch.manual_seed(seed)  # seeds the CPU generator and every CUDA device's
