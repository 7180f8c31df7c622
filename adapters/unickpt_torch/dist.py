"""The torch.distributed coordinator: unickpt's collectives on a dedicated gloo group.

The manager uses it when ``torch.distributed`` is initialized (or ``process_group=`` is
given).  It creates its own CPU (gloo) group over the same ranks, so a CUDA/NCCL training
group is never used by a checkpoint, and a checkpoint collective never interleaves with the
training's collectives.  Messages are msgpack bytes carried in uint8 tensors (never pickle).

Every collective first passes a ``monitored_barrier`` with the collective's timeout: rank 0
learns exactly which ranks did not arrive, and every rank raises
:class:`~unickpt.dist.CoordinationError` naming the phase and the missing ranks.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from unickpt.dist.coordinator import (
    DEFAULT_TIMEOUT,
    CoordinationError,
    failures_as,
    first_line,
    pack,
    unpack,
)

__all__ = ["TorchCoordinator"]

_RANKS = re.compile(r"[Rr]anks?\s+([0-9][0-9,\s]*)")


class TorchCoordinator:
    """unickpt's coordinator over ``process_group`` (default: the world), on its own gloo group.

    Creating it is collective (every rank of the default group must create it, in the same
    order), as ``torch.distributed.new_group`` is.

    Args:
        process_group: the ranks taking part (default: the default group).
        timeout: seconds every collective waits for the other ranks (default 600).
    """

    def __init__(self, process_group: Any = None, *, timeout: float | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("unickpt: torch.distributed is not initialized; call "
                               "torch.distributed.init_process_group first")
        self.timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)
        ranks = None if process_group is None else dist.get_process_group_ranks(process_group)
        self._global_ranks = ranks or list(range(dist.get_world_size()))
        self._group = dist.new_group(ranks=ranks, backend="gloo",
                                     timeout=timedelta(seconds=self.timeout))
        self._rank = dist.get_rank(self._group)
        self._world = dist.get_world_size(self._group)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world

    def __repr__(self) -> str:
        return f"TorchCoordinator(rank={self._rank}, world_size={self._world})"

    # ------------------------------------------------------------------ collectives
    def barrier(self, phase: str, timeout: float | None = None) -> None:
        self._arrive(phase, timeout)

    def broadcast(self, phase: str, value: Any = None, *, root: int = 0,
                  timeout: float | None = None) -> Any:
        raw = pack(value, phase) if self._rank == root else b""
        self._arrive(phase, timeout)
        src = self._global_ranks[root]
        with self._errors(phase):
            n = torch.tensor([len(raw)], dtype=torch.int64)
            dist.broadcast(n, src=src, group=self._group)
            buf = (torch.frombuffer(bytearray(raw), dtype=torch.uint8) if self._rank == root
                   else torch.empty(int(n.item()), dtype=torch.uint8))
            if buf.numel():
                dist.broadcast(buf, src=src, group=self._group)
        return unpack(buf.numpy().tobytes())

    def all_gather(self, phase: str, value: Any, timeout: float | None = None) -> list[Any]:
        raw = pack(value, phase)
        self._arrive(phase, timeout)
        with self._errors(phase):
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self._world)]
            dist.all_gather(sizes, torch.tensor([len(raw)], dtype=torch.int64),
                            group=self._group)
            n = max(int(s.item()) for s in sizes)
            mine = torch.zeros(n, dtype=torch.uint8)
            mine[:len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else 0
            bufs = [torch.empty(n, dtype=torch.uint8) for _ in range(self._world)]
            dist.all_gather(bufs, mine, group=self._group)
        return [unpack(b[:int(s.item())].numpy().tobytes()) for b, s in zip(bufs, sizes)]

    # ------------------------------------------------------------------ waiting
    def _arrive(self, phase: str, timeout: float | None) -> None:
        t = self.timeout if timeout is None else float(timeout)
        try:
            dist.monitored_barrier(group=self._group, timeout=timedelta(seconds=t),
                                   wait_all_ranks=True)
        except RuntimeError as e:
            missing = _missing(str(e), self._rank, self._global_ranks)
            if "successfully reached" in str(e):  # rank 0 saw others missing, we did not
                who = "rank 0 reports that another rank did not arrive (its error names it)"
            else:
                who = (f"rank(s) {', '.join(map(str, missing))} did not arrive"
                       if missing else "a rank did not arrive")
            raise CoordinationError(
                f"unickpt: {phase}: {who} within {t:g}s (this is rank {self._rank} of "
                f"{self._world}); a rank died, hangs, or does not call the same checkpoint "
                "operation (every rank must call save/restore/close). Raise the timeout with "
                "CheckpointManager(..., dist_timeout=SECONDS) if ranks are merely slow. "
                f"[{first_line(e)}]", phase=phase, missing=missing) from e

    def _errors(self, phase: str) -> Any:
        return failures_as(phase, f"a collective failed on rank {self._rank} of "
                                  f"{self._world} (a peer died or left)")


def _missing(msg: str, rank: int, global_ranks: list[int]) -> list[int]:
    """Group ranks named by a monitored_barrier error (rank 0 knows; others wait on rank 0)."""
    found: set[int] = set()
    for m in _RANKS.finditer(msg):
        found.update(int(x) for x in re.findall(r"[0-9]+", m.group(1)))
    to_group = {g: i for i, g in enumerate(global_ranks)}
    if "successfully reached" in msg:  # this rank arrived; rank 0 knows who did not
        return []
    named = sorted(to_group[g] for g in found if g in to_group and to_group[g] != rank)
    if named:
        return named
    return [] if rank == 0 else [0]
