"""The JAX coordinator: unickpt's collectives on JAX's own coordination service.

``jax.distributed.initialize`` starts a coordination service (hosted by process 0) and
connects every process to it.  The service has a key-value store and barriers with
timeouts; the coordinator uses nothing else (no socket of its own, no device collective, so
a checkpoint never runs a computation on the accelerators).  Messages are msgpack bytes in
the key-value store, never pickle.

Every collective is the same three steps:

1. each process stores its message under ``unickpt/<instance>/<seq>/<process id>``
   (``seq`` counts the collectives of this coordinator, the same on every process);
2. every process waits at the barrier ``unickpt/<instance>/<seq>`` with the timeout;
3. each process reads what it needs (one directory read for a gather, one key for a
   broadcast).

A barrier that times out (a process died, hangs, or called another checkpoint operation)
becomes :class:`~unickpt.dist.CoordinationError` naming the phase and the processes whose
key is absent.  Each process deletes its key of collective ``seq - 1`` once every process
passed the barrier of collective ``seq`` (every process has then finished reading it), even
when that collective then fails (a phase mismatch), so the store holds at most two messages
per process per coordinator however long the run.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

import jax

from unickpt.dist.coordinator import (
    DEFAULT_TIMEOUT,
    CoordinationError,
    failures_as,
    first_line,
    pack,
    unpack,
)

__all__ = ["JaxCoordinator"]

# Coordinators are numbered in creation order, the same on every process (creating one is
# collective, like a CheckpointManager); the number keeps their keys apart.
_INSTANCES = itertools.count()
_INSTANCES_LOCK = threading.Lock()


def _client() -> Any:
    from jax._src import distributed  # the only handle on the service's client

    return distributed.global_state.client


class JaxCoordinator:
    """unickpt's coordinator over the processes of a ``jax.distributed`` job.

    Creating it is collective: every process creates its coordinators in the same order.

    Args:
        timeout: seconds every collective waits for the other processes (default 600).
    """

    def __init__(self, *, timeout: float | None = None):
        client = _client()
        if client is None:
            raise RuntimeError("unickpt: jax.distributed is not initialized; call "
                               "jax.distributed.initialize(...) first")
        self._client = client
        self.timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)
        self._rank = int(jax.process_index())
        self._world = int(jax.process_count())
        with _INSTANCES_LOCK:
            self._base = f"unickpt/{next(_INSTANCES)}"
        self._seq = 0
        self._lock = threading.Lock()  # a background save and the caller never interleave

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world

    def __repr__(self) -> str:
        return f"JaxCoordinator(rank={self._rank}, world_size={self._world})"

    # ------------------------------------------------------------------ collectives
    def barrier(self, phase: str, timeout: float | None = None) -> None:
        self._collective(phase, None, timeout, read=None)

    def broadcast(self, phase: str, value: Any = None, *, root: int = 0,
                  timeout: float | None = None) -> Any:
        if not 0 <= root < self._world:
            raise ValueError(f"{phase}: root {root} is not a process of this job "
                             f"(0..{self._world - 1})")
        out = self._collective(phase, value if self._rank == root else None, timeout,
                               read=root)
        return out[0]

    def all_gather(self, phase: str, value: Any, timeout: float | None = None) -> list[Any]:
        return self._collective(phase, value, timeout, read="all")

    # ------------------------------------------------------------------ the steps
    def _collective(self, phase: str, value: Any, timeout: float | None,
                    read: Any) -> list[Any]:
        raw = pack([phase, value], phase)
        t = self.timeout if timeout is None else float(timeout)
        with self._lock:
            seq = self._seq
            self._seq += 1
            here = f"{self._base}/{seq}"
            with self._errors(phase):
                self._client.key_value_set_bytes(f"{here}/{self._rank}", raw)
            try:
                self._client.wait_at_barrier(here, max(1, int(t * 1000)))
            except Exception as e:  # noqa: BLE001 - the runtime raises JaxRuntimeError
                raise self._timed_out(phase, t, here, e) from e
            with self._errors(phase):
                # Everyone passed this barrier, so everyone finished reading collective
                # seq - 1: its key goes now, before a read below can raise (a phase mismatch
                # used to leave it in the store for good).
                if seq:
                    self._client.key_value_delete(f"{self._base}/{seq - 1}/{self._rank}")
                if read is None:
                    out: list[Any] = []
                elif read == "all":
                    got = dict(self._client.key_value_dir_get_bytes(f"{here}/"))
                    out = [self._message(got.get(f"{here}/{r}"), phase, r)
                           for r in range(self._world)]
                else:
                    out = [self._message(self._client.key_value_try_get_bytes(
                        f"{here}/{read}"), phase, read)]
            return out

    def _message(self, raw: bytes | None, phase: str, rank: int) -> Any:
        if raw is None:
            raise CoordinationError(f"unickpt: {phase}: process {rank} passed the barrier but "
                                    "its message is missing from the coordination service",
                                    phase=phase, missing=[rank])
        their_phase, value = unpack(raw)
        if their_phase != phase:
            raise CoordinationError(
                f"unickpt: {phase}: process {rank} is at {their_phase!r} instead (this is "
                f"process {self._rank} of {self._world}); every process must call the same "
                "checkpoint operations (save/restore/close) in the same order", phase=phase)
        return value

    def _arrived(self, here: str) -> set[int] | None:
        try:
            return {int(k.rsplit("/", 1)[1])
                    for k, _ in self._client.key_value_dir_get_bytes(f"{here}/")}
        except Exception:  # noqa: BLE001 - the service itself is gone: unknown
            return None

    def _timed_out(self, phase: str, t: float, here: str, e: BaseException) -> CoordinationError:
        arrived = self._arrived(here)
        missing = [] if arrived is None else sorted(set(range(self._world)) - arrived)
        if missing:
            who = f"process(es) {', '.join(map(str, missing))} did not arrive"
        elif arrived is None:
            who = "the coordination service (hosted by process 0) cannot be reached"
        else:
            who = "the barrier failed"
        return CoordinationError(
            f"unickpt: {phase}: {who} within {t:g}s (this is process {self._rank} of "
            f"{self._world}); a process died, hangs, or does not call the same checkpoint "
            "operation (every process must call save/restore/close). Raise the timeout with "
            "CheckpointManager(..., dist_timeout=SECONDS) if processes are merely slow. "
            f"[{first_line(e)}]", phase=phase, missing=missing)

    def _errors(self, phase: str) -> Any:
        return failures_as(phase, f"the coordination service failed on process {self._rank} "
                                  f"of {self._world}")
