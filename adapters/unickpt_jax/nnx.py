"""Flax NNX objects: modules, optimizers, Rngs, Variables and State.

An ``nnx.Module`` / ``nnx.Optimizer`` / ``nnx.Rngs`` (any ``nnx.Pytree``) is stored as its
``nnx.state(obj)``: a nested dict following the state's own paths (attribute names, and ints
for list items and optax NamedTuple positions), whose leaves are the variables' values:
arrays as array leaves, typed keys (``RngKey``) as ``{"impl", "key_data"}``.  The variable
type of each leaf (``Param``, ``BatchStat``, ``RngKey``, ``RngCount``, ``OptState``...) is
recorded in the manifest's kinds as ``jax:nnx.<Type>``.

Restoring is in place: the new values are built with each target variable's sharding, then
written with ``nnx.update``; the same object is returned.

>>> from flax import nnx
>>> from unickpt.state import to_tree, restore_tree
>>> m = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
>>> tree, kinds = to_tree({"model": m})
>>> sorted(tree["model"]), kinds[("model", "kernel")]
(['bias', 'kernel'], 'jax:nnx.Param')
>>> m2 = nnx.Linear(2, 3, rngs=nnx.Rngs(1))
>>> restore_tree({"model": m2}, tree)["model"] is m2
True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from unickpt.tree import Path

from . import arrays
from .arrays import KEY_FIELDS


def kind_of(obj: Any) -> str | None:
    """The kind string of an NNX object (module, optimizer, pytree, variable, state)."""
    if isinstance(obj, nnx.Optimizer):
        return f"nnx.Optimizer:{_qual(obj)}"
    if isinstance(obj, nnx.Module):
        return f"nnx.Module:{_qual(obj)}"
    if isinstance(obj, nnx.Pytree):
        return f"nnx.Pytree:{_qual(obj)}"
    if isinstance(obj, nnx.Variable):
        return f"nnx.Variable:{type(obj).__name__}"
    if isinstance(obj, nnx.State):
        return "nnx.State"
    return None


def _qual(obj: Any) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def _flat(state: nnx.State) -> list[tuple[tuple, Any]]:
    return [(tuple(p), v) for p, v in nnx.to_flat_state(state)]


def _value_to_tree(value: Any, ctx: Any, path: Path) -> Any:
    if isinstance(value, jax.Array):
        return arrays.value_to_tree(value, ctx.snapshot, path)
    return ctx.to_tree(value, path)


def _nest(flat: list[tuple[tuple, Any]]) -> dict:
    out: dict = {}
    for p, v in flat:
        d = out
        for k in p[:-1]:
            d = d.setdefault(k, {})
        d[p[-1]] = v
    return out


def to_tree(obj: Any, ctx: Any, path: Path) -> Any:
    """An NNX object's state as nested dicts of values; variable types go to ``ctx.kinds``."""
    if isinstance(obj, nnx.Variable):
        return _value_to_tree(obj.get_value(), ctx, path)
    state = obj if isinstance(obj, nnx.State) else nnx.state(obj)
    flat = []
    for p, var in _flat(state):
        full = (*path, *p)
        if isinstance(var, nnx.Variable):
            ctx.kinds[full] = f"jax:nnx.{type(var).__name__}"
            value = var.get_value()
        else:
            value = var
        flat.append((p, _value_to_tree(value, ctx, full)))
    return _nest(flat)


def _lookup(tree: Any, p: tuple) -> tuple[bool, Any]:
    for k in p:
        if not isinstance(tree, dict) or k not in tree:
            return False, None
        tree = tree[k]
    return True, tree


def _plan_value(value: Any, tree: Any, ctx: Any, path: Path) -> Callable[[], Any]:
    if isinstance(value, jax.Array):
        return arrays.plan_array(value, tree, ctx, path)
    return ctx.plan(value, tree, path)


def _unexpected(tree: Any, targets: set[tuple], prefixes: set[tuple], ctx: Any,
                path: Path, rel: tuple = ()) -> None:
    if rel in targets:
        return
    if isinstance(tree, dict) and rel in prefixes:
        for k, v in tree.items():
            _unexpected(v, targets, prefixes, ctx, path, (*rel, k))
        return
    if ctx.selected((*path, *rel)) != "none":
        ctx.unexpected((*path, *rel))


def prepare_restore(target: Any, tree: Any, ctx: Any, path: Path) -> Callable[[], Any]:
    """Check every variable of ``target`` against ``tree``; the thunk updates it in place."""
    if isinstance(target, nnx.Variable):
        inner = _plan_value(target.get_value(), tree, ctx, path)

        def apply_var() -> Any:
            target.set_value(inner())
            return target

        return apply_var
    state = target if isinstance(target, nnx.State) else nnx.state(target)
    flat = _flat(state)
    if not isinstance(tree, dict):
        ctx.mismatch(path, f"target is {kind_of(target)}, checkpoint has a "
                           f"{type(tree).__name__}")
        return lambda: target
    plans: list[tuple[tuple, Any, Callable[[], Any] | None]] = []
    for p, var in flat:
        full = (*path, *p)
        if ctx.selected(full) == "none":
            plans.append((p, var, None))
            continue
        found, sub = _lookup(tree, p)
        if not found:
            ctx.missing(full)
            plans.append((p, var, None))
            continue
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        plans.append((p, var, _plan_value(value, sub, ctx, full)))
    targets = {p for p, _ in flat}
    prefixes = {p[:i] for p in targets for i in range(len(p))}
    _unexpected(tree, targets, prefixes, ctx, path)

    def apply() -> Any:
        new = []
        for p, var, thunk in plans:
            if thunk is None:
                new.append((p, var))
            elif isinstance(var, nnx.Variable):
                new.append((p, var.replace(thunk())))
            else:
                new.append((p, thunk()))
        new_state = nnx.from_flat_state(new)
        if isinstance(target, nnx.State):
            return new_state
        nnx.update(target, new_state)
        return target

    return apply


__all__ = ["kind_of", "to_tree", "prepare_restore", "KEY_FIELDS"]
