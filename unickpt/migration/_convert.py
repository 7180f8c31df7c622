"""The target-driven converter behind :func:`unickpt.migrate` (neutral trees in, neutral out).

Source and target trees follow the adapters' documented layouts (docs/torch.md, docs/jax.md):
a torch module is its flat ``state_dict`` (dotted keys), a torch optimizer is
``{"type", "state": {param name: {...}}, "param_groups": [...]}``, a scheduler its
``state_dict``; an nnx module is ``nnx.state`` as nested dicts and an ``nnx.Optimizer`` is
``{"step", "opt_state": {chain position: {field: ...}}}``.  Roles are read from the
manifests' ``kinds``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ..errors import IncompatibleCheckpointError
from ..tree import Path, format_path, iter_leaves
from ._trees import (
    ROLE_MODEL,
    ROLE_OPT,
    ROLE_OTHER,
    ROLE_SCHED,
    Problems,
    array_leaves,
    copy_tree,
    derived_words,
    framework_of,
    get_path,
    is_array,
    is_rng_kind,
    is_under,
    leaf_spec,
    rng_paths,
    role_of,
    set_path,
    to_array,
)
from .errors import MigrationError, UnsupportedOptimizerError
from .optim import NeutralOptState, OptimizerSpec, compare_specs, from_torch, torch_spec
from .rules import Matching, Rule, join_name, match_leaves
from .schedule import cosine_note, replay_torch_scheduler, torch_position

__all__ = ["Converter", "derived_words", "framework_of", "SPEC_KEY"]

_ALIASES = "__aliases__"  # the torch adapter's tied-tensor map
SPEC_KEY = "unickpt.optimizer"  # metadata key written with describe_optimizer()


class Converter:
    """Fills the target's neutral tree from the source's; collects every problem first."""

    def __init__(self, stree: Any, skinds: dict[Path, str], ttree: Any, tkinds: dict[Path, str],
                 target: Mapping[str, Any], to: str, rules: list[Rule], strict: bool,
                 overrides: Mapping[str, Any], metadata: Mapping[str, Any], step: int,
                 seed: int, progress: Callable[[int], None] | None) -> None:
        if not isinstance(stree, dict):
            raise MigrationError("the source checkpoint's root is not a dict of named entries")
        self.stree, self.skinds, self.ttree, self.tkinds = stree, skinds, ttree, tkinds
        self.target, self.to, self.rules, self.strict = target, to, rules, strict
        self.overrides, self.metadata, self.step, self.seed = overrides, metadata, step, seed
        self.progress = progress or (lambda n: None)
        self.rules_applied: list[str] = []
        self.dropped: list[str] = []
        self.synthesised: list[str] = []
        self.notes: list[str] = []
        self.partial: dict[str, list[str]] = {}
        self.problems = Problems()
        self.aliases: dict[str, str] = {}  # tied-tensor alias -> stored name (torch sources)

    # -- orchestration
    def run(self) -> Any:
        out = copy_tree(self.ttree)
        troles = {k: role_of(self.tkinds.get((k,))) for k in self.ttree}
        sroles = {k: role_of(self.skinds.get((k,))) for k in self.stree}
        pair: dict[Any, Any] = {}
        for k, role in troles.items():
            if k in self.stree and sroles[k] == role:
                pair[k] = k
            elif role != ROLE_OTHER:
                cands = [s for s, r in sroles.items() if r == role]
                pair[k] = cands[0] if len(cands) == 1 else None
            else:
                pair[k] = None
        self._refuse_unpaired(troles, sroles, pair)
        used = {v for v in pair.values() if v is not None}
        models = {k: self._model(out, k, pair[k]) for k, r in troles.items() if r == ROLE_MODEL
                  and pair[k] is not None}
        for k, r in troles.items():
            if r == ROLE_MODEL and pair[k] is None:
                self._missing_top(k, "no model in the source checkpoint to take it from")
        position, used_sched = self._source_position()
        used |= used_sched
        for k, r in troles.items():
            if r == ROLE_OPT:
                if pair[k] is None:
                    self._missing_top(k, "no optimizer in the source checkpoint")
                    continue
                model = self._owner_matching(models)
                self._optimizer(out, k, pair[k], model, position, troles)
            elif r == ROLE_OTHER:
                self._other(out, k, pair[k])
        for s in sroles:
            if s in used:
                continue
            if is_rng_kind(self.skinds.get((s,))):
                self.dropped.append(f"{format_path((s,))} (native RNG state cannot be "
                                    "translated; re-derived from seed and step)")
            elif self.strict:
                self.problems.unexpected.append(format_path((s,)))
            else:
                self.partial.setdefault("ignored", []).append(format_path((s,)))
        if self.problems:
            raise IncompatibleCheckpointError(
                f"cannot migrate to {self.to}: the checkpoint does not fit the target",
                missing=self.problems.missing, unexpected=self.problems.unexpected,
                mismatched=self.problems.mismatched)
        return out

    def _refuse_unpaired(self, troles: dict[Any, str], sroles: dict[Any, str],
                         pair: dict[Any, Any]) -> None:
        """A target model/optimizer with nothing of its role in the source: the source's layout
        is one migration does not read (linen params + optax state, a TrainState, plain dicts).
        Say which layout to use instead of listing keys as both missing and unexpected."""
        unpaired = [k for k, r in troles.items() if r in (ROLE_MODEL, ROLE_OPT)
                    and pair[k] is None and r not in sroles.values()]
        if not unpaired or not self.strict:
            return
        found = ", ".join(f"{format_path((k,))}: {self._describe_source(k)}"
                          for k in self.stree) or "nothing"
        raise MigrationError(
            f"cannot migrate to {self.to}: the target's "
            f"{', '.join(format_path((k,)) for k in unpaired)} needs a model/optimizer object in "
            f"the source checkpoint, which holds {found}. Migration reads models and optimizers "
            "saved as framework objects: from JAX an nnx.Module and an nnx.Optimizer "
            "(save {'model': nnx_model, 'optimizer': nnx_optimizer, 'step': step}); from "
            "PyTorch a torch.nn.Module and a torch.optim.Optimizer. Flax linen params with "
            "optax state (a flax.training TrainState, or {'model': params, 'optimizer': "
            "opt_state}) are not supported: load them into the equivalent nnx.Module and "
            "nnx.Optimizer, save that, and migrate the new checkpoint (or pass strict=False to "
            "keep the target's initial values)")

    def _describe_source(self, k: Any) -> str:
        kind = self.skinds.get((k,))
        if kind:
            return kind
        return "a plain tree" if isinstance(self.stree[k], (dict, list, tuple)) else "a value"

    def _missing_top(self, k: Any, why: str) -> None:
        if self.strict:
            self.problems.missing.append(format_path((k,)))
        else:
            self.partial.setdefault("kept_initial", []).append(f"{format_path((k,))}: {why}")

    def _owner_matching(self, models: dict[Any, Matching]) -> Matching:
        if len(models) != 1:
            raise MigrationError(f"migrating an optimizer needs exactly one model in the target "
                                 f"(found {len(models)}); migrate multi-model runs one model "
                                 "and optimizer at a time")
        return next(iter(models.values()))

    # -- model
    def _model(self, out: Any, tk: Any, sk: Any) -> Matching:
        s_rng = rng_paths(self.skinds, (sk,))
        t_rng = rng_paths(self.tkinds, (tk,))
        sl = array_leaves(self.stree[sk], lambda p: is_under(p, s_rng))
        tl = array_leaves(self.ttree[tk], lambda p: is_under(p, t_rng))
        # A torch module stores a tied tensor once and lists its other names in
        # "__aliases__" (docs/torch.md): offer it under every name, so an untied Flax twin
        # (e.g. embedding and output head) finds both.
        aliases = self.stree[sk].get(_ALIASES) if isinstance(self.stree[sk], dict) else None
        if isinstance(aliases, dict):
            for alias, stored in aliases.items():
                if stored in sl and alias not in sl:
                    sl[alias] = sl[stored]
                    self.aliases[alias] = stored
        m = match_leaves({n: leaf_spec(v) for n, (_, v) in tl.items()},
                         {n: leaf_spec(v) for n, (_, v) in sl.items()}, to=self.to,
                         rules=self.rules)
        # An alias no target leaf asked for is just the other name of a tied tensor.
        m.unexpected = [u for u in m.unexpected if u not in self.aliases]
        for tname, lm in m.pairs.items():
            tpath = tl[tname][0]
            if lm.source is not None:
                a = lm.apply(to_array(sl[lm.source][1]))
                set_path(out[tk], tpath, a)
                self.progress(a.nbytes)
            elif tname.rsplit(".", 1)[-1] == "num_batches_tracked":
                set_path(out[tk], tpath, np.asarray(self.step, dtype=tl[tname][1].dtype))
        for rp in t_rng:
            self._synth_rng(out[tk], rp, (tk, *rp))
        pre = format_path((tk,)) + "/"
        self.synthesised += [pre + n for n in m.synthesised]
        self.dropped += [pre + n for n in m.dropped]
        self.dropped += [f"{format_path((sk, *p))} (RNG stream re-derived)" for p in s_rng
                         if self.skinds.get((sk, *p), "").endswith("RngKey")]
        for r in m.rules_applied:
            if r not in self.rules_applied:
                self.rules_applied.append(r)
        self._report(tk, m)
        return m

    def _report(self, prefix: Any, m: Matching) -> None:
        if self.strict:
            self.problems.add((prefix,), m)
        else:
            self.problems.mismatched += [(f"{format_path((prefix,))}/{n}", w)
                                         for n, w in m.mismatched]
            pre = format_path((prefix,)) + "/"
            if m.missing:
                self.partial.setdefault("kept_initial", []).extend(pre + n for n in m.missing)
            if m.unexpected:
                self.partial.setdefault("ignored", []).extend(pre + n for n in m.unexpected)

    def _synth_rng(self, root: Any, rel: Path, full: Path) -> None:
        kind = self.tkinds.get(full, "")
        node = get_path(root, rel)
        salt = zlib.crc32(format_path(full).encode())
        if isinstance(node, dict) and "key_data" in node:
            kd = to_array(node["key_data"])
            words = derived_words(self.seed, self.step, kd.size, salt)
            node = dict(node, key_data=words.reshape(kd.shape).astype(kd.dtype))
            set_path(root, rel, node) if rel else None
        elif is_array(node) and kind.endswith("RngCount"):
            set_path(root, rel, np.zeros_like(to_array(node)))
        elif is_array(node) and np.asarray(node).dtype == np.uint32:  # raw uint32 key
            kd = to_array(node)
            set_path(root, rel, derived_words(self.seed, self.step, kd.size, salt).reshape(kd.shape))
        self.synthesised.append(f"{format_path(full)} (derived from seed {self.seed} and step "
                                f"{self.step})")

    # -- schedule position
    def _source_position(self) -> tuple[int | None, set]:
        for k, v in self.stree.items():
            if role_of(self.skinds.get((k,))) == ROLE_SCHED and isinstance(v, dict):
                pos = torch_position(v)
                note = cosine_note(v, pos)
                if note and self.to == "jax":
                    self.notes.append(note)
                return pos, {k}
        return None, set()

    # -- optimizer
    def _optimizer(self, out: Any, tk: Any, sk: Any, model: Matching, position: int | None,
                   troles: Mapping[Any, str]) -> None:
        stree = self.stree[sk]
        if self.to == "jax":
            cls = str(stree.get("type", "")).rsplit(".", 1)[-1] or None
            st = from_torch(stree, [], class_name=cls)
            src_spec = st.spec
        else:
            st, spos = _from_optax_tree(stree)
            position = spos if position is None else position
            given = self.overrides.get("source_optimizer") or self.metadata.get(SPEC_KEY)
            src_spec = OptimizerSpec.from_neutral(given) if given else None
            if src_spec is None:
                self.notes.append("the JAX source records no optimizer hyperparameters (save "
                                  "describe_optimizer(tx) under metadata 'unickpt.optimizer' "
                                  "or pass overrides={'source_optimizer': ...}); only the "
                                  "algorithm's state layout was checked")
        count = st.count
        if position is None:
            position = count if count is not None else self.step
        if count is not None and position != count:
            self.notes.append(f"schedule position {position} differs from the optimizer count "
                              f"{count} (a schedule stepped per epoch?): optax advances its "
                              "schedule on every update")
        if self.to == "torch":
            tgt_spec = self._torch_target(out, tk, position, troles)
        else:
            from .optax_spec import optax_spec

            tgt_spec, _ = optax_spec(self.target[tk].tx, position)
        if src_spec is not None:
            self.notes += compare_specs(src_spec, tgt_spec, self.overrides)
        elif st.spec is None and not _algo_fits(st, tgt_spec):
            raise UnsupportedOptimizerError(
                f"the source optimizer state ({sorted({k for s in st.slots.values() for k in s})}"
                f") does not fit the target's {tgt_spec.algorithm}")
        if self.to == "torch":
            self._fill_torch_opt(out[tk], tk, st, model, tgt_spec)
        else:
            self._fill_optax(out[tk], tk, st, model, position)

    def _torch_target(self, out: Any, tk: Any, position: int, troles: Mapping[Any, str]
                      ) -> OptimizerSpec:
        groups = out[tk]["param_groups"]
        for k, r in troles.items():
            if r != ROLE_SCHED:
                continue
            sd, lrs = replay_torch_scheduler(self.target[k], position)
            tree = out[k]
            for key in list(tree):
                if key in sd:
                    tree[key] = _like(tree[key], sd[key])
            for g, lr in zip(groups, lrs):
                g["lr"] = lr
        cls = str(out[tk].get("type", "")).rsplit(".", 1)[-1] or None
        return torch_spec(groups, cls)

    def _slot_for(self, tname: str, model: Matching, st: NeutralOptState, slot: str,
                  tshape: tuple, tdtype: Any, where: str) -> np.ndarray | None:
        lm = model.pairs.get(tname)
        src = lm.source if lm is not None else None
        if src is not None and src not in st.slots:
            src = self.aliases.get(src, src)  # optimizer state is kept once per tied tensor
        arr = st.slots.get(src, {}).get(slot) if src is not None else None
        if arr is None or lm is None:  # (no pair: no source, so no array either)
            if st.slots and self.strict:
                self.problems.missing.append(f"{where} (no {slot} for source {src or tname})")
            elif st.slots:
                self.partial.setdefault("kept_initial", []).append(where)
            return None
        a = lm.apply(to_array(arr))
        if tuple(a.shape) != tuple(tshape) or a.dtype != np.dtype(tdtype):
            self.problems.mismatched.append((where, f"target {np.dtype(tdtype)}{list(tshape)}, "
                                                    f"converted {a.dtype}{list(a.shape)}"))
            return None
        self.progress(a.nbytes)
        return a

    def _fill_torch_opt(self, tree: dict, tk: Any, st: NeutralOptState, model: Matching,
                        spec: OptimizerSpec) -> None:
        names = [n for g in tree["param_groups"] for n in g["params"]]
        specs = {lm.target: lm for lm in model.pairs.values()}
        state: dict[str, Any] = {}
        tmodel = None
        for k, v in self.ttree.items():
            if role_of(self.tkinds.get((k,))) == ROLE_MODEL:
                tmodel = array_leaves(v)
        if (st.count == 0) or not st.slots:
            tree["state"] = {}
            return
        for n in names:
            if n not in specs or tmodel is None or n not in tmodel:
                where = format_path((tk, "state", n))
                if self.strict:
                    self.problems.missing.append(f"{where} (parameter not in the migrated "
                                                 "model)")
                else:
                    self.partial.setdefault("kept_initial", []).append(where)
                continue
            shape, dtype = leaf_spec(tmodel[n][1])
            entry: dict[str, Any] = {}
            if spec.algorithm in ("adam", "adamw"):
                entry["step"] = np.asarray(float(st.count if st.count is not None else self.step),
                                           dtype=np.float32)
                for slot, tslot in (("mu", "exp_avg"), ("nu", "exp_avg_sq")):
                    a = self._slot_for(n, model, st, slot, shape, dtype,
                                       format_path((tk, "state", n, tslot)))
                    if a is not None:
                        entry[tslot] = a
            else:
                a = self._slot_for(n, model, st, "trace", shape, dtype,
                                   format_path((tk, "state", n, "momentum_buffer")))
                if a is not None:
                    entry["momentum_buffer"] = a
            state[n] = entry
        tree["state"] = state

    def _fill_optax(self, tree: dict, tk: Any, st: NeutralOptState, model: Matching,
                    position: int) -> None:
        stages = tree.get("opt_state")
        items = stages.items() if isinstance(stages, dict) else enumerate(stages or [])
        count = st.count if st.count is not None else self.step
        for i, node in items:
            if not isinstance(node, dict):
                continue
            slots = [s for s in ("mu", "nu", "trace") if s in node]
            for slot in slots:
                for p, v in iter_leaves(node[slot]):
                    if not is_array(v):
                        continue
                    where = format_path((tk, "opt_state", i, slot, *p))
                    a = self._slot_for(join_name(p), model, st, slot, tuple(v.shape), v.dtype,
                                       where)
                    if a is not None:
                        set_path(node[slot], p, a)
            if "count" in node:
                c = count if slots else position
                node["count"] = np.asarray(c, dtype=to_array(node["count"]).dtype)
        if "step" in tree and is_array(tree["step"]):
            tree["step"] = np.asarray(count, dtype=to_array(tree["step"]).dtype)

    # -- counters, metadata-like entries, RNG
    def _other(self, out: Any, tk: Any, sk: Any) -> None:
        kind = self.tkinds.get((tk,))
        if is_rng_kind(kind):
            if "PRNGKey" in (kind or "") or (isinstance(out[tk], dict) and "key_data" in out[tk]):
                self._synth_rng(out, (tk,), (tk,))
            else:
                self.synthesised.append(f"{format_path((tk,))} (generators seeded from seed "
                                        f"{self.seed} and step {self.step})")
            return
        if sk is None:
            self._missing_top(tk, "not in the source checkpoint")
            return
        problems: list[tuple[str, str]] = []
        value = _carry(self.ttree[tk], self.stree[sk], (tk,), problems)
        self.problems.mismatched += problems
        out[tk] = value


def _like(template: Any, value: Any) -> Any:
    """``value`` (from a live state_dict) in the container types the target tree uses."""
    if isinstance(template, list) and isinstance(value, (list, tuple)):
        return [_like(t, v) for t, v in zip(template, value)] + list(value[len(template):])
    if isinstance(template, float) and isinstance(value, (int, float)):
        return float(value)
    if is_array(template) and not is_array(value):
        return np.asarray(value, dtype=to_array(template).dtype)
    return value


def _carry(tv: Any, sv: Any, path: Path, problems: list[tuple[str, str]]) -> Any:
    """The source value for a plain target entry (counters, metrics, data position)."""
    if isinstance(tv, dict):
        if not isinstance(sv, dict):
            problems.append((format_path(path), f"target is a dict, source a {type(sv).__name__}"))
            return tv
        return {k: _carry(v, sv[k], (*path, k), problems) if k in sv else v
                for k, v in tv.items()}
    if is_array(tv):
        if not is_array(sv) or leaf_spec(tv) != leaf_spec(sv):
            problems.append((format_path(path), "target array "
                             f"{leaf_spec(tv)} vs source {leaf_spec(sv) if is_array(sv) else type(sv)}"))
            return tv
        return to_array(sv).copy()
    return sv


def _algo_fits(st: NeutralOptState, spec: OptimizerSpec) -> bool:
    kinds = {k for s in st.slots.values() for k in s}
    if not kinds:
        return True
    return (kinds <= {"mu", "nu"}) == (spec.algorithm in ("adam", "adamw"))


def _from_optax_tree(tree: Any) -> tuple[NeutralOptState, int | None]:
    """Neutral state from an ``nnx.Optimizer`` tree (or a bare optax state tree)."""
    stages = tree.get("opt_state", tree) if isinstance(tree, dict) else tree
    items = stages.items() if isinstance(stages, dict) else enumerate(stages or [])
    st = NeutralOptState(None, None)
    position = None
    found = False
    for _, node in items:
        if not isinstance(node, dict):
            continue
        slots = [s for s in ("mu", "nu", "trace") if s in node]
        if slots:
            if found:
                raise UnsupportedOptimizerError("the optax state has more than one moment stage; "
                                                "only single-algorithm chains can be migrated")
            found = True
            for slot in slots:
                for p, v in iter_leaves(node[slot]):
                    if is_array(v):
                        st.slots.setdefault(join_name(p), {})[slot] = to_array(v)
            if "count" in node:
                st.count = int(to_array(node["count"]))
        elif "count" in node and position is None:
            position = int(to_array(node["count"]))
    if not found and isinstance(tree, dict) and "step" in tree:
        st.count = None
    return st, position
