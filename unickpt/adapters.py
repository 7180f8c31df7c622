"""The adapter registry: which adapter claims an object, loaded only when needed.

The contract itself (:class:`Adapter`, :class:`Plugin`, the save/restore contexts) lives in
:mod:`unickpt.contract`; this module finds the plugins and loads their adapters.

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
from typing import Any

import numpy as np

from .contract import ENTRY_POINT_GROUP, Adapter, Plugin
from .errors import AdapterError
from .tree import LazyArray, ShardedArray

__all__ = ["Adapter", "Plugin", "adapter_for", "register_adapter", "loaded_adapters",
           "plugins", "ENTRY_POINT_GROUP"]


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
            # importlib.metadata costs ~25 ms to import: only when an adapter is first needed
            from importlib import metadata

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


def plugins() -> list[Plugin]:
    """Every known plugin (entry points plus registered ones); imports no framework."""
    return list(_discover())


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
