"""Pure decisions of a multi-process save: which leaves are per rank, who writes what.

Nothing here does I/O or talks to other ranks: every rank runs the same functions on the
same gathered inputs and gets the same answer, so the assignment needs no extra message.

>>> per_rank_paths({("rng",): "unickpt.RNG", ("model",): "torch:torch.nn.Module",
...                 ("data",): "torch:torch.utils.data.DataLoader",
...                 ("data", "sampler"): "torch:torch.utils.data.Sampler"})
[('data',), ('rng',)]
>>> assign({"a": 8, "b": 4, "c": 4}, [0, 0])
{'a': 0, 'b': 1, 'c': 1}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..tree import Path

__all__ = ["PER_RANK_KINDS", "PER_RANK_PREFIXES", "is_per_rank_kind", "per_rank_paths",
           "assign", "rank_file"]

#: Kinds (as recorded in the manifest's ``kinds``) whose state belongs to one process: RNGs
#: and data position.  Any Stateful / get_state object is per rank as well (a data iterator,
#: a user's counter object): each rank gets its own back.
PER_RANK_KINDS = frozenset({
    "unickpt.RNG", "numpy.random.Generator", "torch:torch.Generator",
    "torch:torch.utils.data.DataLoader", "torch:torch.utils.data.Sampler",
    "jax:ProcessPRNGKey",  # a typed key held by one process of a jax.distributed job
})
PER_RANK_PREFIXES = ("stateful:", "get_state:")


def is_per_rank_kind(kind: str) -> bool:
    return kind in PER_RANK_KINDS or kind.startswith(PER_RANK_PREFIXES)


def per_rank_paths(kinds: Mapping[Path, str]) -> list[Path]:
    """The outermost paths whose kind is per rank, sorted."""
    out: list[Path] = []
    for p in sorted((p for p, k in kinds.items() if is_per_rank_kind(k)), key=len):
        if not any(p[:len(q)] == q for q in out):
            out.append(p)
    return sorted(out, key=lambda p: [str(k) for k in p])


def assign(sizes: Mapping[str, int], loads: list[int],
           holders: Mapping[str, Sequence[int]] | None = None) -> dict[str, int]:
    """Who writes each array.

    ``sizes`` maps a key to its bytes; ``holders[key]`` (when given) lists the ranks that have
    the data (a shard replicated on some ranks), otherwise every rank has it.  Greedy by
    decreasing size to the least-loaded allowed rank (ties: lowest rank), so bytes are
    balanced and every rank computes the same answer.  ``loads`` (the bytes each rank already
    writes) is updated in place.
    """
    owner: dict[str, int] = {}
    for key in sorted(sizes, key=lambda k: (-sizes[k], k)):
        allowed = holders.get(key) if holders is not None else None
        ranks = sorted(allowed) if allowed else range(len(loads))
        r = min(ranks, key=lambda i: (loads[i], i))
        owner[key] = r
        loads[r] += sizes[key]
    return owner


def rank_file(rank: int) -> str:
    """The array file rank ``rank`` writes into a checkpoint."""
    return f"arrays-r{rank}.safetensors"
