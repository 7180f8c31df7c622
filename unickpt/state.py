"""Live state <-> neutral state tree, through adapters.

Saving walks the user's state: plain containers are recursed into, neutral leaves are kept,
objects claimed by an adapter are converted by it, objects implementing the unickpt object
protocol (``_unickpt_to_tree_`` / ``_unickpt_prepare_restore_``, e.g. :class:`unickpt.RNG`)
convert themselves, and any other object with ``state_dict()`` / ``load_state_dict()`` (the
Stateful convention) is stored through its state dict, or else with ``get_state()`` /
``set_state()`` (Grain's data iterators) through that state: plain data or arrays, never pickle.

Restoring is two-phase: every part of the target is checked against the checkpoint first and
all problems are collected into one :class:`~unickpt.IncompatibleCheckpointError`; only when
everything fits are the changes applied.  A failed restore therefore never leaves a model
half-loaded.

A Python scalar and a 0-d array of the same kind (bool, integer, floating) restore into each
other, taking the target's form when the value converts exactly (see
:func:`unickpt.tree.convert_scalar`): a ``TrainState.step`` saved as ``int32[]`` after a jitted
update restores into the ``int`` of a fresh ``TrainState.create``.

>>> import numpy as np
>>> tree, kinds = to_tree({"w": np.zeros(2), "epoch": 3})
>>> restore_tree({"w": np.ones(2), "epoch": 0}, tree)["epoch"]
3
"""

from __future__ import annotations

import collections
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from .adapters import adapter_for
from .contract import Selection
from .errors import IncompatibleCheckpointError, UnsupportedLeafError
from .tree import (
    LazyArray,
    Path,
    Piece,
    ShardedArray,
    convert_scalar,
    format_path,
    host_copy,
    is_scalar_leaf,
)

GENERATOR_KIND = "numpy.random.Generator"

# Standard-library mappings are nodes before any adapter is asked (JAX would otherwise claim an
# OrderedDict as a pytree node when it is imported, and only then); other mappings are nodes
# when no adapter claims them (flax's FrozenDict stays the JAX adapter's).
_STDLIB_MAPPINGS = (collections.OrderedDict, collections.defaultdict, types.MappingProxyType,
                    collections.ChainMap, collections.Counter)
_STDLIB_MAPPING_BASES = (collections.OrderedDict, collections.defaultdict, collections.Counter)


def _rebuild(target: Mapping, values: dict) -> Any:
    """The restored values as an OrderedDict for an OrderedDict target, else a dict."""
    if isinstance(target, collections.OrderedDict):
        return collections.OrderedDict(values)
    return values


def _constant(v: Any) -> Callable[[], Any]:
    """A thunk that restores nothing: the target's own value."""
    return lambda: v


def is_stateful(obj: Any) -> bool:
    """Whether ``obj`` follows the Stateful convention (``state_dict`` + ``load_state_dict``)."""
    return callable(getattr(obj, "state_dict", None)) and callable(
        getattr(obj, "load_state_dict", None))


def has_get_state(obj: Any) -> bool:
    """Whether ``obj`` has ``get_state()`` + ``set_state()`` (e.g. a Grain data iterator).

    >>> class It:
    ...     pos = 0
    ...     def get_state(self): return {"pos": self.pos}
    ...     def set_state(self, s): self.pos = s["pos"]
    >>> it = It(); it.pos = 7
    >>> tree, kinds = to_tree({"it": it})
    >>> tree, kinds[("it",)]
    ({'it': {'pos': 7}}, 'get_state:unickpt.state.It')
    >>> restore_tree({"it": It()}, tree)["it"].pos
    7
    """
    return callable(getattr(obj, "get_state", None)) and callable(
        getattr(obj, "set_state", None))


class SaveContext:
    """Passed to adapters while converting a state.

    Attributes:
        root: the whole state being saved (adapters may look across it, e.g. an optimizer
            finding the module that owns its parameters to key its state by name).
        snapshot: True for async saves: every array must be a host copy.
        kinds: tree path -> kind string of each adapter-converted object (stored in the
            manifest so tools and migration know what a subtree was).
    """

    def __init__(self, root: Any, *, snapshot: bool = False, purpose: str = "save"):
        self.root = root
        self.snapshot = snapshot
        self.purpose = purpose  # the verb of error messages: "save", "compare"
        self.kinds: dict[Path, str] = {}

    def to_tree(self, obj: Any, path: Path = ()) -> Any:
        """Convert ``obj`` (found at ``path``) into a neutral tree."""
        t = type(obj)
        if t is dict or (t in _STDLIB_MAPPINGS or isinstance(obj, _STDLIB_MAPPING_BASES)):
            if self.snapshot:
                return {k: self.to_tree(v, (*path, k)) for k, v in obj.items()}
            # A plain ndarray child is kept as it is (what the call below would return),
            # without a call and a path per array: states hold thousands of them.
            return {k: v if type(v) is np.ndarray else self.to_tree(v, (*path, k))
                    for k, v in obj.items()}
        if t is list:
            return [self.to_tree(v, (*path, i)) for i, v in enumerate(obj)]
        if t is tuple:
            return tuple(self.to_tree(v, (*path, i)) for i, v in enumerate(obj))
        if is_scalar_leaf(obj):
            return obj
        if isinstance(obj, np.ndarray):
            return obj.copy() if self.snapshot else obj
        if isinstance(obj, np.generic):
            return obj
        if isinstance(obj, LazyArray):
            return obj.materialize(path) if self.snapshot else obj
        if isinstance(obj, ShardedArray):
            if not self.snapshot:
                return obj
            # An async save writes later: each piece is copied now (a user may edit the
            # arrays the pieces view as soon as save() returns).
            return ShardedArray(obj.shape, obj.dtype,
                                [Piece(p.index, host_copy(p.data)) for p in obj.pieces])
        if isinstance(obj, np.random.Generator):
            # A user-owned generator: its bit generator's state dict is plain data.
            self.kinds[path] = GENERATOR_KIND
            return self.to_tree(obj.bit_generator.state, path)
        # Looked up on the type: objects with a catch-all __getattr__ (nnx.Rngs) would
        # otherwise hand back something callable for any name.
        hook = getattr(type(obj), "_unickpt_to_tree_", None)
        if hook is not None and not isinstance(obj, type):
            hook = obj._unickpt_to_tree_
            self.kinds[path] = getattr(obj, "_unickpt_kind_", type(obj).__qualname__)
            return hook(self, path)
        found = adapter_for(obj)
        if found is not None:
            adapter, kind = found
            self.kinds[path] = f"{adapter.name}:{kind}"
            return adapter.to_tree(obj, self, path)
        if isinstance(obj, Mapping):  # any other mapping (not claimed by an adapter) is a node
            return {k: self.to_tree(v, (*path, k)) for k, v in obj.items()}
        if is_stateful(obj):
            self.kinds[path] = f"stateful:{type(obj).__module__}.{type(obj).__qualname__}"
            return self.to_tree(obj.state_dict(), path)
        if has_get_state(obj):
            self.kinds[path] = f"get_state:{type(obj).__module__}.{type(obj).__qualname__}"
            return self.to_tree(obj.get_state(), path)
        raise UnsupportedLeafError(
            f"cannot {self.purpose} {format_path(path)}: {t.__module__}.{t.__qualname__} is not a "
            "state-tree leaf, no adapter claims it and it has no state_dict()/"
            "load_state_dict() nor get_state()/set_state(); convert it, or install/register an adapter for its framework")


class RestoreContext:
    """Collects problems while planning a restore, and lets adapters recurse.

    Attributes:
        strict: missing/unexpected entries are errors (shape/dtype mismatches always are).
        select: if given, only paths under these prefixes are restored.
        checkpoint: the checkpoint's path, for messages.
        root: the whole restore target (set by the first :meth:`plan` call), so adapters can
            look across it as they do on save (e.g. to name optimizer parameters).
    """

    def __init__(self, *, strict: bool = True, select: Iterable[Path] | None = None,
                 checkpoint: object = None, kinds: dict[Path, str] | None = None):
        self.strict = strict
        self.select = None if select is None else [tuple(p) for p in select]
        self.checkpoint = checkpoint
        self.kinds = kinds or {}
        self.root: Any = None
        self.missing_paths: list[str] = []
        self.unexpected_paths: list[str] = []
        self.mismatched: list[tuple[str, str]] = []
        self.warnings: list[str] = []

    # -- problem reporting (adapters call these)
    def missing(self, path: Path) -> None:
        if self.strict:
            self.missing_paths.append(format_path(path))

    def unexpected(self, path: Path) -> None:
        if self.strict:
            self.unexpected_paths.append(format_path(path))

    def mismatch(self, path: Path, why: str) -> None:
        self.mismatched.append((format_path(path), why))

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    @property
    def ok(self) -> bool:
        return not (self.missing_paths or self.unexpected_paths or self.mismatched)

    def selected(self, path: Path) -> Selection:
        """"all", "some" (an ancestor of a selected path) or "none"."""
        if self.select is None:
            return "all"
        for s in self.select:
            if path[:len(s)] == s:
                return "all"
        if any(s[:len(path)] == path for s in self.select):
            return "some"
        return "none"

    # -- planning
    def plan(self, target: Any, tree: Any, path: Path = ()) -> Callable[[], Any]:
        """Check ``tree`` against ``target``; return a thunk producing the restored value."""
        if not path and self.root is None:
            self.root = target
        sel = self.selected(path)
        if sel == "none":
            return lambda: target
        t = type(target)
        if t is dict:
            return self._plan_dict(target, tree, path)
        if t in _STDLIB_MAPPINGS or isinstance(target, _STDLIB_MAPPING_BASES):
            inner = self._plan_dict(dict(target), tree, path)
            return lambda: _rebuild(target, inner())
        if t in (list, tuple):
            if not isinstance(tree, (list, tuple)) or hasattr(tree, "_fields"):
                self.mismatch(path, f"target is a {t.__name__}, checkpoint has "
                                    f"{_describe(tree)}")
                return lambda: target
            if len(tree) != len(target):
                self.mismatch(path, f"length {len(target)} in target, {len(tree)} in checkpoint")
                return lambda: target
            thunks = [self.plan(v, tree[i], (*path, i)) for i, v in enumerate(target)]
            return lambda: t(f() for f in thunks)
        if isinstance(target, np.random.Generator):
            return self._plan_generator(target, tree, path)
        hook = getattr(type(target), "_unickpt_prepare_restore_", None)
        if hook is not None and not isinstance(target, type):
            hook = target._unickpt_prepare_restore_
            return hook(tree, self, path)
        found = adapter_for(target)
        if found is not None:
            return found[0].prepare_restore(target, tree, self, path)
        if isinstance(target, (np.ndarray, np.generic)):
            return self._plan_array(target, tree, path)
        if is_scalar_leaf(target):
            if is_scalar_leaf(tree):
                return lambda: tree
            ok, value = convert_scalar(tree, target)
            if not ok:
                self.mismatch(path, f"target is a {t.__name__}, checkpoint has "
                                    f"{_describe(tree)}{_scalar_rule(target, tree)}")
                return lambda: target
            return lambda: value
        if is_stateful(target):
            inner = self.plan(target.state_dict(), tree, path)

            def apply_stateful() -> Any:
                target.load_state_dict(inner())
                return target

            return apply_stateful
        if has_get_state(target):
            planned = self.plan(target.get_state(), tree, path)

            def apply_get_state() -> Any:
                target.set_state(planned())
                return target

            return apply_get_state
        self.mismatch(path, f"cannot restore into {t.__module__}.{t.__qualname__}: no adapter "
                            "claims it and it has no load_state_dict() nor set_state()")
        return lambda: target

    def _plan_dict(self, target: dict, tree: Any, path: Path) -> Callable[[], Any]:
        if not isinstance(tree, dict):
            self.mismatch(path, f"target is a dict, checkpoint has {_describe(tree)}")
            return lambda: target
        thunks: dict[Any, Callable[[], Any]] = {}
        for k, v in target.items():
            p = (*path, k)
            if self.selected(p) == "none":
                thunks[k] = _constant(v)
            elif k in tree:
                thunks[k] = self.plan(v, tree[k], p)
            else:
                self.missing(p)
                thunks[k] = _constant(v)
        for k in tree:
            if k not in target and self.selected((*path, k)) != "none":
                self.unexpected((*path, k))
        return lambda: {k: f() for k, f in thunks.items()}

    def _plan_generator(self, target: np.random.Generator, tree: Any,
                        path: Path) -> Callable[[], Any]:
        algo = target.bit_generator.state.get("bit_generator")
        if not isinstance(tree, dict) or tree.get("bit_generator") != algo:
            got = tree.get("bit_generator") if isinstance(tree, dict) else _describe(tree)
            self.mismatch(path, f"target is a numpy Generator({algo}), checkpoint has {got}")
            return lambda: target

        def writable(x: Any) -> Any:  # checkpoint arrays may be read-only memory maps
            if isinstance(x, dict):
                return {k: writable(v) for k, v in x.items()}
            return np.array(x) if isinstance(x, np.ndarray) else x

        def apply() -> Any:
            target.bit_generator.state = writable(tree)
            return target

        return apply

    def _plan_array(self, target: np.ndarray | np.generic, tree: Any,
                    path: Path) -> Callable[[], Any]:
        if isinstance(tree, ShardedArray):
            tree_shape, tree_dtype = tuple(tree.shape), tree.dtype
        elif isinstance(tree, (np.ndarray, np.generic)):
            tree_shape, tree_dtype = tree.shape, tree.dtype
        elif isinstance(tree, (bool, int, float)) and target.shape == ():
            ok, value = convert_scalar(tree, target)
            if not ok:
                self.mismatch(path, f"target {target.dtype}[], checkpoint has {_describe(tree)}"
                                    f"{_scalar_rule(target, tree)}")
                return lambda: target
            return lambda: value
        else:
            self.mismatch(path, f"target is an array, checkpoint has {_describe(tree)}")
            return lambda: target
        if tuple(tree_shape) != tuple(target.shape) or tree_dtype != target.dtype:
            self.mismatch(path, f"target {target.dtype}{list(target.shape)}, checkpoint "
                                f"{tree_dtype}{list(tree_shape)}")
            return lambda: target
        if isinstance(target, np.generic):
            return lambda: np.asarray(tree)[()]
        if isinstance(tree, ShardedArray):
            return tree.assemble
        # Copy: checkpoint arrays may be read-only memory maps of the file.
        return lambda: np.array(tree, copy=True)

    def raise_if_problems(self) -> None:
        if not self.ok:
            raise IncompatibleCheckpointError(
                "checkpoint does not match the restore target",
                missing=self.missing_paths, unexpected=self.unexpected_paths,
                mismatched=self.mismatched, checkpoint=self.checkpoint)


def _scalar_rule(target: Any, tree: Any) -> str:
    """The scalar <-> 0-d array rule, appended to a message when it is what refused."""
    shapes = [getattr(x, "shape", None) for x in (target, tree)]
    if () not in shapes:
        return ""
    return (" (a Python scalar and a 0-d array restore into each other only when both are "
            "bool, both integer or both floating, and the value converts exactly)")


def _describe(x: Any) -> str:
    if isinstance(x, (np.ndarray, ShardedArray)):
        return f"an array {x.dtype}{list(x.shape)}"
    if isinstance(x, np.generic):
        return f"a numpy {x.dtype} scalar"
    if x is None:
        return "None"
    return f"a {type(x).__name__}"


def load_adapters_for(state: Any) -> None:
    """Load the adapter of every framework object in ``state`` now, converting nothing.

    A cold start restores nothing, yet adapters may have to see the live objects before the
    first save: the torch adapter tracks a DataLoader's position from its first ``iter()``
    on, so it must be loaded before the loop starts.  Walks plain containers only; cheap.

    >>> load_adapters_for({"w": np.zeros(2), "epoch": 0})  # nothing to load: no framework
    """
    stack, seen = [state], set()
    while stack:
        x = stack.pop()
        if isinstance(x, (dict, Mapping)):
            if id(x) not in seen:
                seen.add(id(x))
                stack.extend(x.values())
        elif type(x) in (list, tuple):
            if id(x) not in seen:
                seen.add(id(x))
                stack.extend(x)
        elif not is_scalar_leaf(x) and not isinstance(x, (np.ndarray, np.generic)):
            adapter_for(x)


def to_tree(state: Any, *, snapshot: bool = False,
            purpose: str = "save") -> tuple[Any, dict[Path, str]]:
    """Convert a live state into ``(neutral tree, kinds)``.

    ``purpose`` names what the conversion is for in error messages ("cannot compare x: ...").
    Any ``Mapping`` (``OrderedDict``, ``model.state_dict()``, ``MappingProxyType``...) is a
    node, saved as a dict.

    >>> import collections
    >>> to_tree(collections.OrderedDict(b=1, a=2))[0]
    {'b': 1, 'a': 2}
    """
    ctx = SaveContext(state, snapshot=snapshot, purpose=purpose)
    return ctx.to_tree(state, ()), ctx.kinds


def restore_tree(target: Any, tree: Any, *, strict: bool = True,
                 select: Iterable[Path] | None = None, checkpoint: object = None,
                 kinds: dict[Path, str] | None = None,
                 warn: Callable[[str], None] | None = None) -> Any:
    """Restore ``tree`` into ``target``: check everything, then apply.  Returns the new state."""
    ctx = RestoreContext(strict=strict, select=select, checkpoint=checkpoint, kinds=kinds)
    apply = ctx.plan(target, tree, ())
    ctx.raise_if_problems()
    result = apply()
    if warn is not None:
        for w in ctx.warnings:
            warn(w)
    return result
