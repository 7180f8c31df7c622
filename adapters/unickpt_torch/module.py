"""torch.nn.Module <-> a flat ``name -> array`` tree (the module's state_dict).

Layout (see docs/torch.md, the migration tools rely on it)::

    {"fc1.weight": array, "fc1.bias": array, "bn.running_mean": array, ...,
     "__aliases__": {"head.weight": "embed.weight"}}      # only when tensors are shared

* Keys are exactly the ``state_dict()`` keys (parameters and persistent buffers), in
  ``state_dict()`` order.
* A tensor reachable under several names (tied embedding / output layer) is stored once, under
  its first name in ``state_dict()`` order; every other name is listed in ``"__aliases__"``
  (alias -> stored name).  Restoring copies into the target's existing tensors, so ties in the
  target stay ties; an untied target gets the stored tensor copied into each alias.
* Non-tensor "extra state" (``get_extra_state``) is stored under its ``state_dict`` key as
  a neutral tree and handed back through ``set_extra_state``.
* Wrappers that only add a name prefix (``torch.compile``'s ``_orig_mod.``, DataParallel /
  DistributedDataParallel's ``module.``) are unwrapped, so a checkpoint of a compiled or
  data-parallel model restores into the plain model and the other way round.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from unickpt.tree import Path

from .tensors import check_array, copy_into, host_arrays

__all__ = ["ALIASES", "module_to_tree", "prepare_module_restore", "named_tensors", "unwrap"]

ALIASES = "__aliases__"
_EXTRA = "_extra_state"


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside ``torch.compile`` / DataParallel / DistributedDataParallel wrappers."""
    while True:
        inner = getattr(module, "_orig_mod", None)  # torch.compile's OptimizedModule
        if inner is None and isinstance(module, (torch.nn.DataParallel,
                                                 torch.nn.parallel.DistributedDataParallel)):
            inner = module.module
        if not isinstance(inner, torch.nn.Module):
            return module
        module = inner


def named_tensors(module: torch.nn.Module) -> tuple[dict[str, Any], dict[str, str]]:
    """``(canonical name -> live tensor or extra state, alias -> canonical name)``.

    Uses ``state_dict(keep_vars=True)`` so identity reveals shared tensors and the keys are
    exactly what torch itself would save (persistent buffers only, custom hooks honoured).
    """
    sd = unwrap(module).state_dict(keep_vars=True)
    canonical: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, value in sd.items():
        if isinstance(value, torch.Tensor):
            owner = first.setdefault(id(value), name)
            if owner != name:
                aliases[name] = owner
                continue
        canonical[name] = value
    return canonical, aliases


def module_to_tree(module: torch.nn.Module, ctx: Any, path: Path) -> dict[str, Any]:
    canonical, aliases = named_tensors(module)
    tensors = [((*path, k), v) for k, v in canonical.items() if isinstance(v, torch.Tensor)]
    arrays = iter(host_arrays(tensors, snapshot=ctx.snapshot))
    out: dict[str, Any] = {}
    for k, v in canonical.items():
        out[k] = next(arrays) if isinstance(v, torch.Tensor) else ctx.to_tree(v, (*path, k))
    if aliases:
        out[ALIASES] = dict(aliases)
    return out


def _owner(module: torch.nn.Module, key: str) -> torch.nn.Module:
    prefix = key[: -len(_EXTRA)].rstrip(".")
    return module.get_submodule(prefix) if prefix else module


def prepare_module_restore(module: torch.nn.Module, tree: Any, ctx: Any,
                           path: Path) -> Callable[[], Any]:
    if not isinstance(tree, dict):
        ctx.mismatch(path, f"target is a torch module, checkpoint has a {type(tree).__name__}")
        return lambda: module
    inner = unwrap(module)
    sd = inner.state_dict(keep_vars=True)
    stored = {k: v for k, v in tree.items() if k != ALIASES}
    saved_aliases = tree.get(ALIASES, {})
    if not isinstance(saved_aliases, dict):
        ctx.mismatch((*path, ALIASES), "expected a dict alias -> stored name")
        saved_aliases = {}

    copies: list[tuple[torch.Tensor, Any]] = []
    extras: list[tuple[str, Callable[[], Any]]] = []
    done: set[int] = set()
    for name, target in sd.items():
        src_name = name if name in stored else saved_aliases.get(name)
        p = (*path, name)
        if src_name is None or src_name not in stored:
            if not (isinstance(target, torch.Tensor) and id(target) in done):
                ctx.missing(p)
            continue
        src = stored[src_name]
        if not isinstance(target, torch.Tensor):  # extra state: restored by set_extra_state
            if name.endswith(_EXTRA):
                extras.append((name, ctx.plan(target, src, p)))
            continue
        why = check_array(target, src)
        if why is not None:
            ctx.mismatch(p, why)
            continue
        if id(target) in done:  # a tie in the target: its first name already restores it
            continue
        done.add(id(target))
        copies.append((target, src))

    known = set(sd)
    for name in list(stored) + list(saved_aliases):
        if name not in known:
            ctx.unexpected((*path, name))

    def apply() -> torch.nn.Module:
        for target, src in copies:
            copy_into(target, src)
        for name, thunk in extras:
            _owner(inner, name).set_extra_state(thunk())
        return module

    return apply
