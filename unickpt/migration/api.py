"""``unickpt.migrate``: move a run (weights, optimizer, schedule, counters) between frameworks.

The conversion is driven by the target: the target state is converted to its neutral tree by
its adapter (exactly what a save of it would write), every leaf of that tree is filled from the
source checkpoint through the rules of :mod:`unickpt.migration.rules` and
:mod:`unickpt.migration.optim`, and the result is committed as ``DST/step_<N>`` for the source's
step ``N``, so ``CheckpointManager(DST, resume="auto").restore(target)`` resumes from it.  The
target objects themselves are not modified.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import CheckpointExistsError, ConfigError
from ..format.commit import commit_checkpoint, prepare
from ..format.reader import CheckpointReader
from ..manager.run_root import write_pointer
from ..policy import parse_step
from ..rng import capture_global_rngs, restore_global_rngs, seed_global_rngs
from ..state import to_tree
from ..storage import LocalStorage
from ..tree import Path
from ._convert import Converter, derived_words, framework_of
from .errors import MigrationError
from .optim import torch_spec
from .rules import Rule

__all__ = ["migrate", "MigrationReport", "describe_optimizer"]



@dataclass(frozen=True)
class MigrationReport:
    """What :func:`migrate` wrote and how.

    Attributes:
        path: the committed checkpoint ``DST/step_<N>``.
        step: ``N``.
        source_framework / to: the two frameworks.
        rules_applied: user and built-in layout rules that were used.
        dropped: source leaves intentionally not carried (e.g. ``num_batches_tracked``).
        synthesised: target leaves filled without a source leaf (RNG, counters).
        notes: semantic differences worth knowing about (overridden hyperparameters, ...).
        partial: with ``strict=False``, the leaves left as initialised / ignored.
    """

    path: str
    step: int
    source_framework: str
    to: str
    rules_applied: list[str]
    dropped: list[str]
    synthesised: list[str]
    notes: list[str]
    partial: dict[str, list[str]] = field(default_factory=dict)


def describe_optimizer(optimizer: Any, count: int = 0) -> dict:
    """A neutral description of ``optimizer`` (algorithm + hyperparameters) for metadata.

    optax states do not record hyperparameters; save this under the metadata key
    ``"unickpt.optimizer"`` in a JAX run so that a later migration can compare them
    (otherwise a JAX source's hyperparameters are reported as unverified).  ``count`` is the
    schedule position at which ``lr`` is evaluated.

    >>> import optax
    >>> describe_optimizer(optax.adamw(1e-3, weight_decay=1e-2))["algorithm"]
    'adamw'
    """
    tx = getattr(optimizer, "tx", optimizer)
    if hasattr(tx, "update") and hasattr(tx, "init") and not hasattr(tx, "param_groups"):
        from .optax_spec import optax_spec

        return optax_spec(tx, count)[0].to_neutral()
    if hasattr(optimizer, "param_groups"):
        return torch_spec(optimizer.param_groups, type(optimizer).__name__).to_neutral()
    raise ConfigError(f"cannot describe {type(optimizer).__qualname__}: not an optax "
                      "transformation, nnx.Optimizer or torch optimizer")


def migrate(src: str | os.PathLike, dst: str | os.PathLike, *, to: str, target: Any,
            rules: Iterable[Rule] | None = None, strict: bool = True,
            overrides: Mapping[str, Any] | None = None,
            progress: Callable[[int], None] | None = None) -> MigrationReport:
    """Convert checkpoint ``src`` for framework ``to`` and commit it as ``dst/step_<N>``.

    ``target`` is the destination's state as the resumed run will restore it, e.g.
    ``{"model": nnx_model, "optimizer": nnx_optimizer, "step": 0}`` or
    ``{"model": torch_model, "optimizer": opt, "scheduler": sched, "step": 0}``.  Every leaf
    of it must be accounted for (else :class:`~unickpt.IncompatibleCheckpointError` lists all
    problems); ``strict=False`` allows a partial migration (unmatched target leaves keep their
    initial values, unmatched source leaves are ignored; both are listed in the report).
    ``rules`` are :class:`~unickpt.migration.rules.Rule` objects tried before the built-in ones.
    ``overrides`` accepts hyperparameter differences (``{"weight_decay": "target"}``),
    supplies the RNG seed (``{"seed": 0}``) or the source's optimizer description
    (``{"source_optimizer": describe_optimizer(tx)}``).  ``progress`` is called with the byte
    count of each converted array.  Returns a :class:`MigrationReport`.

    Example (PyTorch run -> Flax NNX)::

        unickpt.migrate("runs/torch/step_500", "runs/flax", to="jax",
                        target={"model": model, "optimizer": optimizer, "step": 0})
        with unickpt.CheckpointManager("runs/flax", resume="auto") as mgr:
            restored = mgr.restore({"model": model, "optimizer": optimizer, "step": 0})
    """
    if to not in ("jax", "torch"):
        raise ConfigError(f"to must be 'jax' or 'torch', got {to!r}")
    if not isinstance(target, Mapping):
        raise ConfigError("target must be a dict of the destination's state, e.g. "
                          "{'model': model, 'optimizer': optimizer}")
    overrides = dict(overrides or {})
    rules = [r for r in (rules or [])]
    with CheckpointReader(src) as reader:
        tree = reader.tree()
        skinds: dict[Path, str] = dict(reader.manifest.kinds)
        metadata = dict(reader.manifest.metadata or {})
        info = dict(reader.manifest.info or {})
        src_path = reader.path
    src_fw = framework_of(skinds) or ("torch" if to == "jax" else "jax")
    if src_fw == to:
        raise ConfigError(f"{src_path} was written by {src_fw}; migrate converts between "
                          "frameworks (to= names the destination framework)")
    step = _source_step(tree, info)
    seed = _seed(overrides, metadata, info, tree)
    ttree, tkinds = _target_tree(target, seed, step)
    conv = Converter(tree, skinds, ttree, tkinds, target, to, rules, strict, overrides,
                      metadata, step, seed, progress)
    out = conv.run()
    root = os.path.abspath(os.fspath(dst))
    final = os.path.join(root, f"step_{step}")
    provenance = {"source": src_path, "source_framework": src_fw, "to": to,
                  "rules_applied": conv.rules_applied, "dropped": conv.dropped,
                  "synthesised": conv.synthesised, "notes": conv.notes, "seed": seed,
                  "rng": "re-derived from seed and step (statistically, not bitwise, "
                         "equivalent)"}
    new_info = dict(info, step=step, migrated_from=provenance)
    prepared = prepare(out, tkinds)  # validates every leaf before the root is touched
    os.makedirs(root, exist_ok=True)
    # Hold the run root's writer lock: a manager running on DST must not interleave with us.
    storage = LocalStorage()
    lock = storage.lock(root)
    lock.acquire()
    try:
        if os.path.lexists(final):
            raise CheckpointExistsError(f"{final} already exists; migrate into a fresh run root "
                                        "or remove that checkpoint first")
        commit_checkpoint(storage, final, prepared, metadata=metadata, info=new_info)
        steps = [parse_step(n) for n in os.listdir(root)]
        if max((s for s in steps if s is not None), default=step) <= step:
            write_pointer(storage, root, f"step_{step}")
    finally:
        lock.release()
    return MigrationReport(final, step, src_fw, to, conv.rules_applied, conv.dropped,
                           conv.synthesised, conv.notes, conv.partial)


def _source_step(tree: Any, info: Mapping[str, Any]) -> int:
    for cand in (info.get("step"), tree.get("step") if isinstance(tree, dict) else None):
        if isinstance(cand, (int, np.integer)) and not isinstance(cand, bool):
            return int(cand)
        if isinstance(cand, np.ndarray) and cand.shape == () and cand.dtype.kind in "iu":
            return int(cand)
    raise MigrationError("the source checkpoint records no step (neither info['step'] nor a "
                         "top-level 'step' entry); save it with a step to migrate it")


def _seed(overrides: Mapping, metadata: Mapping, info: Mapping, tree: Any) -> int:
    for src in (overrides, metadata, info, tree if isinstance(tree, dict) else {}):
        v = src.get("seed")
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            return int(v)
    return 0


def _target_tree(target: Any, seed: int, step: int) -> tuple[Any, dict[Path, str]]:
    """The target's neutral tree, with global RNGs seeded from (seed, step) while captured.

    A target holding ``unickpt.RNG()`` (or a torch generator) thereby records generators
    derived from the recorded seed and the step; the caller's global RNG state is put back.
    """
    words = derived_words(seed, step, 2)
    s64 = int(words[0]) | (int(words[1]) << 32)
    saved = capture_global_rngs()
    try:
        seed_global_rngs(s64)
        return to_tree(target)
    finally:
        restore_global_rngs(saved)

