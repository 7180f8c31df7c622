"""Small helpers on neutral trees used by the migration converter."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from ..tree import LazyArray, Path, ShardedArray, format_path, iter_leaves
from .rules import Matching, join_name

ROLE_MODEL, ROLE_OPT, ROLE_SCHED, ROLE_OTHER = "model", "optimizer", "scheduler", "other"


def framework_of(kinds: Mapping[Path, str]) -> str | None:
    found = {k.split(":", 1)[0] for k in kinds.values() if ":" in k}
    found &= {"torch", "jax"}
    return found.pop() if len(found) == 1 else None


def derived_words(seed: int, step: int, n: int, salt: int = 0) -> np.ndarray:
    """``n`` uint32 words derived from (seed, step): the same in every framework."""
    return np.random.SeedSequence([seed & (2**63 - 1), step, salt]).generate_state(n, np.uint32)


def is_rng_kind(kind: str | None) -> bool:
    return kind is not None and any(s in kind for s in ("RNG", "Generator", "PRNGKey", "RngKey",
                                                   "RngCount"))


class Problems:
    def __init__(self) -> None:
        self.missing: list[str] = []
        self.unexpected: list[str] = []
        self.mismatched: list[tuple[str, str]] = []

    def add(self, prefix: Path, m: Matching) -> None:
        pre = format_path(prefix) + "/" if prefix else ""
        self.missing += [pre + n for n in m.missing]
        self.unexpected += [pre + n for n in m.unexpected]
        self.mismatched += [(pre + n, why) for n, why in m.mismatched]

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)


def role_of(kind: str | None) -> str:
    if not kind:
        return ROLE_OTHER
    if kind.startswith("torch:torch.nn.Module") or kind.startswith("jax:nnx.Module"):
        return ROLE_MODEL
    if kind.startswith("torch:torch.optim.Optimizer") or kind.startswith("jax:nnx.Optimizer"):
        return ROLE_OPT
    if kind.startswith("torch:torch.optim.lr_scheduler"):
        return ROLE_SCHED
    return ROLE_OTHER


def is_array(x: Any) -> bool:
    return isinstance(x, (np.ndarray, np.generic, ShardedArray, LazyArray))


def to_array(x: Any) -> np.ndarray:
    if isinstance(x, ShardedArray):
        return x.assemble()
    if isinstance(x, LazyArray):
        return x.materialize()
    return np.asarray(x)


def array_leaves(tree: Any, skip: Callable[[Path], bool] = lambda p: False
            ) -> dict[str, tuple[Path, Any]]:
    """Array leaves of a model subtree by dotted name (torch keys already contain dots)."""
    out: dict[str, tuple[Path, Any]] = {}
    for p, v in iter_leaves(tree):
        if is_array(v) and not skip(p):
            out[join_name(p)] = (p, v)
    return out


def leaf_spec(v: Any) -> tuple[tuple[int, ...], np.dtype]:
    return tuple(v.shape), np.dtype(v.dtype)


def copy_tree(tree: Any) -> Any:
    if type(tree) is dict:
        return {k: copy_tree(v) for k, v in tree.items()}
    if type(tree) is list:
        return [copy_tree(v) for v in tree]
    return tree


def set_path(tree: Any, path: Path, value: Any) -> None:
    node = tree
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value


def get_path(tree: Any, path: Path) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def rng_paths(kinds: Mapping[Path, str], prefix: Path) -> list[Path]:
    """Paths (relative to ``prefix``) of RNG subtrees inside a model (nnx.Rngs streams)."""
    out = []
    for p, k in kinds.items():
        if p[:len(prefix)] == prefix and (k.endswith("nnx.RngKey") or k.endswith("nnx.RngCount")
                                          or k.endswith("PRNGKey")):
            out.append(p[len(prefix):])
    return out


def is_under(p: Path, prefixes: Iterable[Path]) -> bool:
    return any(p[:len(q)] == q for q in prefixes)
