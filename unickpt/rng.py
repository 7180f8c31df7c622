"""``unickpt.RNG()``: a state leaf that saves and restores the process-global RNGs.

Put one in the state you save; on save it captures, on restore it sets:

* ``python``: the ``random`` module (Mersenne Twister words as a uint32 array, position,
  cached gauss value),
* ``numpy``: NumPy's legacy global RNG (``np.random.seed`` / ``np.random.rand``),
* one entry per loaded adapter (``torch``, ``jax``, ...) from its ``capture_rng()``; an
  adapter counts as loaded only when its framework is already imported (unickpt never
  imports one).

Generators you own (``np.random.Generator``, a torch ``Generator``, a JAX key) are not
global: put them in the state themselves; ``np.random.Generator`` objects are state leaves
saved through their ``bit_generator.state``.

Restoring a checkpoint that lacks an entry (written by an older version, or on hardware
without that framework or device) warns with :class:`UserWarning` naming what was not
restored, and restores the rest; entries this process cannot use are ignored with a
warning.  It never fails because of a missing RNG entry.

>>> import random, numpy as np, unickpt
>>> from unickpt.state import to_tree, restore_tree
>>> random.seed(1); np.random.seed(1)
>>> saved, _ = to_tree({"rng": unickpt.RNG()})
>>> a = (random.random(), np.random.rand())
>>> _ = restore_tree({"rng": unickpt.RNG()}, saved)
>>> (random.random(), np.random.rand()) == a
True
"""

from __future__ import annotations

import functools
import random
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from .adapters import loaded_adapters
from .tree import Path, format_path

__all__ = ["RNG", "capture_global_rngs", "restore_global_rngs", "seed_global_rngs"]

_BUILTIN = ("python", "numpy")


def _capture_python() -> dict:
    version, internal, gauss = random.getstate()
    return {"version": int(version), "mt": np.array(internal[:-1], dtype=np.uint32),
            "pos": int(internal[-1]), "gauss_next": gauss}


def _restore_python(s: Any) -> None:
    mt = np.asarray(s["mt"], dtype=np.uint32)
    gauss = s["gauss_next"]
    random.setstate((int(s["version"]), (*(int(x) for x in mt), int(s["pos"])),
                     None if gauss is None else float(gauss)))


def _capture_numpy() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"algorithm": str(name), "keys": np.array(keys, dtype=np.uint32), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _restore_numpy(s: Any) -> None:
    np.random.set_state((str(s["algorithm"]), np.array(s["keys"], dtype=np.uint32),
                         int(s["pos"]), int(s["has_gauss"]), float(s["cached_gaussian"])))


def _check(entry: str, s: Any) -> str | None:
    """Why the stored ``entry`` cannot be applied, or None when it fits."""
    need = {"python": ("version", "mt", "pos", "gauss_next"),
            "numpy": ("algorithm", "keys", "pos", "has_gauss", "cached_gaussian")}[entry]
    if not isinstance(s, dict) or any(k not in s for k in need):
        return f"expected a dict with {', '.join(need)}"
    arr = s["mt"] if entry == "python" else s["keys"]
    if not isinstance(arr, np.ndarray) or arr.shape != (624,) or arr.dtype != np.uint32:
        return "expected 624 uint32 Mersenne Twister words"
    return None


def _adapter_restore(adapter: Any, state: Any, notes: list[str]) -> None:
    # Other hardware or another framework version may store what this one cannot set: that
    # is a warning (named by the adapter), never a failed restore.
    try:
        notes.extend(adapter.restore_rng(state))
    except Exception as e:
        notes.append(f"{adapter.name} ({type(e).__name__}: {e})")


def capture_global_rngs() -> dict[str, Any]:
    """Every global RNG of this process (``random``, NumPy's legacy one, each loaded adapter's).

    Goes through the adapter contract (:meth:`unickpt.contract.Adapter.capture_rng`), so no
    framework is imported and none is special-cased.

    >>> import random
    >>> saved = capture_global_rngs(); a = random.random()
    >>> _ = restore_global_rngs(saved); random.random() == a
    True
    """
    out: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state()}
    for adapter in loaded_adapters():
        state = adapter.capture_rng()
        if state is not None:
            out[adapter.name] = state
    return out


def restore_global_rngs(saved: dict[str, Any]) -> list[str]:
    """Put back what :func:`capture_global_rngs` returned; returns the adapters' warnings."""
    random.setstate(saved["python"])
    np.random.set_state(saved["numpy"])
    notes: list[str] = []
    for adapter in loaded_adapters():
        if adapter.name in saved:
            _adapter_restore(adapter, saved[adapter.name], notes)
    return notes


def seed_global_rngs(seed: int) -> None:
    """Seed every global RNG from ``seed`` (an int in [0, 2**64)): ``random`` with ``seed``,
    NumPy with its low 32 bits, each loaded adapter through its ``seed_rng``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    for adapter in loaded_adapters():
        seed_rng = getattr(adapter, "seed_rng", None)  # adapters written before seed_rng
        if seed_rng is not None:
            seed_rng(seed)


class RNG:
    """The global RNG states of this process, as one entry of a state tree.

    Put ``unickpt.RNG()`` anywhere in the state given to ``save``/``restore``; it holds no
    data itself (the capture happens when the state is converted for saving).
    """

    _unickpt_kind_ = "unickpt.RNG"

    def __repr__(self) -> str:
        return "unickpt.RNG()"

    def _unickpt_to_tree_(self, ctx: Any, path: Path) -> dict:
        out: dict[str, Any] = {"python": _capture_python(), "numpy": _capture_numpy()}
        for adapter in loaded_adapters():
            state = adapter.capture_rng()
            if state is not None:
                out[adapter.name] = ctx.to_tree(state, (*path, adapter.name))
        return out

    def _unickpt_prepare_restore_(self, tree: Any, ctx: Any,
                                  path: Path) -> Callable[[], Any]:
        where = format_path(path)
        if not isinstance(tree, dict):
            ctx.mismatch(path, f"target is unickpt.RNG(), checkpoint has a "
                               f"{type(tree).__name__}")
            return lambda: self
        notes: list[str] = []
        steps: list[Callable[[], None]] = []
        for name, restore in (("python", _restore_python), ("numpy", _restore_numpy)):
            if name not in tree:
                notes.append(f"{name} (not in the checkpoint)")
                continue
            why = _check(name, tree[name])
            if why:
                notes.append(f"{name} ({why})")
                continue
            steps.append(functools.partial(restore, tree[name]))
        adapters = {a.name: a for a in loaded_adapters()}
        for name, adapter in adapters.items():
            if name not in tree:
                if adapter.capture_rng() is not None:
                    notes.append(f"{name} (not in the checkpoint)")
                continue
            steps.append(functools.partial(_adapter_restore, adapter, tree[name], notes))
        ignored = sorted(str(k) for k in tree if k not in _BUILTIN and k not in adapters)

        def apply() -> RNG:
            for step in steps:
                step()
            if notes:
                warnings.warn(f"unickpt.RNG at {where}: not restored: {'; '.join(notes)}. "
                              "Random streams of those generators will differ from the "
                              "original run", UserWarning, stacklevel=2)
            if ignored:
                warnings.warn(f"unickpt.RNG at {where}: the checkpoint holds RNG state for "
                              f"{', '.join(ignored)}, which this process does not use "
                              "(framework not imported); ignored", UserWarning, stacklevel=2)
            return self

        return apply
