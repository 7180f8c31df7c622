"""torch.optim.Optimizer <-> a tree keyed by parameter *name*.

torch keys optimizer state by the parameter's position in ``param_groups``; that breaks when
the model changes and means nothing to another framework.  unickpt stores it by name::

    {"type": "torch.optim.adamw.AdamW",
     "state": {"fc1.weight": {"step": array(f32, []), "exp_avg": array, "exp_avg_sq": array},
               ...},                                   # only parameters that have state
     "param_groups": [{"params": ["fc1.weight", "fc1.bias", ...],
                       "lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-08, ...}, ...]}

Naming rule (the same on save and restore; documented in docs/torch.md):

1. Every ``nn.Module`` in the saved state (found through plain dicts, lists and tuples) is a
   candidate owner.  A parameter's name is its ``state_dict`` name in the first module (in
   state order) that holds it.
2. If the optimizer's parameters are owned by more than one module, names are qualified by
   the module's tree path: ``"generator/fc.weight"``.
3. Otherwise, if the optimizer was built with named parameters (``param_names`` in its
   groups), that name is used.
4. Otherwise the parameter is named ``"param_<i>"``, ``i`` being its position in the
   optimizer's flattened ``param_groups`` (torch's own index).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from unickpt.errors import UnsupportedLeafError
from unickpt.tree import Path, ShardedArray, format_path

from .dtensor import is_dtensor, new_like
from .module import named_tensors
from .tensors import array_spec, from_numpy, host_arrays, new_tensor

__all__ = ["optimizer_to_tree", "prepare_optimizer_restore", "param_names"]

# Per-parameter buffers of the built-in optimizers: they must have the parameter's shape.
_PARAM_SHAPED = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg",
                 "acc_delta", "grad_avg", "sum", "exp_inf", "ax", "prev", "step_size"}
_SKIP_GROUP_KEYS = {"params", "param_names"}


def _modules_in(root: Any, path: Path = ()) -> Iterator[tuple[Path, torch.nn.Module]]:
    if isinstance(root, torch.nn.Module):
        yield path, root
    elif type(root) is dict:
        for k, v in root.items():
            yield from _modules_in(v, (*path, k))
    elif type(root) in (list, tuple):
        for i, v in enumerate(root):
            yield from _modules_in(v, (*path, i))


def param_names(opt: torch.optim.Optimizer, root: Any) -> list[list[str]]:
    """The name of every parameter of ``opt``, group by group (see the module docstring)."""
    owner: dict[int, tuple[int, Path, str]] = {}
    for mi, (mpath, module) in enumerate(_modules_in(root)):
        canonical, _ = named_tensors(module)
        for name, t in canonical.items():
            if isinstance(t, torch.Tensor):
                owner.setdefault(id(t), (mi, mpath, name))
    used = {owner[id(p)][0] for g in opt.param_groups for p in g["params"] if id(p) in owner}
    qualify = len(used) > 1
    out: list[list[str]] = []
    i = 0
    seen: dict[str, int] = {}
    for g in opt.param_groups:
        given = g.get("param_names")
        names = []
        for j, p in enumerate(g["params"]):
            if id(p) in owner:
                _, mpath, name = owner[id(p)]
                name = f"{format_path(mpath)}/{name}" if qualify else name
            elif given is not None and j < len(given):
                name = str(given[j])
            else:
                name = f"param_{i}"
            if name in seen:
                raise UnsupportedLeafError(
                    f"optimizer parameters {seen[name]} and {i} both resolve to the name "
                    f"{name!r}; give the optimizer distinct parameters")
            seen[name] = i
            names.append(name)
            i += 1
        out.append(names)
    return out


def optimizer_to_tree(opt: torch.optim.Optimizer, ctx: Any, path: Path) -> dict[str, Any]:
    names = [n for group in param_names(opt, ctx.root) for n in group]
    sd = opt.state_dict()
    state: dict[str, Any] = {}
    tensors: list[tuple[Path, torch.Tensor]] = []
    slots: list[tuple[dict, str]] = []
    for idx, entry in sd["state"].items():
        name = names[idx]
        out: dict[str, Any] = {}
        for k, v in entry.items():
            p = (*path, "state", name, k)
            if isinstance(v, torch.Tensor):
                tensors.append((p, v))
                slots.append((out, k))
                out[k] = None
            else:
                out[k] = ctx.to_tree(v, p)
        state[name] = out
    for (d, k), a in zip(slots, host_arrays(tensors, snapshot=ctx.snapshot)):
        d[k] = a
    groups = []
    pos = 0
    for gi, g in enumerate(sd["param_groups"]):
        n = len(g["params"])
        group = {"params": names[pos:pos + n]}
        pos += n
        for k, v in g.items():
            if k not in _SKIP_GROUP_KEYS:
                group[k] = ctx.to_tree(v, (*path, "param_groups", gi, k))
        groups.append(group)
    cls = type(opt)
    return {"type": f"{cls.__module__}.{cls.__qualname__}", "state": state,
            "param_groups": groups}


def _dtensor_state(param: torch.Tensor, v: Any) -> bool:
    """A parameter-shaped state value of a DTensor parameter (FSDP2): restored as a DTensor
    placed like the parameter, reading only this rank's region."""
    spec = array_spec(v)
    return is_dtensor(param) and spec is not None and spec[0] == tuple(param.shape) and bool(
        spec[0])


def _to_torch(v: Any, device: torch.device) -> Any:
    """Checkpoint arrays inside an optimizer value back to tensors (containers kept)."""
    if isinstance(v, (np.ndarray, np.generic, ShardedArray)):
        return new_tensor(v, device)
    if type(v) is dict:
        return {k: _to_torch(x, device) for k, x in v.items()}
    if type(v) in (list, tuple):
        return type(v)(_to_torch(x, device) for x in v)
    return v


def prepare_optimizer_restore(opt: torch.optim.Optimizer, tree: Any, ctx: Any,
                              path: Path) -> Callable[[], Any]:
    if not isinstance(tree, dict) or not isinstance(tree.get("state"), dict) \
            or not isinstance(tree.get("param_groups"), list):
        ctx.mismatch(path, "target is a torch optimizer, checkpoint does not hold an optimizer "
                           "tree (state + param_groups)")
        return lambda: opt
    cls = type(opt)
    want = f"{cls.__module__}.{cls.__qualname__}"
    if tree.get("type", want) != want:
        ctx.mismatch((*path, "type"), f"target is {want}, checkpoint holds {tree['type']} "
                                      "state")
    try:
        groups = param_names(opt, getattr(ctx, "root", None))
    except UnsupportedLeafError as e:
        ctx.mismatch(path, str(e))
        return lambda: opt
    params = [p for g in opt.param_groups for p in g["params"]]
    flat = [n for g in groups for n in g]
    index = {n: i for i, n in enumerate(flat)}
    saved_groups = tree["param_groups"]
    if len(saved_groups) != len(groups):
        ctx.mismatch((*path, "param_groups"), f"target has {len(groups)} parameter groups, "
                                              f"checkpoint {len(saved_groups)}")
        return lambda: opt
    for gi, (names, sg) in enumerate(zip(groups, saved_groups)):
        saved = sg.get("params") if isinstance(sg, dict) else None
        if not isinstance(saved, list):
            ctx.mismatch((*path, "param_groups", gi), "expected a dict with a params list")
            continue
        for n in names:
            if n not in saved:
                ctx.missing((*path, "param_groups", gi, "params", n))
        for n in saved:
            if n not in names:
                ctx.unexpected((*path, "param_groups", gi, "params", n))

    state: dict[int, Any] = {}
    for name, entry in tree["state"].items():
        p = (*path, "state", name)
        if name not in index:
            ctx.unexpected(p)
            continue
        if not isinstance(entry, dict):
            ctx.mismatch(p, f"expected a dict of state values, checkpoint has a "
                            f"{type(entry).__name__}")
            continue
        param = params[index[name]]
        for k, v in entry.items():
            spec = array_spec(v)
            if k in _PARAM_SHAPED and spec is not None and spec[0] != tuple(param.shape):
                ctx.mismatch((*p, k), f"parameter shape {list(param.shape)}, checkpoint "
                                      f"{spec[1]}{list(spec[0])}")
        state[index[name]] = (entry, param)

    def apply() -> torch.optim.Optimizer:
        sd_state = {}
        for i, (entry, param) in state.items():
            # "step" stays on the CPU as torch keeps it (load_state_dict moves it when the
            # optimizer is capturable/fused); everything else lands on the parameter's device.
            sd_state[i] = {k: _to_torch(v, torch.device("cpu") if k == "step" else param.device)
                           if not _dtensor_state(param, v) else new_like(param, v, from_numpy)
                           for k, v in entry.items()}
        sd_groups = []
        pos = 0
        for g, sg in zip(opt.param_groups, saved_groups):
            new = {}
            for k, v in sg.items():
                if k in _SKIP_GROUP_KEYS:
                    continue
                cur = g.get(k)
                dev = cur.device if isinstance(cur, torch.Tensor) else torch.device("cpu")
                new[k] = _to_torch(v, dev)
            new["params"] = list(range(pos, pos + len(g["params"])))
            pos += len(g["params"])
            sd_groups.append(new)
        opt.load_state_dict({"state": sd_state, "param_groups": sd_groups})
        return opt

    return apply
