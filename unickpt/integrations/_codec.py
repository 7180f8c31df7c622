"""A framework's checkpoint dict <-> a neutral state tree plus a small type schema.

Trainer checkpoints (Lightning's, say) are dicts that the neutral tree cannot hold as they
are: ``int`` keys (optimizer state is keyed by parameter index), ``OrderedDict`` state dicts
carrying ``_metadata``, tuples, ``torch.dtype``/``torch.device``/``torch.Size`` values.
:func:`encode` turns such a dict into a neutral tree (string keys, lists, arrays and
scalars) and a *schema*: a list of ``[path, tag]`` pairs, plain data stored in the
checkpoint's metadata, that :func:`decode` uses to give every value its original type back.
The tree stays readable as it is by ``unickpt.load`` (``optimizer_states/0/state/0/exp_avg``).

Anything else (a lambda, an arbitrary object) raises :class:`~unickpt.UnsupportedLeafError`
naming its key: nothing is pickled.

>>> import collections, torch
>>> ckpt = {"state_dict": collections.OrderedDict(w=torch.ones(2)), "opt": {0: {"step": 3}},
...         "shape": (2, 3), "dtype": torch.float16}
>>> tree, schema = encode(ckpt)
>>> sorted(tree["opt"]), tree["shape"]
(['0'], [2, 3])
>>> back = decode(tree, schema)
>>> type(back["state_dict"]).__name__, back["opt"][0]["step"], back["shape"], back["dtype"]
('OrderedDict', 3, (2, 3), torch.float16)
"""

from __future__ import annotations

import collections
import pathlib
from typing import Any

import numpy as np

from unickpt import UnsupportedLeafError, format_path

__all__ = ["encode", "decode", "SCHEMA_KEY"]

#: the metadata key holding the schema
SCHEMA_KEY = "unickpt.integration.schema"

_SCALARS = (bool, int, float, str, bytes, type(None))


def _torch() -> Any:
    import sys

    return sys.modules.get("torch")  # a value can only be a tensor if torch is imported


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


class _Encoder:
    def __init__(self, what: str):
        self.what = what
        self.schema: list[list[Any]] = []
        self.torch = _torch()

    def fail(self, path: tuple, why: str) -> UnsupportedLeafError:
        return UnsupportedLeafError(
            f"cannot store {format_path(path) or '<root>'} of {self.what}: {why}. unickpt "
            "stores arrays, tensors, numbers, strings, bytes, None and dicts/lists/tuples of "
            "them (no pickle); convert this value (e.g. to a str or a dict of numbers) or "
            "leave it out of the checkpoint")

    def tag(self, path: tuple, tag: Any) -> None:
        self.schema.append([list(path), tag])

    def keys(self, d: dict, path: tuple) -> tuple[list[str], list | None]:
        """The stored (str) keys, and the original keys when they are not all str."""
        if all(type(k) is str for k in d):
            return list(d), None
        originals = []
        for k in d:
            if type(k) not in (str, int):
                raise self.fail((*path, repr(k)), f"the dict key {k!r} is a "
                                f"{type(k).__name__}; only str and int keys are supported")
            originals.append(k)
        stored = [str(k) for k in originals]
        if len(set(stored)) != len(stored):
            raise self.fail(path, "the dict has keys that differ only in type (1 and '1')")
        return stored, originals

    def __call__(self, obj: Any, path: tuple = ()) -> Any:
        torch = self.torch
        if isinstance(obj, _SCALARS) or isinstance(obj, (np.ndarray, np.generic)):
            if isinstance(obj, np.ndarray) and obj.dtype.hasobject:
                raise self.fail(path, "a numpy array of Python objects")
            return obj
        if torch is not None and isinstance(obj, torch.Tensor):
            self.tag(path, ["tensor", _dtype_name(obj.dtype)])
            return obj.detach()
        if isinstance(obj, dict):
            stored, originals = self.keys(obj, path)
            if isinstance(obj, collections.OrderedDict):
                meta = getattr(obj, "_metadata", None)
                self.tag(path, ["odict", _plain_meta(meta), originals])
            elif originals is not None:
                self.tag(path, ["keys", originals])
            # other dict subclasses (AttributeDict, ...) come back as plain dicts
            return {s: self(v, (*path, s)) for s, v in zip(stored, obj.values())}
        if torch is not None and isinstance(obj, torch.Size):
            self.tag(path, ["size"])
            return [int(v) for v in obj]
        if isinstance(obj, (list, tuple)):
            if isinstance(obj, tuple):
                self.tag(path, ["tuple"])
            return [self(v, (*path, i)) for i, v in enumerate(obj)]
        if torch is not None and isinstance(obj, torch.dtype):
            self.tag(path, ["dtype"])
            return _dtype_name(obj)
        if torch is not None and isinstance(obj, torch.device):
            self.tag(path, ["device"])
            return str(obj)
        if isinstance(obj, pathlib.PurePath):
            self.tag(path, ["path"])
            return str(obj)
        raise self.fail(path, f"{type(obj).__module__}.{type(obj).__qualname__} is not a "
                              "state-tree value")


def _plain_meta(meta: Any) -> Any:
    # torch's state_dict()._metadata: {module prefix: {"version": int, ...}}: plain already.
    if meta is None:
        return None
    try:
        return {str(k): {str(a): b for a, b in dict(v).items()
                         if isinstance(b, (bool, int, float, str, type(None)))}
                for k, v in dict(meta).items()}
    except (TypeError, ValueError):
        return None  # not the shape torch writes: version hints only, safe to drop


def encode(obj: Any, what: str = "the checkpoint") -> tuple[Any, list[list[Any]]]:
    """``(neutral tree, schema)`` for ``obj``; ``what`` names the checkpoint in errors."""
    enc = _Encoder(what)
    tree = enc(obj)
    return tree, enc.schema


def _to_tensor(a: Any, dtype_name: str, map_location: Any) -> Any:
    import torch

    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype):
        raise UnsupportedLeafError(f"the checkpoint stores a torch.{dtype_name} tensor, which "
                                   f"torch {torch.__version__} does not know")
    if isinstance(a, torch.Tensor):  # decoding a tree that was never written
        return a.to(dtype)
    arr = np.array(a, copy=True, order="C")  # writable and owned: the tensor keeps it
    if arr.dtype.kind == "V" or arr.dtype.name in ("bfloat16",) or "float8" in arr.dtype.name:
        arr = arr.view(f"uint{8 * arr.dtype.itemsize}")  # ml_dtypes values: same bits
    t = torch.from_numpy(arr)
    if t.dtype != dtype:
        t = t.view(dtype)
    if map_location is not None and not callable(map_location) and not isinstance(
            map_location, dict):
        t = t.to(map_location)
    return t


def decode(tree: Any, schema: Any, *, map_location: Any = None) -> Any:
    """Invert :func:`encode` on a tree read back by ``unickpt.load``.

    Tensors come back on the CPU, or on ``map_location`` when it is a device or a string.
    """
    tags = {tuple(p): t for p, t in (schema or [])}

    def walk(node: Any, path: tuple) -> Any:
        if isinstance(node, dict):
            node = {k: walk(v, (*path, k)) for k, v in node.items()}
        elif isinstance(node, (list, tuple)):
            node = [walk(v, (*path, i)) for i, v in enumerate(node)]
        tag = tags.get(path)
        if tag is None:
            return node
        kind = tag[0]
        if kind == "tensor":
            return _to_tensor(node, tag[1], map_location)
        if kind == "keys":
            return dict(zip(tag[1], node.values()))
        if kind == "odict":
            keys = tag[2] if len(tag) > 2 and tag[2] is not None else list(node)
            out = collections.OrderedDict(zip(keys, node.values()))
            if tag[1] is not None:
                out._metadata = tag[1]  # type: ignore[attr-defined]
            return out
        if kind == "tuple":
            return tuple(node)
        if kind in ("size", "dtype", "device"):
            import torch

            if kind == "size":
                return torch.Size(node)
            return getattr(torch, node) if kind == "dtype" else torch.device(node)
        if kind == "path":
            return pathlib.Path(node)
        raise UnsupportedLeafError(f"{format_path(path)}: unknown type tag {kind!r} in the "
                                   "checkpoint's schema (written by a newer unickpt?)")

    return walk(tree, ())
