"""LR schedulers and ``torch.amp.GradScaler``: their ``state_dict`` as a neutral tree.

Both keep all their state in ``state_dict()`` (plain numbers, lists and, for tensor learning
rates, tensors).  unickpt stores exactly that dict (tensors converted to arrays) and restores
it through ``load_state_dict`` after checking every key, list length and tensor shape.

``LambdaLR`` / ``MultiplicativeLR`` cannot store their lambdas: torch saves ``None`` for a
plain function and the ``__dict__`` of a callable object.  unickpt stores the same, so the
restored scheduler keeps the functions it was constructed with: build it with the same
lambdas before restoring.

>>> import torch, unickpt.state as st
>>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
>>> s = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
>>> opt.step(); s.step()
>>> tree, _ = st.to_tree({"s": s})
>>> tree["s"]["last_epoch"]
1
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from unickpt.tree import Path

__all__ = ["stateful_to_tree", "prepare_stateful_restore"]


def stateful_to_tree(obj: Any, ctx: Any, path: Path) -> Any:
    return ctx.to_tree(obj.state_dict(), path)


def prepare_stateful_restore(obj: Any, tree: Any, ctx: Any, path: Path) -> Callable[[], Any]:
    # Plan against the object's current state dict: every key, length and tensor is checked
    # before anything is loaded.
    inner = ctx.plan(obj.state_dict(), tree, path)

    def apply() -> Any:
        obj.load_state_dict(inner())
        return obj

    return apply
