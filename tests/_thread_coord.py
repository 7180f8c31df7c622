"""An in-process coordinator: N ranks as threads (test helper, no framework needed).

Each collective is a rendezvous on a shared slot table with a timeout; a rank that does not
arrive makes the others raise CoordinationError naming it, as the torch coordinator does.
"""

from __future__ import annotations

import threading
from typing import Any

from unickpt.dist.coordinator import CoordinationError, pack, unpack


class Hub:
    def __init__(self, world: int):
        self.world = world
        self.cond = threading.Condition()
        self.rounds: dict[tuple[int, str], dict[int, bytes]] = {}

    def coordinators(self, timeout: float = 5.0) -> list[ThreadCoordinator]:
        return [ThreadCoordinator(self, r, timeout) for r in range(self.world)]


class ThreadCoordinator:
    def __init__(self, hub: Hub, rank: int, timeout: float):
        self.hub, self._rank, self.timeout = hub, rank, timeout
        self.seq = 0

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self.hub.world

    def _exchange(self, phase: str, raw: bytes, timeout: float | None) -> dict[int, bytes]:
        key = (self.seq, phase)
        self.seq += 1
        t = self.timeout if timeout is None else timeout
        with self.hub.cond:
            slot = self.hub.rounds.setdefault(key, {})
            slot[self._rank] = raw
            self.hub.cond.notify_all()
            done = self.hub.cond.wait_for(lambda: len(slot) == self.hub.world, t)
            if not done:
                missing = sorted(set(range(self.hub.world)) - set(slot))
                raise CoordinationError(f"{phase}: rank(s) {missing} did not arrive within {t}s",
                                        phase=phase, missing=missing)
            return dict(slot)

    def barrier(self, phase: str, timeout: float | None = None) -> None:
        self._exchange(phase, b"", timeout)

    def broadcast(self, phase: str, value: Any = None, *, root: int = 0,
                  timeout: float | None = None) -> Any:
        slot = self._exchange(phase, pack(value, phase) if self._rank == root else b"",
                              timeout)
        return unpack(slot[root])

    def all_gather(self, phase: str, value: Any, timeout: float | None = None) -> list[Any]:
        slot = self._exchange(phase, pack(value, phase), timeout)
        return [unpack(slot[r]) for r in range(self.hub.world)]


def run_ranks(world: int, fn: Any, timeout: float = 5.0) -> list[Any]:
    """Run ``fn(coordinator)`` on ``world`` threads; results (or raised exceptions) by rank."""
    coords = Hub(world).coordinators(timeout)
    out: list[Any] = [None] * world

    def body(r: int) -> None:
        try:
            out[r] = fn(coords[r])
        except BaseException as e:  # returned to the test
            out[r] = e

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout * 6)
        assert not t.is_alive(), "a rank thread hangs"
    return out
