"""The one way a checkpoint is written and published (internal).

``unickpt.save``, the manager and ``unickpt.migrate`` all end here: stage a fresh location
next to ``final``, write the arrays and the manifest into it (durably), publish it under
``final`` in one atomic step.  A failure before the publish leaves nothing behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from typing import Any

from ..storage import Storage, staged
from ..tree import Path
from .writer import WriteStats, flatten, write_tree

__all__ = ["Prepared", "prepare", "commit_checkpoint"]

# (flattened tree, adapter kinds): the output of :func:`prepare`, every leaf validated.
Prepared = tuple[tuple, dict[Path, str]]


def prepare(neutral: Any, kinds: dict[Path, str] | None = None) -> Prepared:
    """Flatten and validate a neutral tree before anything touches storage."""
    return flatten(neutral), dict(kinds or {})


def commit_checkpoint(storage: Storage, final: str, prepared: Prepared, *,
                      metadata: dict | None = None,
                      info: dict | Callable[[WriteStats], dict] | None = None,
                      replace: bool = False,
                      publish_guard: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
                      incremental: bool = False, previous: str | None = None) -> WriteStats:
    """Write ``prepared`` as the checkpoint ``final`` of ``storage`` and publish it.

    ``info`` may be a callable receiving the :class:`WriteStats` of the array data.  The
    publish runs inside ``publish_guard()`` (the manager passes its mutex).  With ``replace``
    an existing checkpoint is swapped out atomically; otherwise one there raises
    :class:`~unickpt.CheckpointExistsError`.  ``incremental`` splits the arrays into several
    files by a stable grouping, and ``previous`` (a committed checkpoint of the same storage)
    then lets the files that did not change be shared with it instead of written.
    """
    flat, kinds = prepared
    with staged(storage, final) as tmp:
        stats = write_tree(tmp, None, metadata=metadata, info=info, kinds=kinds,
                           prepared=flat, storage=storage, incremental=incremental,
                           previous=previous)
        with publish_guard():
            storage.commit(tmp, final, replace=replace)
    return stats
