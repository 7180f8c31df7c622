"""The adapter contract: everything a framework adapter implements and may call, in one file.

An *adapter* teaches unickpt one framework (PyTorch, JAX, ...): which objects it claims, how
they become a neutral state tree (nested ``dict``/``list``/``tuple`` of numpy arrays and
Python scalars) and how a checkpoint's tree is put back into live objects.  This module is
the whole contract; it imports nothing but the standard library, so a third party writing an
adapter needs to read only this file (and ``docs/adapters.md`` for a worked example).

The pieces:

* :class:`Adapter`: what the adapter implements (claim, save, plan a restore, global RNG).
* :class:`SaveContext`: what unickpt hands to :meth:`Adapter.to_tree`.
* :class:`RestoreContext`: what unickpt hands to :meth:`Adapter.prepare_restore`; problems are
  *reported* to it, never raised, so that one error lists every mismatch and a failed restore
  modifies nothing.
* :class:`Plugin`: the cheap entry-point object that names the framework's modules and loads
  the adapter only when an object of that framework appears in a state.

Errors an adapter raises itself (while saving) are :class:`unickpt.UnsupportedLeafError` for
values it cannot store, with the tree path (``format_path(path)``) in the message.

Check an adapter against the contract with :mod:`unickpt.testing.conformance`.

>>> from unickpt.contract import Plugin, Adapter
>>> class Toy:
...     name = "toy"
...     def kind_of(self, obj): return None
...     def to_tree(self, obj, ctx, path): return obj
...     def prepare_restore(self, target, tree, ctx, path): return lambda: target
...     def capture_rng(self): return None
...     def restore_rng(self, state): return []
...     def seed_rng(self, seed): pass
>>> isinstance(Toy(), Adapter)
True
>>> Plugin("toy", ("toy",), load=Toy).modules
('toy',)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

__all__ = ["Adapter", "SaveContext", "RestoreContext", "Plugin", "Path", "Selection",
           "ENTRY_POINT_GROUP"]

#: A position in a state tree: the keys (``str``) and indices (``int``) from the root.
Path = tuple[Any, ...]

#: How much of a subtree a restore selects: ``"all"`` of it, ``"some"`` of it (an ancestor of
#: a selected path) or ``"none"``.
Selection = Literal["all", "some", "none"]

#: The entry-point group under which adapter packages register their :class:`Plugin`.
ENTRY_POINT_GROUP = "unickpt.adapters"


@runtime_checkable
class SaveContext(Protocol):
    """Handed to :meth:`Adapter.to_tree` while a state is converted for saving.

    Attributes:
        root: the whole state being saved (adapters may look across it, e.g. an optimizer
            finding the module that owns its parameters to key its state by name).
        snapshot: True for async saves: every array the adapter returns must then be a host
            copy that later mutation of the live object cannot change.
    """

    root: Any
    snapshot: bool

    def to_tree(self, obj: Any, path: Path = ()) -> Any:
        """Convert a nested value found at ``path`` (dispatching to any adapter, recursively)."""
        ...


@runtime_checkable
class RestoreContext(Protocol):
    """Handed to :meth:`Adapter.prepare_restore` while a restore is planned.

    Attributes:
        strict: missing/unexpected entries are errors (shape/dtype mismatches always are).
        checkpoint: the checkpoint's location, for messages (may be None).
        kinds: tree path -> the kind string recorded at save time (``"torch:torch.Tensor"``).
        root: the whole restore target.
    """

    strict: bool
    checkpoint: object
    kinds: dict[Path, str]
    root: Any

    def missing(self, path: Path) -> None:
        """Report that the target has ``path`` but the checkpoint does not."""
        ...

    def unexpected(self, path: Path) -> None:
        """Report that the checkpoint has ``path`` but the target does not."""
        ...

    def mismatch(self, path: Path, why: str) -> None:
        """Report that ``path`` exists in both but cannot be restored (``why`` says how)."""
        ...

    def warn(self, message: str) -> None:
        """Record a warning, emitted only if the whole restore goes ahead."""
        ...

    def selected(self, path: Path) -> Selection:
        """Whether ``path`` is restored: ``"all"``, ``"some"`` (only parts below) or ``"none"``.

        Adapters that walk their own children must skip (leave untouched, report nothing
        for) the children whose selection is ``"none"``.
        """
        ...

    def plan(self, target: Any, tree: Any, path: Path = ()) -> Callable[[], Any]:
        """Plan a nested value's restore (dispatching to any adapter); returns its thunk."""
        ...


@runtime_checkable
class Adapter(Protocol):
    """What an adapter implements.  ``name`` is the framework name recorded in checkpoints.

    Rules every method keeps (checked by :mod:`unickpt.testing.conformance`):

    * ``kind_of`` answers for the framework's own objects only, and never raises.
    * ``to_tree`` returns a neutral tree; with ``ctx.snapshot`` true its arrays are copies.
    * ``prepare_restore`` modifies nothing: it checks, reports through ``ctx`` and returns a
      thunk; unickpt calls the thunks only when the whole state fits.
    * ``capture_rng``/``restore_rng``/``seed_rng`` cover the framework's *global* RNG, if any.
    """

    name: str

    def kind_of(self, obj: Any) -> str | None:
        """A kind string (e.g. ``"torch.nn.Module"``) if this adapter handles ``obj``, else None."""
        ...

    def to_tree(self, obj: Any, ctx: SaveContext, path: Path) -> Any:
        """Convert ``obj`` into a neutral state tree.

        With ``ctx.snapshot`` true (async saves), every array in the result must be a host
        copy that later mutation of ``obj`` cannot change.  Otherwise arrays may alias live
        memory or be :class:`unickpt.LazyArray` (copied to host when written).  Nested values
        may be handed back to ``ctx.to_tree(value, (*path, key))``.
        """
        ...

    def prepare_restore(self, target: Any, tree: Any, ctx: RestoreContext,
                        path: Path) -> Callable[[], Any]:
        """Check ``tree`` against ``target`` and return a thunk that applies it.

        Problems are reported through ``ctx.missing/unexpected/mismatch`` (never raised) so
        that one error lists every mismatch, and nothing is modified unless the whole state
        fits.  The thunk returns the restored value (``target`` itself when restored in place).
        """
        ...

    def capture_rng(self) -> dict | None:
        """The framework's global RNG state as a neutral tree (None if it has none)."""
        ...

    def restore_rng(self, state: dict) -> list[str]:
        """Restore what :meth:`capture_rng` returned; return warnings for what could not be."""
        ...

    def seed_rng(self, seed: int) -> None:
        """Seed the framework's global RNG from ``seed`` (any int in [0, 2**64)); no-op if none.

        Used by :mod:`unickpt.testing` to give each trial run fresh global RNGs and by
        :func:`unickpt.migrate` to derive target generators from a run's seed.
        """
        ...


@dataclass(frozen=True)
class Plugin:
    """The entry-point object of an adapter package (cheap: must not import its framework).

    Attributes:
        name: framework name, e.g. ``"torch"``.
        modules: top-level module names whose objects the adapter may claim.
        load: imports and returns the adapter (called at most once).
    """

    name: str
    modules: tuple[str, ...]
    load: Callable[[], Adapter]

