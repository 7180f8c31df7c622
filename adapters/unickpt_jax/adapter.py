"""The JAX/Flax adapter: dispatches each claimed object to the module that knows its kind.

Kinds (recorded in the manifest as ``jax:<kind>``):

=====================================  ======================================================
``Array``                              a ``jax.Array`` (see :mod:`unickpt_jax.arrays`)
``PRNGKey``                            a typed key array -> ``{"impl", "key_data"}``
``ProcessPRNGKey``                     a typed key array held by one process of a
                                       multi-process job (fully addressable there): per
                                       process state (docs/distributed.md)
``ShapeDtypeStruct``                   restore target only (shape, dtype, sharding)
``nnx.Module:<type>`` etc.             NNX objects, restored in place (:mod:`unickpt_jax.nnx`)
``pytree:<type>``                      any other registered pytree node (:mod:`.pytrees`)
=====================================  ======================================================

>>> import jax.numpy as jnp
>>> from unickpt.adapters import adapter_for
>>> adapter, kind = adapter_for(jnp.zeros(2))
>>> adapter.name, kind
('jax', 'Array')
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

import jax

from unickpt.errors import UnsupportedLeafError
from unickpt.tree import Path, format_path

from . import arrays, pytrees


class _NoNnx:
    """Stands in for :mod:`unickpt_jax.nnx` while flax.nnx is not imported (no NNX objects
    can exist then, and importing flax costs about a second)."""

    @staticmethod
    def kind_of(obj: Any) -> None:
        return None


def _nnx() -> Any:
    if "flax.nnx" in sys.modules:
        return importlib.import_module(".nnx", __package__)
    return _NoNnx


class JaxAdapter:
    """Adapter for jax arrays, typed PRNG keys, Flax NNX objects and registered pytrees."""

    name = "jax"

    def kind_of(self, obj: Any) -> str | None:
        if isinstance(obj, jax.Array):
            if not arrays.is_key_dtype(obj.dtype):
                return "Array"
            # A key only this process holds (not a global array) is this process's own
            # randomness, like a torch rank's generator: saved per process.
            return ("ProcessPRNGKey" if obj.is_fully_addressable and jax.process_count() > 1
                    else "PRNGKey")
        if isinstance(obj, jax.ShapeDtypeStruct):
            return "ShapeDtypeStruct"
        kind = _nnx().kind_of(obj)
        if kind is not None:
            return kind
        if pytrees.is_node(obj):
            t = type(obj)
            return f"pytree:{t.__module__}.{t.__qualname__}"
        return None

    # ---------------------------------------------------------------- save
    def to_tree(self, obj: Any, ctx: Any, path: Path) -> Any:
        if isinstance(obj, jax.Array):
            return arrays.value_to_tree(obj, ctx.snapshot, path)
        if isinstance(obj, jax.ShapeDtypeStruct):
            raise UnsupportedLeafError(
                f"cannot save {format_path(path)}: a jax.ShapeDtypeStruct has no values (it is "
                "only a restore target); save the concrete array instead")
        nnx_mod = _nnx()
        if nnx_mod.kind_of(obj) is not None:
            return nnx_mod.to_tree(obj, ctx, path)
        return pytrees.node_to_tree(obj, ctx, path, lambda c, p: self._child(c, ctx, p))

    def _child(self, child: Any, ctx: Any, path: Path) -> Any:
        # Arrays inside a node are converted here so that only the node's kind is recorded,
        # not one kind per array leaf.
        if isinstance(child, jax.Array):
            return arrays.value_to_tree(child, ctx.snapshot, path)
        return ctx.to_tree(child, path)

    # ---------------------------------------------------------------- restore
    def prepare_restore(self, target: Any, tree: Any, ctx: Any,
                        path: Path) -> Callable[[], Any]:
        if isinstance(target, (jax.Array, jax.ShapeDtypeStruct)):
            return arrays.plan_array(target, tree, ctx, path)
        nnx_mod = _nnx()
        if nnx_mod.kind_of(target) is not None:
            return nnx_mod.prepare_restore(target, tree, ctx, path)
        return pytrees.plan_node(target, tree, ctx, path)

    # ---------------------------------------------------------------- RNG
    def capture_rng(self) -> dict | None:
        """JAX has no global RNG state: keys are explicit values saved as ordinary leaves."""
        return None

    def restore_rng(self, state: dict) -> list[str]:
        return []

    def seed_rng(self, seed: int) -> None:
        """Nothing to seed: JAX keys are explicit values."""
