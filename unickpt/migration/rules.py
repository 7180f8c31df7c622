"""Name matching and layout transforms between PyTorch and Flax parameter trees.

Conversion is driven by the *target*: for every leaf the destination framework expects, a
rule names the source leaf it comes from and the transform that turns the source layout into
the target layout.  User rules are tried first, then the built-in rules:

==========================  =======================  ==========================================
target (Flax)               source (PyTorch)         transform
==========================  =======================  ==========================================
``kernel`` (2-d)            ``weight`` [out, in]     transpose -> [in, out]          (Linear)
``kernel`` (3/4/5-d)        ``weight`` O,I,*k        ``(2, .., n-1, 1, 0)`` -> *k,I,O (Conv1-3d)
``embedding``               ``weight``               identity                    (Embedding)
``scale``                   ``weight``               identity              (LayerNorm/BatchNorm)
``bias``                    ``bias``                 identity
``mean`` / ``var``          ``running_mean/var``     identity                    (BatchNorm)
(none)                      ``num_batches_tracked``  dropped: Flax has no twin
==========================  =======================  ==========================================

and the inverse of each for PyTorch targets (``num_batches_tracked`` is filled with the
source's step).  Names are compared as dotted paths (``layers.0.kernel``): PyTorch's
``state_dict`` keys as they are, Flax paths joined with dots.

>>> import numpy as np
>>> m = match_leaves({"fc.kernel": ((3, 2), np.float32)},
...                  {"fc.weight": ((2, 3), np.float32)}, to="jax")
>>> m.pairs["fc.kernel"].source, m.pairs["fc.kernel"].transform_name
('fc.weight', 'linear: transpose [out,in] -> [in,out]')
>>> m.pairs["fc.kernel"].apply(np.arange(6.0).reshape(2, 3)).shape
(3, 2)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Rule", "LeafMatch", "Matching", "match_leaves", "flatten_rules", "conv_to_flax",
           "conv_to_torch", "join_name", "nchw_flatten_to_flax", "nhwc_flatten_to_torch"]

Transform = Callable[[np.ndarray], np.ndarray]
LeafSpec = tuple[tuple[int, ...], Any]  # (shape, dtype)


def join_name(path: Sequence[Any]) -> str:
    """A tree path as the dotted name rules match against.

    >>> join_name(("layers", 0, "kernel"))
    'layers.0.kernel'
    """
    return ".".join(str(k) for k in path)


@dataclass(frozen=True)
class Rule:
    """A user rule: target leaves matching ``pattern`` come from the source leaf ``source``.

    ``pattern`` is a regular expression matched (``re.fullmatch``) against the target's dotted
    leaf name; ``source`` is a ``re`` replacement template (``\\1``, ``\\g<name>``) giving the
    source leaf's name; ``transform`` (optional) maps the source array to the target layout and
    is applied to optimizer moments of that leaf as well.  ``to`` restricts the rule to one
    direction (``"jax"`` or ``"torch"``).  ``source=None`` marks the target leaf as
    intentionally left at its current (freshly initialised) value.

    >>> r = Rule(r"backbone\\.(.*)", r"encoder.\\1")
    >>> r.source_for("backbone.fc.kernel")
    'encoder.fc.kernel'
    """

    pattern: str
    source: str | None
    transform: Transform | None = None
    to: str | None = None
    name: str = ""

    def source_for(self, target_name: str) -> str | None:
        """The source name for ``target_name``, or None if the rule does not match it."""
        m = re.fullmatch(self.pattern, target_name)
        if m is None:
            return None
        return "" if self.source is None else m.expand(self.source)

    def describe(self) -> str:
        return self.name or f"rule {self.pattern!r} <- {self.source!r}"


def conv_to_flax(a: np.ndarray) -> np.ndarray:
    """PyTorch ``[out, in, *k]`` weight -> Flax ``[*k, in, out]`` kernel (Linear: transpose)."""
    n = a.ndim
    return np.ascontiguousarray(a.transpose(*range(2, n), 1, 0))


def conv_to_torch(a: np.ndarray) -> np.ndarray:
    """Flax ``[*k, in, out]`` kernel -> PyTorch ``[out, in, *k]`` weight (inverse of the above)."""
    n = a.ndim
    return np.ascontiguousarray(a.transpose(n - 1, n - 2, *range(n - 2)))


def _identity(a: np.ndarray) -> np.ndarray:
    return a


def nchw_flatten_to_flax(chw: tuple[int, int, int]) -> Transform:
    """Transform for a Dense layer fed by ``flatten`` of a conv output, PyTorch -> Flax.

    PyTorch flattens NCHW activations in (C, H, W) order, Flax flattens NHWC in (H, W, C)
    order; the Dense's input rows must be permuted accordingly (shapes alone cannot tell).

    >>> w = np.arange(2 * 12.0).reshape(2, 12)     # torch Linear(3*2*2 -> 2)
    >>> k = nchw_flatten_to_flax((3, 2, 2))(w)      # flax kernel [h*w*c, out]
    >>> bool((nhwc_flatten_to_torch((3, 2, 2))(k) == w).all())
    True
    """
    c, h, w = chw

    def f(a: np.ndarray) -> np.ndarray:
        if a.ndim == 1:  # a bias is not permuted
            return a
        out = a.shape[0]
        return np.ascontiguousarray(
            a.reshape(out, c, h, w).transpose(0, 2, 3, 1).reshape(out, h * w * c).T)

    return f


def nhwc_flatten_to_torch(chw: tuple[int, int, int]) -> Transform:
    """Inverse of :func:`nchw_flatten_to_flax` (Flax kernel -> PyTorch Linear weight)."""
    c, h, w = chw

    def f(a: np.ndarray) -> np.ndarray:
        if a.ndim == 1:
            return a
        out = a.shape[1]
        return np.ascontiguousarray(
            a.T.reshape(out, h, w, c).transpose(0, 3, 1, 2).reshape(out, c * h * w))

    return f


def flatten_rules(layer: str, chw: tuple[int, int, int]) -> list[Rule]:
    """Rules for the Dense/Linear layer ``layer`` that follows a conv ``flatten``.

    ``chw`` is the (channels, height, width) of the flattened activation.  Returns one rule per
    direction; pass them in ``rules=``.

    >>> [r.to for r in flatten_rules("head", (8, 4, 4))]
    ['jax', 'torch']
    """
    esc = re.escape(layer)
    return [
        Rule(rf"{esc}\.kernel", f"{layer}.weight", nchw_flatten_to_flax(chw), to="jax",
             name=f"flatten NCHW->NHWC {layer} {tuple(chw)}"),
        Rule(rf"{esc}\.weight", f"{layer}.kernel", nhwc_flatten_to_torch(chw), to="torch",
             name=f"flatten NHWC->NCHW {layer} {tuple(chw)}"),
    ]


# Built-in rules: target leaf suffix -> candidate (source suffix, transform name, transform).
# The transform is picked by the candidate that exists in the source, so "weight" becomes a
# kernel, a scale or an embedding depending on what the target asks for.
_UNRESOLVED = "<unresolved>"
_LINEAR = "linear: transpose [out,in] -> [in,out]"
_BUILTIN: dict[str, dict[str, list[tuple[str, str]]]] = {
    "jax": {
        "kernel": [("weight", "kernel")],
        "scale": [("weight", "identity: weight -> scale")],
        "embedding": [("weight", "identity: weight -> embedding")],
        "bias": [("bias", "identity")],
        "mean": [("running_mean", "identity: running_mean -> mean")],
        "var": [("running_var", "identity: running_var -> var")],
    },
    "torch": {
        "weight": [("kernel", "kernel"), ("scale", "identity: scale -> weight"),
                   ("embedding", "identity: embedding -> weight")],
        "bias": [("bias", "identity")],
        "running_mean": [("mean", "identity: mean -> running_mean")],
        "running_var": [("var", "identity: var -> running_var")],
    },
}
# Source leaves with no counterpart that are dropped on purpose (reported, not an error).
_DROPPED = {"jax": ("num_batches_tracked",), "torch": ()}
# Target leaves with no counterpart that are synthesised (value supplied by the caller).
_SYNTHESISED = {"torch": ("num_batches_tracked",), "jax": ()}


def _kernel_transform(to: str, ndim: int) -> tuple[str, Transform]:
    if ndim == 2:
        return (_LINEAR if to == "jax" else "linear: transpose [in,out] -> [out,in]",
                conv_to_flax if to == "jax" else conv_to_torch)
    if to == "jax":
        return f"conv{ndim - 2}d: O,I,*k -> *k,I,O", conv_to_flax
    return f"conv{ndim - 2}d: *k,I,O -> O,I,*k", conv_to_torch


@dataclass
class LeafMatch:
    """Where one target leaf comes from."""

    target: str
    source: str | None  # None: synthesised / left as initialised
    transform: Transform = _identity
    transform_name: str = "identity"

    def apply(self, a: np.ndarray) -> np.ndarray:
        return self.transform(a)


@dataclass
class Matching:
    """Result of :func:`match_leaves`: pairs plus every problem found (none raised)."""

    pairs: dict[str, LeafMatch] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)      # target leaves with no source
    unexpected: list[str] = field(default_factory=list)   # source leaves used by no target
    mismatched: list[tuple[str, str]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)      # source leaves dropped by a rule
    synthesised: list[str] = field(default_factory=list)  # target leaves filled by a rule
    rules_applied: list[str] = field(default_factory=list)

    def source_to_target(self) -> dict[str, LeafMatch]:
        return {m.source: m for m in self.pairs.values() if m.source}


def _shape_after(tf: Transform, shape: tuple[int, ...], dtype: Any) -> tuple[int, ...]:
    # Run the transform on a zero-strided dummy: no copy of real data, works for any dtype.
    dummy = np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), shape, [0] * len(shape))
    return tuple(tf(dummy).shape)


def match_leaves(target: Mapping[str, LeafSpec], source: Mapping[str, LeafSpec], *, to: str,
                 rules: Iterable[Rule] = ()) -> Matching:
    """Match every target leaf to a source leaf and a layout transform.

    ``target`` and ``source`` map dotted leaf names to ``(shape, dtype)``.  Shapes are checked
    after the transform and dtypes must be equal (bfloat16 stays bfloat16: nothing is cast
    silently).  Problems are collected, not raised, so that callers report them all at once.
    """
    if to not in ("jax", "torch"):
        raise ValueError(f"to must be 'jax' or 'torch', got {to!r}")
    user = [r for r in rules if r.to in (None, to)]
    out = Matching()
    used: set[str] = set()
    for tname, (tshape, tdtype) in target.items():
        match = _match_one(tname, source, to, user, out)
        if match is None:
            suffix = tname.rsplit(".", 1)[-1]
            if suffix in _SYNTHESISED[to]:
                out.pairs[tname] = LeafMatch(tname, None, _identity, "synthesised")
                out.synthesised.append(tname)
            else:
                out.missing.append(tname)
            continue
        if match.transform_name == _UNRESOLVED:
            continue
        out.pairs[tname] = match
        if match.source is None:  # a user rule said "leave as initialised"
            out.synthesised.append(tname)
            continue
        used.add(match.source)
        sshape, sdtype = source[match.source]
        try:
            got = _shape_after(match.transform, tuple(sshape), sdtype)
        except Exception as e:  # a user transform that cannot handle the shape
            out.mismatched.append((tname, f"transform {match.transform_name!r} failed on "
                                          f"source {match.source} {list(sshape)}: {e}"))
            continue
        if got != tuple(tshape):
            out.mismatched.append((tname, f"target shape {list(tshape)}, source {match.source} "
                                          f"{list(sshape)} becomes {list(got)} after "
                                          f"{match.transform_name}"))
        elif np.dtype(sdtype) != np.dtype(tdtype):
            out.mismatched.append((tname, f"target dtype {np.dtype(tdtype)}, source "
                                          f"{match.source} is {np.dtype(sdtype)}; build the "
                                          "target in the source's dtype (no silent casts)"))
    for sname in source:
        if sname in used:
            continue
        if sname.rsplit(".", 1)[-1] in _DROPPED[to]:
            out.dropped.append(sname)
        else:
            out.unexpected.append(sname)
    return out


def _match_one(tname: str, source: Mapping[str, LeafSpec], to: str, user: list[Rule],
               out: Matching) -> LeafMatch | None:
    for r in user:
        sname = r.source_for(tname)
        if sname is None:
            continue
        if r.describe() not in out.rules_applied:
            out.rules_applied.append(r.describe())
        if r.source is None:
            return LeafMatch(tname, None, _identity, r.describe())
        if sname not in source:
            out.mismatched.append((tname, f"{r.describe()} names source leaf {sname!r}, "
                                          "which the source checkpoint does not have"))
            return LeafMatch(tname, None, _identity, _UNRESOLVED)
        if r.transform is not None:
            return LeafMatch(tname, sname, r.transform, r.describe())
        # A renamed leaf still gets the built-in layout rule for its suffix pair (a renamed
        # Linear is still transposed).
        tsuffix, ssuffix = tname.rsplit(".", 1)[-1], sname.rsplit(".", 1)[-1]
        for cand, tfname in _BUILTIN[to].get(tsuffix, []):
            if cand == ssuffix:
                return _make(tname, sname, tfname, to, source)
        return LeafMatch(tname, sname, _identity, r.describe())
    prefix, dot, suffix = tname.rpartition(".")
    for cand, tfname in _BUILTIN[to].get(suffix, []):
        sname = f"{prefix}{dot}{cand}"
        if sname in source:
            return _make(tname, sname, tfname, to, source)
    if tname in source:  # same name in both frameworks (custom parameters, buffers)
        return LeafMatch(tname, tname)
    return None


def _make(tname: str, sname: str, tfname: str, to: str,
          source: Mapping[str, LeafSpec]) -> LeafMatch:
    if tfname == "kernel":
        name, tf = _kernel_transform(to, len(source[sname][0]))
        return LeafMatch(tname, sname, tf, name)
    return LeafMatch(tname, sname, _identity, tfname)
