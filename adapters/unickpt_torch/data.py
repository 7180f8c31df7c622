"""PyTorch data loading as state leaves: ``DataLoader`` and the standard samplers.

A loop killed mid-epoch must resume with exactly the remaining batches of that epoch and then
identical later epochs.  What decides the batches of an epoch is the state of the shuffle
generators *when the epoch's iterator was created* (``iter()`` draws the workers' base seed and
the sampler draws its permutation from them) plus, for a ``DistributedSampler``, its epoch.
So unickpt records, for every ``DataLoader`` / sampler iteration:

* the states of its generators just before ``iter()`` (the loader's ``generator`` and the
  sampler's, once each if they are the same object),
* the sampler's ``epoch`` (``DistributedSampler.set_epoch``),
* the number of items yielded so far in this iteration (batches for a loader).

Importing this module wraps ``__init__`` and ``__iter__`` of ``DataLoader``, ``RandomSampler``,
``SequentialSampler``, ``BatchSampler`` and ``DistributedSampler`` (class level, once) to keep
that record; nothing else changes, the iterators returned are torch's own (a sampler's is
wrapped in a counting generator).  Restoring sets the generators back to the epoch-start
states, sets the epoch, and arms a one-shot skip: the next ``iter()`` yields only the remaining
items.  With ``num_workers=0`` the skip advances the index sampler only (no data is loaded);
with workers the skipped batches are loaded and dropped, so every worker's random state
(augmentations) is what it was in the uninterrupted run.

Position can only be tracked for objects created after this module was imported (the torch
adapter imports it the first time a torch object is saved or restored); saving an older,
untracked loader raises :class:`~unickpt.errors.UnsupportedLeafError` saying so.  A loop that
may start fresh imports ``unickpt_torch.data`` before it builds its loaders.

>>> import torch, unickpt.state as st
>>> from torch.utils.data import DataLoader
>>> loader = DataLoader(list(range(8)), batch_size=2, shuffle=True,
...                     generator=torch.Generator().manual_seed(0))
>>> it = iter(loader); first = [next(it).tolist() for _ in range(2)]
>>> tree, _ = st.to_tree({"loader": loader})
>>> rest = [b.tolist() for b in it]
>>> _ = st.restore_tree({"loader": loader}, tree)
>>> [b.tolist() for b in loader] == rest
True
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)
from torch.utils.data.distributed import DistributedSampler

from unickpt.errors import UnsupportedLeafError
from unickpt.tree import Path, format_path

from .rng import capture_generator, prepare_generator_restore

__all__ = ["LOADER", "SAMPLER", "kind_of", "data_to_tree", "prepare_data_restore", "track"]

LOADER = "torch.utils.data.DataLoader"
SAMPLER = "torch.utils.data.Sampler"
SAMPLER_TYPES = (RandomSampler, SequentialSampler, BatchSampler, DistributedSampler)

# Instance attributes (DataLoader.__setattr__ only guards its constructor arguments).
_SEEN = "_unickpt_seen"      # created while tracking was installed
_REC = "_unickpt_record"     # {"generators": [...], "epoch": e, "it": iterator or [count]}
_SKIP = "_unickpt_skip"      # one-shot: items the next iter() drops


def kind_of(obj: Any) -> str | None:
    """LOADER / SAMPLER for the exact standard classes handled here, else None.

    Subclasses with their own ``state_dict`` (torchdata's ``StatefulDataLoader``) go through
    the Stateful path instead.
    """
    if callable(getattr(obj, "state_dict", None)):
        return None
    if isinstance(obj, DataLoader):
        return LOADER
    if isinstance(obj, SAMPLER_TYPES):
        return SAMPLER
    return None


def _generators(obj: Any) -> list[torch.Generator]:
    """Every distinct generator that decides ``obj``'s order, in a fixed order."""
    found: list[torch.Generator] = []
    todo = [obj]
    while todo:
        o = todo.pop(0)
        g = getattr(o, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not f for f in found):
            found.append(g)
        if isinstance(o, DataLoader):
            todo += [o.sampler, o.batch_sampler]
        elif isinstance(o, BatchSampler):
            todo.append(o.sampler)
    return found


def _epoch_owner(obj: Any) -> Any:
    while isinstance(obj, (DataLoader, BatchSampler)):
        obj = (obj.batch_sampler or obj.sampler) if isinstance(obj, DataLoader) else obj.sampler
    return obj if hasattr(obj, "epoch") else None


def _start_record(obj: Any) -> dict:
    owner = _epoch_owner(obj)
    return {"generators": [capture_generator(g) for g in _generators(obj)],
            "epoch": None if owner is None else owner.epoch, "count": [0], "it": None}


def _position(rec: dict) -> int:
    it = rec["it"]
    return int(it._num_yielded) if it is not None else rec["count"][0]


def _wrap_init(cls: type) -> None:
    orig = cls.__init__

    @functools.wraps(orig)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        orig(self, *args, **kwargs)
        self.__dict__[_SEEN] = True

    cls.__init__ = __init__


def _loader_iter(orig: Callable) -> Callable:
    @functools.wraps(orig)
    def __iter__(self: DataLoader) -> Iterator:
        rec = _start_record(self)
        skip = self.__dict__.pop(_SKIP, 0)
        it = orig(self)
        rec["it"] = it
        self.__dict__[_REC] = rec
        self.__dict__[_SEEN] = True
        if skip:
            if self.num_workers == 0:
                # Indices only: the global RNG (which a dataset may use in the main process)
                # is restored separately and must not be consumed again.
                for _ in itertools.islice(it._sampler_iter, skip):
                    pass
                it._num_yielded = skip
            else:
                for _ in itertools.islice(it, skip):
                    pass
        return it

    return __iter__


def _sampler_iter(orig: Callable) -> Callable:
    @functools.wraps(orig)
    def __iter__(self: Any) -> Iterator:
        rec = _start_record(self)
        skip = self.__dict__.pop(_SKIP, 0)
        self.__dict__[_REC] = rec
        self.__dict__[_SEEN] = True
        count = rec["count"]

        def counted() -> Iterator:
            inner = orig(self)
            for _ in itertools.islice(inner, skip):
                count[0] += 1
            for x in inner:
                count[0] += 1
                yield x

        return counted()

    return __iter__


def track() -> None:
    """Install position tracking (idempotent; done when this module is imported)."""
    for cls in (DataLoader, *SAMPLER_TYPES):
        if cls.__dict__.get("_unickpt_tracked"):
            continue
        _wrap_init(cls)
        wrap = _loader_iter if cls is DataLoader else _sampler_iter
        cls.__iter__ = wrap(cls.__dict__["__iter__"])
        cls._unickpt_tracked = True


track()


def data_to_tree(obj: Any, ctx: Any, path: Path) -> dict:
    """``{"generators", "epoch", "position"}`` of the current (or next) iteration."""
    if isinstance(obj, DataLoader) and isinstance(obj.dataset, IterableDataset):
        raise UnsupportedLeafError(
            f"cannot save {format_path(path)}: a DataLoader over an IterableDataset has no "
            "index sampler to fast-forward; use torchdata's StatefulDataLoader (a state leaf)")
    rec = obj.__dict__.get(_REC)
    if rec is None:
        if not obj.__dict__.get(_SEEN):
            raise UnsupportedLeafError(
                f"cannot save {format_path(path)}: this {type(obj).__name__} was created "
                "before unickpt could track its position; `import unickpt_torch.data` before "
                "building data loaders and samplers")
        # Not iterated since it was built or restored: a restored, not yet consumed skip is
        # still its position.
        rec = _start_record(obj)
        rec["count"][0] = obj.__dict__.get(_SKIP, 0)
    if isinstance(obj, RandomSampler) and obj.generator is None or (
            isinstance(obj, DataLoader) and isinstance(obj.sampler, RandomSampler)
            and obj.sampler.generator is None):
        raise UnsupportedLeafError(
            f"cannot save {format_path(path)}: its RandomSampler has no generator, so each "
            "epoch's order comes from the global RNG at iter() time and cannot be replayed; "
            "pass generator=torch.Generator().manual_seed(seed) to the DataLoader/sampler")
    return {"generators": [ctx.to_tree(g, (*path, "generators", i))
                           for i, g in enumerate(rec["generators"])],  # plain captured dicts
            "epoch": rec["epoch"], "position": _position(rec)}


def prepare_data_restore(obj: Any, tree: Any, ctx: Any, path: Path) -> Callable[[], Any]:
    gens = _generators(obj)
    if not isinstance(tree, dict) or set(tree) != {"generators", "epoch", "position"}:
        ctx.mismatch(path, f"target is a {type(obj).__name__}, checkpoint has no data position")
        return lambda: obj
    if len(tree["generators"]) != len(gens):
        ctx.mismatch(path, f"{len(gens)} generator(s) in target, {len(tree['generators'])} "
                           "in checkpoint")
        return lambda: obj
    thunks = [prepare_generator_restore(g, t, ctx, (*path, "generators", i))
              for i, (g, t) in enumerate(zip(gens, tree["generators"], strict=True))]
    owner = _epoch_owner(obj)

    def apply() -> Any:
        for f in thunks:
            f()
        if owner is not None and tree["epoch"] is not None:
            owner.epoch = int(tree["epoch"])  # what DistributedSampler.set_epoch sets
        obj.__dict__[_SKIP] = int(tree["position"])
        obj.__dict__[_SEEN] = True
        obj.__dict__.pop(_REC, None)
        return obj

    return apply
