"""The systems under comparison, each as ``prepare / save / load`` on the same state.

Every save is made durable: systems that do not fsync what they wrote get an fsync of every
file and directory they produced (inside the timed region), so all numbers are "on disk".
Every load returns materialized host memory (no lazy views), except ``unickpt (mmap)``:
safetensors is asked for its ``backend="pread"`` (its default ``"mmap"`` returns file-backed
views whose pages are read later, on first touch).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from _states import BF16, flatten


def fsync_tree(path: str) -> None:
    """fsync every file and directory under ``path`` (or the file itself), then its parent."""
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            for f in files:
                _fsync(os.path.join(root, f))
            for d in dirs:
                _fsync(os.path.join(root, d))
    _fsync(path)
    _fsync(os.path.dirname(os.path.abspath(path)))


def _fsync(p: str) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class System:
    name: str
    prepare: Callable[[dict], Any]  # numpy tree -> the system's native object (untimed)
    save: Callable[[Any, str], None]  # timed, must leave the data durable
    load: Callable[[str, Any], Any]  # timed; second argument: the prepared object (templates)
    to_numpy: Callable[[Any], dict[str, np.ndarray]]  # loaded -> flat numpy (for checking)
    fsync_added: bool  # the harness fsyncs what this system wrote
    version: str = ""
    suffix: str = ""  # file name suffix the system insists on


# ---------------------------------------------------------------- torch helpers
def _to_torch(a: np.ndarray) -> Any:
    import torch

    if a.dtype == BF16:
        return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _from_torch(t: Any) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy().view(BF16) if hasattr(torch, "uint16") else \
            t.view(torch.int16).numpy().view(BF16)
    return t.numpy()


def _torch_flat(tree: dict) -> dict:
    return {k: _to_torch(v) for k, v in flatten(tree).items()}


def _flat_torch_numpy(d: dict) -> dict[str, np.ndarray]:
    return {k: _from_torch(v) for k, v in d.items()}


# ---------------------------------------------------------------- systems
def unickpt_system() -> System:
    import unickpt

    return System(
        "unickpt", prepare=lambda tree: tree,
        save=lambda tree, path: unickpt.save(path, tree),
        load=lambda path, _t: unickpt.load(path),
        to_numpy=flatten, fsync_added=False, version=unickpt.__version__)


def raw_system() -> System:
    """Sequential write of the same bytes into one file + fsync; read back into fresh arrays.

    A reference for the simplest possible save, not a bound: one thread that copies and then
    waits for the disk is beaten by any writer that overlaps the two (``_bound.py`` measures
    the machine's best write of the same bytes).
    """

    def save(tree: dict, path: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for a in flatten(tree).values():
                mv = memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
                while len(mv):
                    mv = mv[os.write(fd, mv):]
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync(os.path.dirname(os.path.abspath(path)))

    def load(path: str, tree: dict) -> dict:
        out = {}
        with open(path, "rb", buffering=0) as f:
            for k, a in flatten(tree).items():
                b = np.empty(a.shape, a.dtype)
                mv = memoryview(b.reshape(-1).view(np.uint8))
                while len(mv):
                    mv = mv[f.readinto(mv):]
                out[k] = b
        return out

    return System("raw write+fsync", prepare=lambda t: t, save=save, load=load,
                  to_numpy=lambda d: d, fsync_added=False, version="os.write")


def torch_system() -> System:
    import torch

    def save(sd: dict, path: str) -> None:
        torch.save(sd, path)
        fsync_tree(path)

    return System("torch.save", prepare=_torch_flat, save=save,
                  load=lambda path, _t: torch.load(path, weights_only=True),
                  to_numpy=_flat_torch_numpy, fsync_added=True, version=torch.__version__)


def safetensors_np_system() -> System:
    import safetensors
    from safetensors.numpy import load_file, save_file

    def save(flat: dict, path: str) -> None:
        save_file(flat, path)
        fsync_tree(path)

    return System("safetensors (numpy)", prepare=flatten, save=save,
                  load=lambda path, _t: load_file(path, backend="pread"), to_numpy=lambda d: d,
                  fsync_added=True, version=safetensors.__version__)


def safetensors_pt_system() -> System:
    import safetensors
    from safetensors.torch import load_file, save_file

    def save(sd: dict, path: str) -> None:
        save_file(sd, path)
        fsync_tree(path)

    return System("safetensors (torch)", prepare=_torch_flat, save=save,
                  load=lambda path, _t: load_file(path, backend="pread"),
                  to_numpy=_flat_torch_numpy,
                  fsync_added=True, version=safetensors.__version__)


def savez_system() -> System:
    def save(flat: dict, path: str) -> None:
        np.savez(path, **flat)
        fsync_tree(path)

    def load(path: str, _t: Any) -> dict:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}

    def to_numpy(d: dict) -> dict:  # npz stores bfloat16 as raw 2-byte voids
        return {k: v.view(BF16) if v.dtype.kind == "V" else v for k, v in d.items()}

    return System("numpy.savez", prepare=flatten, save=save, load=load, to_numpy=to_numpy,
                  fsync_added=True, version=np.__version__, suffix=".npz")


def orbax_system() -> System:
    import orbax.checkpoint as ocp

    ckptr = ocp.StandardCheckpointer()

    def save(tree: dict, path: str) -> None:
        ckptr.save(path, tree)
        ckptr.wait_until_finished()
        fsync_tree(path)

    from importlib.metadata import version

    return System("orbax Standard", prepare=lambda t: t, save=save,
                  load=lambda path, _t: ckptr.restore(path),
                  to_numpy=lambda d: {k: np.asarray(v) for k, v in flatten(d).items()},
                  fsync_added=True, version=version("orbax-checkpoint"))


def dcp_system() -> System:
    import torch
    import torch.distributed.checkpoint as dcp

    def save(sd: dict, path: str) -> None:
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(sd, checkpoint_id=path, no_dist=True)
        fsync_tree(path)

    def load(path: str, sd: dict) -> dict:
        # DCP restores in place: allocating the destinations is part of a restore.
        out = {k: torch.empty_like(v) for k, v in sd.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(out, checkpoint_id=path, no_dist=True)
        return out

    return System("torch DCP", prepare=_torch_flat, save=save, load=load,
                  to_numpy=_flat_torch_numpy, fsync_added=True, version=torch.__version__)


FACTORIES = [unickpt_system, raw_system, torch_system, safetensors_np_system,
             safetensors_pt_system, savez_system, orbax_system, dcp_system]


def all_systems() -> tuple[list[System], dict[str, str]]:
    """Every system that can be imported here, and why the others are missing."""
    out, missing = [], {}
    for f in FACTORIES:
        try:
            out.append(f())
        except ImportError as e:
            missing[f.__name__.replace("_system", "")] = str(e)
    return out, missing
