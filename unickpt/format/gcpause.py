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


# A save or load of up to this many array bytes keeps the collector paused from start to end:
# its temporaries (one job, entry and path per array) are all freed before collection resumes,
# so the collection a shorter pause only postpones (5-70 ms with 10,000 leaves) never has
# anything to walk.  Bigger checkpoints spend their time in I/O, which must not run with the
# collector paused (a background save would hold it off for the training loop).
WHOLE_CALL_BYTES = 64 << 20


class GcPause:
    """:func:`gc_paused` that the block can end early (``end()``), once it knows it will be long.

    >>> import gc
    >>> with GcPause() as p:
    ...     paused = not gc.isenabled()
    ...     p.end()
    ...     resumed = gc.isenabled()
    >>> paused, resumed == gc.isenabled()
    (True, True)
    """

    def __enter__(self) -> GcPause:
        self._was = gc.isenabled()
        gc.disable()
        return self

    def end(self) -> None:
        """Re-enable collection now (if it was enabled on entry); idempotent."""
        if self._was:
            self._was = False
            gc.enable()

    def __exit__(self, *exc: object) -> None:
        self.end()
