"""Pausing the cyclic garbage collector around bulk (de)serialization (internal module)."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while decoding many small objects.

    Decoding a manifest with 10,000 entries creates tens of thousands of containers, each of
    which can trigger a collection that walks every live object: ~30% of a small-array save or
    load.  The objects made here hold no cycles, so nothing is lost by collecting later.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
