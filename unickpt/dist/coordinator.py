"""The coordinator protocol: how the processes of one job agree, with a timeout on every wait.

A checkpoint written by many processes needs a handful of collective steps: one decision
broadcast from rank 0, a gather of what each rank wrote, a barrier.  :class:`Coordinator` is
the whole protocol (rank, world size and three collectives on plain msgpack data); the manager
is written once on top of it.  :class:`SingleProcess` is the one-process implementation; the
torch adapter ships one over a dedicated gloo group (``unickpt_torch.dist``).

Every collective takes a *phase* name and a timeout in seconds; a wait that runs out raises
:class:`CoordinationError` naming the phase and the ranks that did not arrive.

>>> c = SingleProcess()
>>> c.rank, c.world_size, c.all_gather("plan", {"bytes": 3}), c.broadcast("start", [1, "a"])
(0, 1, [{'bytes': 3}], [1, 'a'])
>>> c.barrier("commit")
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

import msgpack

from ..errors import UnickptError

__all__ = ["Coordinator", "SingleProcess", "CoordinationError", "DEFAULT_TIMEOUT", "pack",
           "unpack", "failures_as", "first_line"]

#: Seconds a collective waits for the other ranks by default (a save of a large state by a
#: slow rank must fit in it: the gather after the writes waits for the slowest writer).
DEFAULT_TIMEOUT = 600.0


class CoordinationError(UnickptError, TimeoutError):
    """A collective step failed: a rank did not arrive in time, died, or reported a failure.

    Attributes:
        phase: the step that failed (e.g. ``"save step_5: gather"``).
        missing: the ranks that did not arrive (empty when not known, or when a rank failed
            and said so).
    """

    def __init__(self, message: str, *, phase: str = "", missing: Iterable[int] = ()):
        super().__init__(message)
        self.phase = phase
        self.missing = sorted(missing)


@runtime_checkable
class Coordinator(Protocol):
    """The processes of one job.  Every rank calls every collective, in the same order.

    Messages are plain msgpack data (None, bool, int, float, str, bytes, lists, str/int-keyed
    maps), never pickled objects.  ``timeout`` is in seconds; None means the coordinator's
    default.
    """

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def barrier(self, phase: str, timeout: float | None = None) -> None:
        """Wait until every rank reached ``phase``."""

    def broadcast(self, phase: str, value: Any = None, *, root: int = 0,
                  timeout: float | None = None) -> Any:
        """``value`` of rank ``root``, on every rank."""

    def all_gather(self, phase: str, value: Any, timeout: float | None = None) -> list[Any]:
        """Every rank's ``value``, indexed by rank, on every rank."""


class SingleProcess:
    """The coordinator of a job with one process: every collective returns at once."""

    rank = 0
    world_size = 1

    def barrier(self, phase: str, timeout: float | None = None) -> None:
        return None

    def broadcast(self, phase: str, value: Any = None, *, root: int = 0,
                  timeout: float | None = None) -> Any:
        return unpack(pack(value, phase))  # the same round trip as a real job: plain data only

    def all_gather(self, phase: str, value: Any, timeout: float | None = None) -> list[Any]:
        return [unpack(pack(value, phase))]

    def __repr__(self) -> str:
        return "SingleProcess()"


def pack(value: Any, phase: str = "") -> bytes:
    """msgpack bytes of plain data; anything else is a ``TypeError`` naming the phase."""
    try:
        return msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise TypeError(f"{phase}: a coordinator message must be plain msgpack data "
                        f"({e})") from None


def unpack(raw: bytes) -> Any:
    return msgpack.unpackb(raw, raw=False, strict_map_key=False)


@contextmanager
def failures_as(phase: str, where: str) -> Iterator[None]:
    """Turn a ``RuntimeError`` raised inside a collective into a :class:`CoordinationError`.

    A peer that vanishes mid-transfer, or a coordination service that goes away, surfaces as
    a runtime error from deep inside the framework; a coordinator wraps its transport calls
    in this so callers see one typed error naming the phase and ``where`` it failed.

    >>> try:
    ...     with failures_as("save step_3: gather", "rank 1 of 2"):
    ...         raise RuntimeError("Connection closed by peer\\n(details)")
    ... except CoordinationError as e:
    ...     print(e, "|", e.phase)
    unickpt: save step_3: gather: rank 1 of 2: Connection closed by peer | save step_3: gather
    """
    try:
        yield
    except CoordinationError:
        raise
    except RuntimeError as e:
        raise CoordinationError(f"unickpt: {phase}: {where}: {first_line(e)}",
                                phase=phase) from e


def first_line(e: BaseException) -> str:
    """The first line of an error's message (at most 300 characters), for a one-line report."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
