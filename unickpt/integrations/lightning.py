"""PyTorch Lightning: checkpoints in unickpt's format, and resumes that are bit for bit.

* :class:`UnickptCheckpointIO`, a ``CheckpointIO`` plugin: Lightning's whole checkpoint dict
  (weights, optimizer and scheduler states, loops, callbacks, hyper-parameters) is written
  as one unickpt checkpoint (a directory at the path Lightning chose, e.g. ``last.ckpt/``),
  committed atomically, without pickle, and verified (every checksum) when it is loaded.
* :class:`UnickptResume`, a callback: stores the global RNG states (python, numpy, torch CPU
  and CUDA), which Lightning does not save, and tells :class:`ResumableDataLoader`\\ s how
  many batches of the epoch were trained.
* :class:`ResumableDataLoader`, a ``torch.utils.data.DataLoader`` with Lightning's
  ``state_dict``/``load_state_dict`` loader interface: a run resumed mid-epoch sees the same
  shuffled order and continues after the last trained batch.

With the three, ``trainer.fit(model, ckpt_path="last")`` after a kill ends with weights and
optimizer state bitwise equal to an uninterrupted ``fit`` (see docs/integrations.md for the
conditions).
"""

from __future__ import annotations

import os
import shutil
import uuid
from typing import Any

import unickpt as api  # the public API only

from ..errors import MissingDependencyError
from . import _rng
from ._codec import SCHEMA_KEY, decode, encode

try:
    import pytorch_lightning as pl
    import torch
    from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO
    from pytorch_lightning.callbacks import Callback
except ImportError as e:  # the optional extra is not installed
    raise MissingDependencyError(
        f"unickpt.integrations.lightning needs PyTorch Lightning: {e}; install it with "
        "`pip install unickpt[lightning]`") from e

__all__ = ["UnickptCheckpointIO", "UnickptResume", "ResumableDataLoader"]

_TRASH = ".unickpt-trash."  # hidden: Lightning's "last" lookup and unickpt readers skip it


class UnickptCheckpointIO(CheckpointIO):
    """Save Lightning checkpoints as unickpt checkpoints.

    Args:
        verify: check every array's checksum when loading (default True); a damaged
            checkpoint raises :class:`~unickpt.CorruptCheckpointError` naming the leaf.

    ``Trainer(plugins=[UnickptCheckpointIO()])``; the checkpoint paths Lightning picks
    (``epoch=0-step=10.ckpt``, ``last.ckpt``) become directories.  A value the format cannot
    hold raises :class:`~unickpt.UnsupportedLeafError` naming its key, before anything is
    written.  ``storage_options`` are not supported (as with Lightning's own plugin).
    """

    def __init__(self, *, verify: bool = True) -> None:
        self.verify = verify

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"UnickptCheckpointIO.save_checkpoint(storage_options="
                            f"{storage_options!r}) is not supported; drop storage_options")
        path = os.fspath(path)
        tree, schema = encode(checkpoint, f"the Lightning checkpoint {path}")
        api.save(path, tree, overwrite=True, metadata={
            SCHEMA_KEY: schema, "integration": "lightning",
            "pytorch_lightning": pl.__version__})

    def load_checkpoint(self, path: Any, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        # weights_only is moot: nothing is unpickled, whatever the checkpoint holds.
        path = os.fspath(path)
        tree = api.load(path, verify=self.verify)
        schema = api.inspect(path).metadata.get(SCHEMA_KEY)
        return decode(tree, schema, map_location=map_location)

    def remove_checkpoint(self, path: Any) -> None:
        path = os.path.abspath(os.fspath(path))
        if not os.path.lexists(path):
            return
        # Renamed out of sight first: a crash mid-delete leaves a hidden directory, never a
        # half-deleted ``last.ckpt`` that Lightning would pick up.
        trash = os.path.join(os.path.dirname(path),
                             f"{_TRASH}{os.path.basename(path)}.{uuid.uuid4().hex[:8]}")
        os.rename(path, trash)
        if os.path.isdir(trash):
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.remove(trash)


def _loaders(obj: Any) -> list[ResumableDataLoader]:
    if isinstance(obj, ResumableDataLoader):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [dl for o in obj for dl in _loaders(o)]
    return []


class UnickptResume(Callback):
    """Adds what Lightning does not save for a bitwise resume: the global RNG states.

    The states are captured when a checkpoint is written and applied when it is loaded,
    before the data loaders start their epoch (so a shuffling sampler draws the same order).
    It also tells every :class:`ResumableDataLoader` of the training loop how many batches
    of the current epoch were trained (Lightning fetches one batch ahead, so a loader cannot
    know it by itself).
    """

    def __init__(self) -> None:
        self.restored_notes: list[str] = []

    def state_dict(self) -> dict[str, Any]:
        return {"rng": _rng.capture()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.restored_notes = _rng.restore(state_dict.get("rng"))
        if self.restored_notes:
            import warnings

            warnings.warn("unickpt: RNG state not restored: " + "; ".join(self.restored_notes)
                          + ". Random streams will differ from the original run",
                          UserWarning, stacklevel=2)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        consumed = batch_idx + 1
        if consumed >= trainer.num_training_batches:
            consumed = 0  # a save after this batch is an epoch-end save: start fresh
        for dl in _loaders(trainer.train_dataloader):
            dl._consumed = consumed


class ResumableDataLoader(torch.utils.data.DataLoader):
    """A ``DataLoader`` that resumes mid-epoch at the next untrained batch, same order.

    Same arguments as ``torch.utils.data.DataLoader``.  Its state (stored by Lightning in the
    loop state of the checkpoint) is the RNG state the epoch's shuffle was drawn from (the
    loader's ``generator``, else torch's global RNG) and the number of trained batches.  On
    resume it redraws the same order and fast-forwards past the trained batches by loading
    them (exact for any sampler; costs their loading time), then puts the global RNGs back
    as they were, so the skipped batches leave no trace.  Use it with :class:`UnickptResume`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epoch_rng: Any = None
        self._consumed = 0
        self._pending: dict[str, Any] | None = None

    def _gen_state(self) -> Any:
        g = self.generator
        return (g.get_state() if g is not None else torch.get_rng_state()).numpy().copy()

    def _set_gen_state(self, state: Any) -> None:
        t = torch.from_numpy(state.copy() if hasattr(state, "copy") else state)
        if self.generator is not None:
            self.generator.set_state(t)
        else:
            torch.set_rng_state(t)

    def __iter__(self) -> Any:
        pending, self._pending = self._pending, None
        skip = int(pending.get("consumed", 0)) if pending else 0
        if pending is not None and skip > 0 and pending.get("epoch_rng") is not None:
            keep = _rng.capture()
            self._set_gen_state(pending["epoch_rng"])
            self._epoch_rng = self._gen_state()
            it = super().__iter__()
            for _ in range(skip):
                next(it)
            _rng.restore(keep)  # the skipped batches must not move the training RNG
            self._consumed = skip
            return it
        self._epoch_rng = self._gen_state()
        self._consumed = 0
        return super().__iter__()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_rng": self._epoch_rng, "consumed": int(self._consumed)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)
