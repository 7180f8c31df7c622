"""Pluggable managers: the protocol a manager class implements, and a factory by dotted path.

Training code written against :class:`ManagerProtocol` works with unickpt's
:class:`~unickpt.CheckpointManager` or a user's own class (one that uploads to an object
store, say), chosen by configuration:

>>> import tempfile, unickpt
>>> m = unickpt.create_manager("unickpt:CheckpointManager", tempfile.mkdtemp(), keep_last=2)
>>> isinstance(m, unickpt.ManagerProtocol)
True
>>> unickpt.create_manager("unickpt:NoSuchManager", "/tmp/x")
Traceback (most recent call last):
...
unickpt.errors.ConfigError: manager class 'unickpt:NoSuchManager': module 'unickpt' has no attribute 'NoSuchManager'; check the spelling (form: 'package.module:ClassName')
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

from ..errors import ConfigError

__all__ = ["ManagerProtocol", "create_manager"]


@runtime_checkable
class ManagerProtocol(Protocol):
    """What a checkpoint manager offers training code (``unickpt.CheckpointManager`` is one).

    A custom class is constructed as ``Class(root, **options)`` and must provide these
    methods with these meanings:

    * ``resolve_start()``: the single startup decision (an object with ``resume``, ``step``,
      ``path``, ``reason``, ``archived_to``); idempotent.
    * ``restore(state, *, strict=True, select=None)``: an object with ``step``, ``state``,
      ``resumed``, ``path``, ``metadata``, ``metrics``; the given state, untouched, with
      ``step == 0`` on a cold start.
    * ``save(step, state, *, metrics=None, metadata=None, force=False) -> bool``.
    * ``checkpoints()`` / ``latest()``: side-effect-free lookups.
    * ``wait()`` / ``close()``: flush pending work, re-raising background errors.
    * ``__enter__`` / ``__exit__``: ``close()`` on exit.
    """

    def resolve_start(self) -> Any: ...

    def restore(self, state: Any, *, strict: bool = True,
                select: Iterable[Any] | None = None) -> Any: ...

    def save(self, step: int, state: Any, *, metrics: Mapping[str, Any] | None = None,
             metadata: Mapping[str, Any] | None = None, force: bool = False) -> bool: ...

    def checkpoints(self) -> list[Any]: ...

    def latest(self) -> Any: ...

    def wait(self) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: Any) -> Any: ...


_METHODS = ("resolve_start", "restore", "save", "checkpoints", "latest", "wait", "close",
            "__enter__", "__exit__")


def _load_class(spec: str) -> Any:
    where = f"manager class {spec!r}"
    module_name, sep, attr = spec.partition(":")
    if not sep:  # also accept "package.module.ClassName"
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"{where}: expected 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and not (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ConfigError(f"{where}: importing {module_name!r} failed: it needs "
                              f"{e.name!r}, which is not installed") from e
        raise ConfigError(f"{where}: module {module_name!r} not found ({e.msg}); is the package "
                          "installed and on sys.path?") from e
    except Exception as e:  # the module exists but importing it failed: show why
        raise ConfigError(f"{where}: importing {module_name!r} failed: {e!r}") from e
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise ConfigError(f"{where}: module {module_name!r} has no attribute {attr!r}; "
                              "check the spelling (form: 'package.module:ClassName')") from e
    return obj


def create_manager(manager: str | type, root: str | os.PathLike, **options: Any) -> Any:
    """Construct ``manager`` (a class, or ``"package.module:ClassName"``) as
    ``manager(root, **options)`` after checking it implements :class:`ManagerProtocol`.

    Each way the spec can be wrong raises its own :class:`~unickpt.ConfigError`, chained to
    the underlying exception: module not found, attribute missing, not a class, or a class
    lacking protocol methods (named).
    """
    cls = _load_class(manager) if isinstance(manager, str) else manager
    if not isinstance(cls, type):
        raise ConfigError(f"manager {manager!r} is a {type(cls).__name__}, not a class; point "
                          "at the class itself (for example 'unickpt:CheckpointManager')") \
            from TypeError(f"{cls!r} is not a class")
    missing = [m for m in _METHODS if not callable(getattr(cls, m, None))]
    if missing:
        raise ConfigError(f"manager class {cls.__module__}.{cls.__qualname__} does not implement "
                          f"unickpt.ManagerProtocol: missing {', '.join(missing)}") \
            from TypeError(f"{cls.__qualname__} lacks {missing}")
    return cls(root, **options)
