"""Accelerate: objects returned by ``accelerator.prepare`` as CheckpointManager targets.

The wrapped model (the module itself, or DDP/FSDP wrappers that the torch adapter unwraps),
the ``AcceleratedOptimizer`` (a ``torch.optim.Optimizer``) and the ``AcceleratedScheduler``
(through its ``state_dict``) work as they are.  The prepared data loader does not carry its
position (``DataLoaderShard.state_dict`` only works with ``use_stateful_dataloader``), so
wrap it in :class:`DataPosition`, which is itself a state target::

    data = DataPosition(train_dl)
    state = {"model": model, "optimizer": opt, "scheduler": sched, "data": data,
             "rng": unickpt.RNG()}
    r = mgr.restore(state)
    while data.epoch < epochs:
        for batch in data:            # one epoch; a resumed epoch continues where it stopped
            ...
            mgr.save(step, state)

>>> import torch, unickpt
>>> dl = torch.utils.data.DataLoader(list(range(6)), batch_size=2, shuffle=True)
>>> data = DataPosition(dl)
>>> first = [b.tolist() for b in data]
>>> data.epoch, data.batch
(1, 0)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import MissingDependencyError
from . import _rng

try:
    import torch
except ImportError as e:  # the optional extra is not installed
    raise MissingDependencyError(
        f"unickpt.integrations.accelerate needs torch: {e}; install it with "
        "`pip install unickpt[accelerate]`") from e

__all__ = ["DataPosition"]

# Where a (prepared) loader keeps the torch generators that decide its order.
_GEN_ATTRS = ("generator", "synchronized_generator", "sampler", "batch_sampler",
              "base_dataloader")


def _generators(obj: Any, depth: int = 0, seen: set | None = None) -> list[torch.Generator]:
    seen = set() if seen is None else seen
    if obj is None or id(obj) in seen or depth > 4:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Generator):
        return [obj]
    out: list[torch.Generator] = []
    for name in _GEN_ATTRS:
        out += _generators(getattr(obj, name, None), depth + 1, seen)
    return out


class DataPosition:
    """A data loader's position (epoch, batch in the epoch), as a state target.

    Iterating it runs one epoch of the wrapped loader and counts the batches handed out.
    It records, at the start of each epoch, every RNG that decides the epoch's order (the
    global ones and the loader's and its sampler's generators).  After ``load_state_dict``
    the next epoch redraws that order and skips the batches already trained (it loads and
    drops them: exact for any sampler), then puts the global RNGs back as the checkpoint
    left them, so the skipped batches leave no trace.

    Attributes:
        epoch: the epoch the next iteration runs.
        batch: batches of ``epoch`` handed out so far.
    """

    def __init__(self, dataloader: Any) -> None:
        self.dataloader = dataloader
        self.epoch = 0
        self.batch = 0
        self._epoch_rng: dict[str, Any] | None = None
        self._pending = False

    def __len__(self) -> int:
        return len(self.dataloader)

    def _capture(self) -> dict[str, Any]:
        return {"global": _rng.capture(),
                "generators": [g.get_state().numpy().copy()
                               for g in _generators(self.dataloader)]}

    def _apply(self, state: dict[str, Any]) -> None:
        _rng.restore(state["global"])
        for g, s in zip(_generators(self.dataloader), state["generators"]):
            g.set_state(torch.from_numpy(np.array(s, dtype=np.uint8, copy=True)))

    def __iter__(self) -> Iterator[Any]:
        dl = self.dataloader
        if hasattr(dl, "set_epoch"):
            dl.set_epoch(self.epoch)
        resume, self._pending = self._pending and self._epoch_rng is not None, False
        if resume:
            keep = _rng.capture()
            self._apply(self._epoch_rng)  # type: ignore[arg-type]
            it = iter(dl)
            for _ in range(self.batch):
                next(it, None)
            _rng.restore(keep)  # the skipped batches must not move the training RNG
        else:
            self._epoch_rng = self._capture()
            self.batch = 0
            it = iter(dl)
        for b in it:
            self.batch += 1
            yield b
        self.epoch += 1
        self.batch = 0

    def state_dict(self) -> dict[str, Any]:
        # Always the same structure (a restore checks it against the checkpoint's): before
        # the first epoch, the RNG states as they are now stand in for the epoch's.
        return {"epoch": self.epoch, "batch": self.batch,
                "epoch_rng": self._epoch_rng if self._epoch_rng is not None else self._capture()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.batch = int(state["batch"])
        self._epoch_rng = state.get("epoch_rng")
        self._pending = self.batch > 0
