"""Optimizer state and hyperparameters: torch.optim <-> optax, on neutral (numpy) trees.

The neutral form of an optimizer's state is :class:`NeutralOptState`: the algorithm with its
hyperparameters (:class:`OptimizerSpec`), one step ``count`` and per-parameter *slots* named as
optax names them (``mu``/``nu`` for Adam's moments, ``trace`` for momentum), each in the
layout of the framework it came from.  Moments are elementwise, so the weight's layout
transform (transpose, conv permutation, ...) is applied to them too.

=====================  =======================  ============================================
torch.optim            optax                    notes
=====================  =======================  ============================================
``exp_avg``            ``ScaleByAdamState.mu``
``exp_avg_sq``         ``ScaleByAdamState.nu``
``step`` (per param)   ``count`` (one int32)    uneven per-parameter steps are refused
``momentum_buffer``    ``TraceState.trace``     SGD ``dampening`` != 0 is refused
AdamW ``weight_decay``  ``add_decayed_weights``  after ``scale_by_adam`` (decoupled)
Adam/SGD weight decay  ``add_decayed_weights``  *before* ``scale_by_adam``/``trace`` (L2)
=====================  =======================  ============================================

>>> import numpy as np
>>> sd = {"state": {0: {"step": np.float32(3), "exp_avg": np.ones(2), "exp_avg_sq": np.ones(2)}},
...       "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01,
...                         "amsgrad": False, "maximize": False, "decoupled_weight_decay": True,
...                         "params": [0]}]}
>>> st = from_torch(sd, ["fc.weight"])
>>> st.spec.algorithm, st.count, sorted(st.slots["fc.weight"])
('adamw', 3, ['mu', 'nu'])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import HyperparameterMismatchError, UnsupportedOptimizerError

__all__ = ["OptimizerSpec", "NeutralOptState", "from_torch", "to_torch_state", "torch_spec",
           "compare_specs", "TORCH_SLOTS", "OPTAX_SLOTS"]

TORCH_SLOTS = {"exp_avg": "mu", "exp_avg_sq": "nu", "momentum_buffer": "trace"}
OPTAX_SLOTS = {v: k for k, v in TORCH_SLOTS.items()}

_AMSGRAD = ("AMSGrad has no faithful optax twin: torch keeps the running max of the raw "
            "second moment (max_exp_avg_sq) and bias-corrects after taking it, optax.amsgrad "
            "maxes a different quantity, so the run would not continue the same way. Finish "
            "the run in its framework, or migrate weights only (strict=False, without the "
            "optimizer) and restart the optimizer")
_DAMPENING = ("SGD dampening != 0 has no optax twin (optax.trace accumulates the raw "
              "gradient); the converted run would take different steps. Use dampening=0, or "
              "migrate weights only and restart the optimizer")
_MAXIMIZE = ("maximize=True has no optax twin (optax minimises; negate the loss instead); "
             "migrate with maximize=False and a negated loss")


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer algorithm and its hyperparameters, comparable across frameworks.

    ``algorithm`` is ``"sgd"``, ``"adam"`` (L2 weight decay, coupled) or ``"adamw"``
    (decoupled weight decay).  ``hparams`` holds ``lr`` (the *current* learning rate, i.e. at
    the schedule's position), ``b1``, ``b2``, ``eps``, ``eps_root``, ``weight_decay``,
    ``momentum``, ``nesterov`` as they apply.
    """

    algorithm: str
    hparams: Mapping[str, Any]
    framework: str = ""

    def to_neutral(self) -> dict:
        """A plain dict for checkpoint metadata."""
        return {"algorithm": self.algorithm, "framework": self.framework,
                "hparams": {k: _plain(v) for k, v in self.hparams.items()}}

    @classmethod
    def from_neutral(cls, d: Mapping) -> OptimizerSpec:
        return cls(str(d["algorithm"]), dict(d["hparams"]), str(d.get("framework", "")))


@dataclass
class NeutralOptState:
    """Optimizer state between frameworks: ``slots[param][slot] -> array`` plus one count."""

    spec: OptimizerSpec | None
    count: int | None  # None for stateless-count algorithms (SGD)
    slots: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def _plain(v: Any) -> Any:
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return v


def torch_spec(groups: Sequence[Mapping[str, Any]], class_name: str | None = None
               ) -> OptimizerSpec:
    """The :class:`OptimizerSpec` of torch ``param_groups``; refuses what optax cannot mirror.

    ``class_name`` (``"Adam"``, ``"AdamW"``, ``"SGD"``) is taken from the groups' keys when
    not given (``decoupled_weight_decay`` tells AdamW from Adam; ``momentum`` marks SGD).
    """
    if not groups:
        raise UnsupportedOptimizerError("the torch optimizer has no param_groups")
    specs = [_torch_group_spec(g, class_name) for g in groups]
    first = specs[0]
    for i, s in enumerate(specs[1:], 1):
        if s != first:
            raise UnsupportedOptimizerError(
                f"param group {i} has hyperparameters {dict(s.hparams)} but group 0 has "
                f"{dict(first.hparams)}; a single optax transformation cannot mirror per-group "
                "hyperparameters (build the optax side with optax.multi_transform and migrate "
                "each group separately)")
    return first


def _torch_group_spec(g: Mapping[str, Any], class_name: str | None) -> OptimizerSpec:
    name = class_name
    if name is None:
        if "betas" in g:
            name = "AdamW" if g.get("decoupled_weight_decay") else "Adam"
        elif "momentum" in g:
            name = "SGD"
        else:
            raise UnsupportedOptimizerError(
                f"cannot tell the torch optimizer from its param_group keys {sorted(g)}; "
                "supported: SGD, Adam, AdamW")
    if g.get("maximize"):
        raise UnsupportedOptimizerError(_MAXIMIZE)
    if name in ("Adam", "AdamW"):
        if g.get("amsgrad"):
            raise UnsupportedOptimizerError(_AMSGRAD)
        b1, b2 = (float(x) for x in g["betas"])
        decoupled = name == "AdamW" or bool(g.get("decoupled_weight_decay"))
        return OptimizerSpec("adamw" if decoupled else "adam", {
            "lr": float(g["lr"]), "b1": b1, "b2": b2, "eps": float(g["eps"]), "eps_root": 0.0,
            "weight_decay": float(g.get("weight_decay", 0.0))}, "torch")
    if name == "SGD":
        if float(g.get("dampening", 0.0)) != 0.0:
            raise UnsupportedOptimizerError(_DAMPENING)
        return OptimizerSpec("sgd", {
            "lr": float(g["lr"]), "momentum": float(g.get("momentum", 0.0)),
            "nesterov": bool(g.get("nesterov", False)),
            "weight_decay": float(g.get("weight_decay", 0.0))}, "torch")
    raise UnsupportedOptimizerError(
        f"torch.optim.{name} is not supported for migration (supported: SGD with momentum/"
        "nesterov, Adam, AdamW); migrate weights only and restart the optimizer")


def _num(x: Any) -> float:
    a = np.asarray(x)
    if a.size != 1:
        raise UnsupportedOptimizerError(f"expected a scalar step, got shape {a.shape}")
    return float(a.reshape(()))


def from_torch(sd: Mapping[str, Any], param_names: Sequence[str], *,
               class_name: str | None = None) -> NeutralOptState:
    """Neutral state from a torch optimizer ``state_dict`` (arrays as numpy).

    Parameters are identified in ``param_groups[*]["params"]`` either by index (native torch:
    ``param_names[i]`` names index ``i``) or by name.  Every parameter must have taken the same
    number of steps: torch keeps a step per parameter, optax one count for all.
    """
    groups = sd.get("param_groups", [])
    spec = torch_spec(groups, class_name)
    state = sd.get("state", {})
    ids = [pid for g in groups for pid in g.get("params", [])]
    names: dict[Any, str] = {}
    for pid in ids:
        if isinstance(pid, str) and not pid.isdigit():
            names[pid] = pid
        else:
            i = int(pid)
            if i >= len(param_names):
                raise UnsupportedOptimizerError(
                    f"optimizer parameter index {i} but the model has {len(param_names)} "
                    "parameters; the optimizer was built over a different parameter list")
            names[pid] = param_names[i]
    out = NeutralOptState(spec, None)
    steps: dict[str, float] = {}
    for pid in ids:
        entry = state.get(pid, state.get(str(pid)) if not isinstance(pid, str) else None)
        if entry is None and isinstance(pid, str) and pid.isdigit():
            entry = state.get(int(pid))
        name = names[pid]
        if not entry:
            if spec.algorithm != "sgd":
                steps[name] = 0.0  # never stepped (lazy state): uneven if others have
            continue
        slots = {}
        for k, v in entry.items():
            if k == "step":
                steps[name] = _num(v)
            elif k in TORCH_SLOTS and v is not None:
                slots[TORCH_SLOTS[k]] = np.asarray(v)
            elif k == "max_exp_avg_sq":
                raise UnsupportedOptimizerError(_AMSGRAD)
        out.slots[name] = slots
    if spec.algorithm in ("adam", "adamw"):
        distinct = sorted(set(steps.values()))
        if len(distinct) > 1:
            by: dict[float, list[str]] = {}
            for n, s in steps.items():
                by.setdefault(s, []).append(n)
            detail = "; ".join(f"step {int(s)}: {', '.join(ns[:4])}{' ...' if len(ns) > 4 else ''}"
                               for s, ns in sorted(by.items()))
            raise UnsupportedOptimizerError(
                "parameters have taken different numbers of optimizer steps (" + detail + "); "
                "torch keeps a step per parameter (a parameter without a gradient does not "
                "advance) but optax keeps one count, so bias correction would change for some "
                "of them. Migrate at a point where every parameter has been updated equally, or "
                "migrate weights only")
        out.count = int(distinct[0]) if distinct else 0
    elif spec.hparams["momentum"] != 0.0:
        has = {n for n, s in out.slots.items() if "trace" in s}
        if has and len(has) != len(ids):
            missing = sorted(set(names.values()) - has)
            raise UnsupportedOptimizerError(
                f"momentum buffers exist for some parameters but not for {missing[:4]}: they "
                "were never updated, which optax.trace cannot express (uneven steps)")
    return out


def to_torch_state(st: NeutralOptState, param_names: Sequence[str], *,
                   step_dtype: Any = np.float32) -> dict[int, dict[str, np.ndarray]]:
    """The ``state`` part of a torch optimizer ``state_dict`` (index-keyed, numpy arrays).

    Adam's per-parameter ``step`` is the shared count (float32 0-d array, as torch keeps it).
    An empty dict is returned for a state that has not stepped yet (torch starts lazily).
    """
    out: dict[int, dict[str, np.ndarray]] = {}
    if st.count == 0 or not st.slots:
        return out
    for i, name in enumerate(param_names):
        slots = st.slots.get(name)
        if slots is None:
            continue
        entry: dict[str, np.ndarray] = {}
        if st.count is not None:
            entry["step"] = np.asarray(st.count, dtype=step_dtype)
        for k, v in slots.items():
            entry[OPTAX_SLOTS[k]] = v
        out[i] = entry
    return out


_WD_HINT = (" Note: torch.optim.AdamW defaults to weight_decay=1e-2, optax.adamw to 1e-4; "
            "pass the value explicitly on both sides.")
_LR_RTOL = 1e-5  # optax evaluates schedules in float32 (x64 off); torch in float64


def compare_specs(source: OptimizerSpec, target: OptimizerSpec,
                  overrides: Mapping[str, Any] | None = None) -> list[str]:
    """Raise :class:`HyperparameterMismatchError` listing every disagreement.

    ``overrides`` names hyperparameters whose target value is accepted despite a mismatch
    (``{"weight_decay": "target"}``); the run then continues with the target's value.
    Returns human-readable notes for the overridden differences.

    >>> a = OptimizerSpec("adamw", {"lr": 1e-3, "weight_decay": 1e-2}, "torch")
    >>> b = OptimizerSpec("adamw", {"lr": 1e-3, "weight_decay": 1e-4}, "jax")
    >>> compare_specs(a, b, {"weight_decay": "target"})
    ['weight_decay: source 0.01, target 0.0001 (overridden: target value kept)']
    """
    overrides = dict(overrides or {})
    if source.algorithm != target.algorithm:
        raise HyperparameterMismatchError(
            f"optimizer algorithms differ: source ({source.framework or 'checkpoint'}) is "
            f"{source.algorithm}, target ({target.framework or 'target'}) is "
            f"{target.algorithm}; build the target optimizer with the same algorithm "
            "(Adam with weight decay is L2 = add_decayed_weights before scale_by_adam; AdamW "
            "is decoupled = optax.adamw)", [("algorithm", source.algorithm, target.algorithm)])
    diffs: list[tuple[str, Any, Any]] = []
    notes: list[str] = []
    for k in sorted(set(source.hparams) | set(target.hparams)):
        s, t = source.hparams.get(k), target.hparams.get(k)
        if s is None or t is None or _same(k, s, t):
            continue
        if k in overrides:
            notes.append(f"{k}: source {s}, target {t} (overridden: target value kept)")
        else:
            diffs.append((k, s, t))
    if diffs:
        lines = [f"  {k}: source {s!r}, target {t!r}" for k, s, t in diffs]
        hint = _WD_HINT if any(k == "weight_decay" for k, _, _ in diffs) else ""
        lrhint = (" (lr is compared at the schedule's current position: check the schedule "
                  "and its step)" if any(k == "lr" for k, _, _ in diffs) else "")
        raise HyperparameterMismatchError(
            f"optimizer hyperparameters differ between source ({source.framework}) and target "
            f"({target.framework}) {source.algorithm}:\n" + "\n".join(lines) +
            f"\nFix the target, or accept the target's values with overrides="
            f"{ {k: 'target' for k, _, _ in diffs} }.{hint}{lrhint}", diffs)
    return notes


def _same(k: str, s: Any, t: Any) -> bool:
    if isinstance(s, bool) or isinstance(t, bool):
        return bool(s) == bool(t)
    if isinstance(s, (int, float)) and isinstance(t, (int, float)):
        s, t = float(s), float(t)
        if k == "lr":
            return math.isclose(s, t, rel_tol=_LR_RTOL, abs_tol=1e-12)
        return math.isclose(s, t, rel_tol=1e-9, abs_tol=0.0)
    return s == t
