"""Registered pytree nodes (dataclasses, NamedTuples, flax.struct, optax states).

A node that is not a plain dict/list/tuple is stored as its direct children, one level at a
time, using the keys ``jax.tree_util`` gives them:

* named children (``GetAttrKey`` of dataclasses, NamedTuples, ``flax.struct`` dataclasses;
  ``DictKey`` of dict-like nodes) -> a dict ``{name: child}`` in flattening order;
* positional children (``SequenceKey``/``FlattenedIndexKey``) -> a list ``[child, ...]``.

The node's type is recorded in the manifest's kinds as ``jax:pytree:<module>.<qualname>``.
Static (metadata) fields such as a TrainState's ``apply_fn`` and ``tx`` are not saved: a
restore rebuilds the *target's* node type with the target's static fields and the
checkpoint's children, returning a new value.

>>> import jax.numpy as jnp, optax
>>> from unickpt.state import to_tree, restore_tree
>>> s = optax.sgd(0.1, momentum=0.9).init({"w": jnp.zeros(2)})
>>> tree, kinds = to_tree(s)
>>> list(tree[0]), kinds[(0,)]
(['trace'], 'jax:pytree:optax.transforms._accumulation.TraceState')
>>> type(restore_tree(s, tree)[0]).__name__
'TraceState'
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

from unickpt.tree import Path


def children(obj: Any) -> tuple[list[tuple[Any, Any]], Any] | None:
    """``([(key, child), ...], treedef)`` one level down, or None if ``obj`` is a pytree leaf."""
    kids, treedef = jax.tree_util.tree_flatten_with_path(obj, is_leaf=lambda x: x is not obj)
    if len(kids) == 1 and kids[0][1] is obj and not kids[0][0]:
        return None  # a leaf flattens to itself with an empty key path
    out = []
    for kp, child in kids:
        out.append((kp[0], child))
    return out, treedef


def is_node(obj: Any) -> bool:
    """Whether ``obj`` is a registered pytree node (other than the plain containers)."""
    if type(obj) in (dict, list, tuple) or obj is None:
        return False
    try:
        return children(obj) is not None
    except Exception:  # a broken flatten rule: not ours to claim
        return False


def key_name(k: Any) -> str | int:
    """The tree key of one ``jax.tree_util`` path entry."""
    if isinstance(k, GetAttrKey):
        return k.name
    if isinstance(k, DictKey):
        return k.key if isinstance(k.key, (str, int)) and not isinstance(k.key, bool) \
            else str(k.key)
    if isinstance(k, SequenceKey):
        return k.idx
    if isinstance(k, FlattenedIndexKey):
        return k.key
    return str(k)  # pragma: no cover - custom key types


def _named(keys: list[Any]) -> bool:
    return not all(isinstance(k, (SequenceKey, FlattenedIndexKey)) for k in keys)


def node_to_tree(obj: Any, ctx: Any, path: Path,
                 child_to_tree: Callable[[Any, Path], Any]) -> Any:
    """``obj``'s direct children as a dict (named) or list (positional), each converted."""
    kids, _ = children(obj)
    keys = [k for k, _ in kids]
    if _named(keys):
        return {key_name(k): child_to_tree(c, (*path, key_name(k))) for k, c in kids}
    return [child_to_tree(c, (*path, i)) for i, (_, c) in enumerate(kids)]


def plan_node(target: Any, tree: Any, ctx: Any, path: Path) -> Callable[[], Any]:
    """Check the children in ``tree`` against ``target``'s; rebuild the target's type."""
    kids, treedef = children(target)
    keys = [k for k, _ in kids]
    tname = type(target).__qualname__
    if _named(keys):
        if not isinstance(tree, dict):
            ctx.mismatch(path, f"target is a {tname} (named fields), checkpoint has "
                               f"{_kind(tree)}")
            return lambda: target
        thunks = []
        names = [key_name(k) for k in keys]
        for name, (_, child) in zip(names, kids):
            p = (*path, name)
            if name in tree:
                thunks.append(ctx.plan(child, tree[name], p))
            else:
                ctx.missing(p)
                thunks.append(lambda c=child: c)
        for name in tree:
            if name not in names:
                ctx.unexpected((*path, name))
    else:
        if not isinstance(tree, (list, tuple)):
            ctx.mismatch(path, f"target is a {tname} ({len(kids)} children), checkpoint has "
                               f"{_kind(tree)}")
            return lambda: target
        if len(tree) != len(kids):
            ctx.mismatch(path, f"{tname}: {len(kids)} children in target, {len(tree)} in "
                               "checkpoint")
            return lambda: target
        thunks = [ctx.plan(c, tree[i], (*path, i)) for i, (_, c) in enumerate(kids)]
    return lambda: jax.tree_util.tree_unflatten(treedef, [f() for f in thunks])


def _kind(x: Any) -> str:
    if isinstance(x, dict):
        return "a dict"
    if isinstance(x, (list, tuple)):
        return f"a sequence of {len(x)}"
    return f"a {type(x).__name__}"
