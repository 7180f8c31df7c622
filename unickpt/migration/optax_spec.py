"""Read an optax transformation's algorithm and hyperparameters (no optax import needed).

optax builds transformations from closures, so their hyperparameters live in the closures'
cells: ``optax.adamw(lr, b1, b2, eps, weight_decay=wd)`` is
``chain(scale_by_adam(b1, b2, eps, eps_root), add_decayed_weights(wd), scale_by_learning_rate
(lr))``.  :func:`optax_stages` lists the chain's stages with their hyperparameters and
:func:`optax_spec` turns them into an :class:`~unickpt.migration.optim.OptimizerSpec` that can
be compared with a torch optimizer's.  Supported: ``optax.sgd`` (momentum, nesterov),
``optax.adam``, ``optax.adamw`` and hand-built chains of ``add_decayed_weights``,
``scale_by_adam`` / ``trace`` and ``scale`` / ``scale_by_learning_rate`` (constant or
schedule).  The position of each stage in the chain is its key in the saved ``opt_state``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import UnsupportedOptimizerError
from .optim import OptimizerSpec

__all__ = ["Stage", "optax_stages", "optax_spec"]


@dataclass
class Stage:
    """One transformation of an optax chain."""

    kind: str  # scale_by_adam, trace, add_decayed_weights, scale, scale_by_schedule, ...
    params: dict[str, Any] = field(default_factory=dict)


def _cells(f: Any) -> dict[str, Any]:
    code = getattr(f, "__code__", None)
    if code is None:
        return {}
    return {n: c.cell_contents for n, c in zip(code.co_freevars, f.__closure__ or ())}


def _stage(update: Any) -> Stage:
    cells = _cells(update)
    inner = cells.get("tx")
    if inner is not None and hasattr(inner, "update"):  # with_extra_args_support wrapper
        update = inner.update
        cells = _cells(update)
    qual = getattr(update, "__qualname__", type(update).__name__)
    kind = qual.split(".<locals>")[0]
    if kind == "init_empty_state":
        kind = "identity"
    return Stage(kind, cells)


def optax_stages(tx: Any) -> list[Stage]:
    """The stages of ``tx`` (a single transformation is a one-stage chain)."""
    cells = _cells(tx.update)
    if "update_fns" in cells:
        return [_stage(u) for u in cells["update_fns"]]
    return [_stage(tx.update)]


def _lr_at(stage: Stage, count: int) -> float:
    if stage.kind == "scale":
        return -float(stage.params["step_size"])
    fn = stage.params.get("step_size_fn")
    if fn is None:
        raise UnsupportedOptimizerError(f"cannot read the learning rate of optax stage "
                                        f"{stage.kind}")
    return -float(fn(count))


def optax_spec(tx: Any, count: int = 0) -> tuple[OptimizerSpec, list[Stage]]:
    """The spec of ``tx`` with ``lr`` evaluated at schedule position ``count``.

    >>> import optax
    >>> spec, stages = optax_spec(optax.adamw(1e-3, weight_decay=1e-2))
    >>> spec.algorithm, spec.hparams["weight_decay"], [s.kind for s in stages]
    ('adamw', 0.01, ['scale_by_adam', 'add_decayed_weights', 'scale'])
    """
    stages = optax_stages(tx)
    kinds = [s.kind for s in stages]
    core = [i for i, k in enumerate(kinds) if k in ("scale_by_adam", "trace")]
    lr = [i for i, k in enumerate(kinds) if k in ("scale", "scale_by_schedule",
                                                  "scale_by_learning_rate")]
    wd = [i for i, k in enumerate(kinds) if k == "add_decayed_weights"]
    known = set(core) | set(lr) | set(wd) | {i for i, k in enumerate(kinds) if k == "identity"}
    unknown = [kinds[i] for i in range(len(kinds)) if i not in known]
    if unknown or len(core) > 1 or len(lr) != 1 or len(wd) > 1:
        raise UnsupportedOptimizerError(
            f"optax chain {kinds} is not supported for migration; supported are optax.sgd "
            "(momentum, nesterov), optax.adam, optax.adamw, or chain([add_decayed_weights,] "
            "scale_by_adam|trace, [add_decayed_weights,] scale|scale_by_learning_rate) "
            "(optax.inject_hyperparams and multi_transform are not)")
    h: dict[str, Any] = {"lr": _lr_at(stages[lr[0]], count)}
    decay = float(stages[wd[0]].params["weight_decay"]) if wd else 0.0
    if wd and stages[wd[0]].params.get("mask") is not None:
        raise UnsupportedOptimizerError(
            "add_decayed_weights with a mask has no torch twin in a single param group; "
            "migrate with an unmasked decay")
    if core and kinds[core[0]] == "scale_by_adam":
        p = stages[core[0]].params
        if p.get("nesterov"):
            raise UnsupportedOptimizerError("optax Adam with nesterov=True (NAdam) is not "
                                            "supported for migration")
        h.update(b1=float(p["b1"]), b2=float(p["b2"]), eps=float(p["eps"]),
                 eps_root=float(p["eps_root"]), weight_decay=decay)
        decoupled = bool(wd) and wd[0] > core[0]
        algo = "adamw" if decoupled else "adam"
        if not decoupled and wd and wd[0] > lr[0]:
            raise UnsupportedOptimizerError("add_decayed_weights after the learning-rate scale "
                                            "has no torch twin")
    else:
        momentum = 0.0
        nesterov = False
        if core:
            p = stages[core[0]].params
            momentum, nesterov = float(p["decay"]), bool(p["nesterov"])
        if wd and core and wd[0] > core[0]:
            raise UnsupportedOptimizerError(
                "add_decayed_weights after trace (decoupled SGD weight decay) has no torch "
                "twin; torch SGD adds weight decay to the gradient (before momentum)")
        h.update(momentum=momentum, nesterov=nesterov, weight_decay=decay)
        algo = "sgd"
    return OptimizerSpec(algo, h, "jax"), stages
