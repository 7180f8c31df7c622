"""Adapter plugins: how framework objects become state trees and back.

An adapter package registers a :class:`Plugin` under the ``unickpt.adapters`` entry-point
group.  The plugin is cheap to import (it must not import its framework); it names the
top-level modules whose objects it may claim, and a ``load`` function that imports the real
adapter.  unickpt loads an adapter only when an object from one of those modules appears in
a state, so ``import unickpt`` never imports torch or jax.

Third-party example (``pyproject.toml`` of a package ``unickpt-mlx``)::

    [project.entry-points."unickpt.adapters"]
    mlx = "unickpt_mlx:plugin"

with ``plugin = unickpt.adapters.Plugin("mlx", ("mlx",), load=lambda: MlxAdapter())``.

>>> from unickpt.adapters import adapter_for
>>> adapter_for({"a": 1}) is None    # plain trees need no adapter
True
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from .errors import AdapterError
from .tree import LazyArray, ShardedArray

if TYPE_CHECKING:  # pragma: no cover
    from .state import RestoreContext, SaveContext

__all__ = ["Adapter", "Plugin", "adapter_for", "register_adapter", "loaded_adapters",
           "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "unickpt.adapters"


@runtime_checkable
class Adapter(Protocol):
    """What an adapter implements.  ``name`` is the framework name recorded in checkpoints."""

    name: str

    def kind_of(self, obj: Any) -> str | None:
        """A kind string (e.g. ``"torch.nn.Module"``) if this adapter handles ``obj``, else None."""

    def to_tree(self, obj: Any, ctx: SaveContext, path: tuple) -> Any:
        """Convert ``obj`` into a neutral state tree.

        With ``ctx.snapshot`` true (async saves), every array in the result must be a host
        copy that later mutation of ``obj`` cannot change.  Otherwise arrays may alias live
        memory or be :class:`~unickpt.tree.LazyArray` (copied to host when written).
        Nested values may be handed back to ``ctx.to_tree(value, (*path, key))``.
        """

    def prepare_restore(self, target: Any, tree: Any, ctx: RestoreContext,
                        path: tuple) -> Callable[[], Any]:
        """Check ``tree`` against ``target`` and return a thunk that applies it.

        Problems are reported through ``ctx.missing/unexpected/mismatch`` (never raised
        directly) so that one error lists every mismatch, and nothing is modified unless the
        whole state fits.  The thunk returns the restored value (``target`` itself when
        restored in place).
        """

    def capture_rng(self) -> dict | None:
        """The framework's global RNG state as a neutral tree (None if it has none)."""

    def restore_rng(self, state: dict) -> list[str]:
        """Restore what :meth:`capture_rng` returned; return warnings for what could not be."""


@dataclass(frozen=True)
class Plugin:
    """The entry-point object of an adapter package.

    Attributes:
        name: framework name, e.g. ``"torch"``.
        modules: top-level module names whose objects the adapter may claim.
        load: imports and returns the adapter (called at most once).
    """

    name: str
    modules: tuple[str, ...]
    load: Callable[[], Adapter]


_lock = threading.RLock()
_plugins: list[Plugin] | None = None
_loaded: dict[str, Adapter] = {}
_type_cache: dict[type, tuple[Adapter, str] | None] = {}
_NEUTRAL = (np.ndarray, np.generic, ShardedArray, LazyArray, bool, int, float, str, bytes,
            type(None))


def _discover() -> list[Plugin]:
    global _plugins
    with _lock:
        if _plugins is None:
            found: list[Plugin] = []
            for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
                try:
                    plugin = ep.load()
                except Exception as e:  # a broken third-party plugin must not break saving
                    import warnings

                    warnings.warn(f"unickpt adapter plugin {ep.name!r} ({ep.value}) failed to "
                                  f"load: {e!r}; objects of its framework cannot be saved",
                                  RuntimeWarning, stacklevel=2)
                    continue
                if not isinstance(plugin, Plugin):
                    raise AdapterError(f"entry point {ep.name!r} ({ep.value}) is not a "
                                       "unickpt.adapters.Plugin")
                found.append(plugin)
            _plugins = found
        return _plugins


def register_adapter(plugin: Plugin) -> None:
    """Register a plugin programmatically (in addition to entry points)."""
    with _lock:
        plugins = _discover()
        plugins[:] = [p for p in plugins if p.name != plugin.name] + [plugin]
        _loaded.pop(plugin.name, None)
        _type_cache.clear()


def _load(plugin: Plugin) -> Adapter:
    with _lock:
        if plugin.name not in _loaded:
            try:
                _loaded[plugin.name] = plugin.load()
            except ImportError as e:
                raise AdapterError(
                    f"the {plugin.name} adapter needs its framework installed: {e}; install "
                    f"it with `pip install unickpt[{plugin.name}]`") from e
        return _loaded[plugin.name]


def loaded_adapters() -> list[Adapter]:
    """Adapters whose framework is already imported in this process (never imports one)."""
    out = []
    for p in _discover():
        if any(m in sys.modules for m in p.modules):
            try:
                out.append(_load(p))
            except AdapterError:
                continue
    return out


def adapter_for(obj: Any) -> tuple[Adapter, str] | None:
    """The adapter claiming ``obj`` and the kind it reports, or None."""
    t = type(obj)
    if t in (dict, list, tuple) or isinstance(obj, _NEUTRAL):
        return None
    with _lock:
        if t in _type_cache:
            return _type_cache[t]
    roots = {c.__module__.split(".")[0] for c in t.__mro__ if c is not object}
    result = None
    plugins = _discover()
    # First the adapters whose modules define one of the object's classes, then any adapter
    # whose framework is loaded (e.g. JAX claims user dataclasses registered as pytree nodes).
    owners = [p for p in plugins if roots & set(p.modules)]
    ordered = owners + [p for p in plugins
                        if p not in owners and any(m in sys.modules for m in p.modules)]
    for p in ordered:
        try:
            adapter = _load(p)
        except AdapterError:
            if p in owners:  # the object is this framework's: its adapter is required
                raise
            continue  # a broken adapter of some other loaded framework must not block this
        kind = adapter.kind_of(obj)
        if kind:
            result = (adapter, kind)
            break
    if result is not None:  # negative answers may change (e.g. a pytree node registered later)
        with _lock:
            _type_cache[t] = result
    return result
