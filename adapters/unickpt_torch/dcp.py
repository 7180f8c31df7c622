"""DCP interop: ``torch.distributed.checkpoint`` directories in and out of unickpt.

A DCP checkpoint (what ``dcp.save`` and torchtitan write) is a directory holding a
``.metadata`` file and ``__<rank>_<n>.distcp`` data files.  :func:`import_dcp` turns one into a
unickpt checkpoint; :func:`export_dcp` writes a unickpt checkpoint with DCP's own writer, so
``dcp.load`` restores it at any world size.

**Trust.** DCP's ``.metadata`` is a Python pickle, and DCP stores non-tensor values (learning
rates, ``param_groups``) as pickles too.  unickpt never unpickles anything itself.  It reads
through torch's own loader, with two guards: before torch reads ``.metadata``, the file is
*disassembled* (``pickletools.genops`` parses opcodes and executes nothing) and refused unless
every global it references is one of DCP's metadata classes, a torch dtype/``Size`` or a path
class; non-tensor values are read with ``torch.load(weights_only=True)`` instead of DCP's
default ``weights_only=False``.  Tensor data is read by DCP with ``weights_only=True``.  These
guards narrow what a crafted file can do; they are not an audit of torch's unpickler, so
convert only DCP checkpoints you trust.

**Layout.** A tensor saved in chunks by several ranks (FSDP2) is assembled into one array: the
unickpt checkpoint restores at any world size (each rank memory-maps only its region).  The
import streams: a tensor is read from the DCP files only when unickpt's writer needs its
bytes, so peak memory is about the largest tensors being written (one per writer thread), never
the whole checkpoint.

>>> import tempfile, numpy as np, unickpt
>>> d = tempfile.mkdtemp()
>>> _ = unickpt.save(f"{d}/uni", {"model": {"w": np.arange(3.0, dtype=np.float32)}, "step": 7})
>>> export_dcp(f"{d}/uni", f"{d}/dcp")  # then dcp.load(state_dict, checkpoint_id=f"{d}/dcp")
>>> sorted(os.listdir(f"{d}/dcp"))
['.metadata', '__0_0.distcp']
>>> _ = import_dcp(f"{d}/dcp", f"{d}/back")
>>> back = unickpt.load(f"{d}/back")
>>> back["model"]["w"].tolist(), back["step"]
([0.0, 1.0, 2.0], 7)
"""

from __future__ import annotations

import io
import os
import pickletools
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch

import unickpt
from unickpt.api import save_recorded
from unickpt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    UnsupportedLeafError,
)
from unickpt.tree import LazyArray, ShardedArray, format_path

from .tensors import from_numpy, numpy_dtype, to_numpy

__all__ = ["import_dcp", "export_dcp", "convert", "convert_total_bytes", "is_dcp_dir",
           "read_metadata"]

Progress = Callable[[int], None]
METADATA = ".metadata"

# Globals a DCP .metadata may name: DCP's metadata classes, torch dtypes and Size, the layout
# helper torch pickles TensorProperties with, and the path class of StorageMeta.checkpoint_id.
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "ChunkStorageMetadata", "TensorStorageMetadata", "BytesStorageMetadata",
        "TensorProperties", "StorageMeta", "MetadataIndex", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"LoadItemType", "WriteItemType"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
               "BINSTRING", "STRING"}
_NEUTRAL_OPS = {"MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "FRAME", "PROTO"}
_FORBIDDEN_OPS = {"INST", "OBJ", "EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID"}


def is_dcp_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding a DCP ``.metadata`` file."""
    return os.path.isfile(os.path.join(os.fspath(path), METADATA))


def _allowed(module: str, name: str) -> bool:
    if name in _ALLOWED.get(module, ()):
        return True
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


def vet_metadata(raw: bytes, where: str) -> None:
    """Refuse a ``.metadata`` pickle that names anything but DCP's own metadata classes.

    The stream is disassembled (nothing is executed); the module and name of every global are
    tracked through the memo.  A global whose name cannot be known statically is refused too.
    """
    unknown = object()
    memo: dict[int, Any] = {}
    recent: list[Any] = [unknown, unknown]  # the last two values pushed (str or unknown)
    try:
        for op, arg, _pos in pickletools.genops(raw):
            name = op.name
            if name in _FORBIDDEN_OPS:
                raise CorruptCheckpointError(f"{where}: the DCP metadata uses the pickle "
                                             f"opcode {name}, which DCP never writes; refusing "
                                             "to read it (it could run code)")
            if name in _STRING_OPS:
                recent.append(arg)
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                recent.append(memo.get(int(arg), unknown))
            elif name == "MEMOIZE":
                memo[len(memo)] = recent[-1]
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = recent[-1]
            elif name in ("STACK_GLOBAL", "GLOBAL"):
                module, attr = (recent[-2], recent[-1]) if name == "STACK_GLOBAL" else \
                    tuple(str(arg).split(" ", 1))
                if not (isinstance(module, str) and isinstance(attr, str)
                        and _allowed(module, attr)):
                    shown = f"{module}.{attr}" if isinstance(module, str) and \
                        isinstance(attr, str) else "a name computed at load time"
                    raise CorruptCheckpointError(
                        f"{where}: the DCP metadata references {shown}, which is not one of "
                        "DCP's metadata classes; refusing to read it (a crafted .metadata can "
                        "run code when unpickled). Convert only checkpoints you trust")
                recent.append(unknown)
            elif name not in _NEUTRAL_OPS:
                recent.append(unknown)
            del recent[:-2]
    except CorruptCheckpointError:
        raise
    except ValueError as e:  # pickletools: truncated or malformed stream
        raise CorruptCheckpointError(f"{where}: the DCP metadata is not a valid pickle stream "
                                     f"({e}); the checkpoint is damaged or not DCP") from None


def _reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader

    class _VettedReader(FileSystemReader):  # type: ignore[misc]  # torch has no stubs here
        """DCP's file reader, with the metadata vetted before torch unpickles it, once."""

        _metadata: Any = None

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("rank") is not None:
                raise ConfigError(f"{self.path}: per-rank DCP metadata is not supported")
            if self._metadata is None:
                where = os.path.join(os.fspath(self.path), METADATA)
                with open(where, "rb") as f:
                    vet_metadata(f.read(), where)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self._metadata = super().read_metadata(*args, **kwargs)
            return self._metadata

    return _VettedReader


def _planner() -> Any:
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class _WeightsOnlyPlanner(DefaultLoadPlanner):  # type: ignore[misc]
        """DCP's default load planner, reading non-tensor values with ``weights_only=True``."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)

    return _WeightsOnlyPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)


def _open(src: str | os.PathLike) -> tuple[str, Any, Any]:
    path = os.path.abspath(os.fspath(src))
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(f"{path}: no DCP checkpoint directory there")
    if not is_dcp_dir(path):
        raise CheckpointNotFoundError(
            f"{path} is not a torch.distributed.checkpoint (DCP) directory: it has no "
            f"{METADATA} file; pass the directory dcp.save wrote (checkpoint_id)")
    reader = _reader_class()(path)
    try:
        meta = reader.read_metadata()
    except (EOFError, AttributeError, ImportError, TypeError) as e:
        raise CorruptCheckpointError(f"{path}/{METADATA}: torch could not read the DCP "
                                     f"metadata ({type(e).__name__}: {e})") from None
    return path, reader, meta


def read_metadata(src: str | os.PathLike) -> Any:
    """The vetted ``Metadata`` of the DCP checkpoint ``src`` (see the module's trust note)."""
    return _open(src)[2]


def _cause(e: BaseException) -> BaseException:
    """The first rank's exception inside DCP's CheckpointException (itself a BaseException)."""
    for exc, _tb in getattr(e, "failures", {}).values():
        return exc if isinstance(exc, BaseException) else e
    return e


def _load(reader: Any, sd: dict) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(sd, storage_reader=reader, planner=_planner(), no_dist=True)
    except (CheckpointException, Exception) as e:
        cause = _cause(e)
        first = (str(cause).strip().splitlines() or [""])[0][:300]
        keys = ", ".join(list(sd)[:5]) + (" ..." if len(sd) > 5 else "")
        raise CorruptCheckpointError(
            f"{reader.path}: DCP could not read {keys}: {type(cause).__name__}: {first} (a "
            "damaged or truncated .distcp file, or a value torch.load(weights_only=True) "
            "refuses)") from None


def _lazy(reader: Any, key: str, tmeta: Any, progress: Progress | None) -> LazyArray:
    shape = tuple(int(n) for n in tmeta.size)
    dtype = tmeta.properties.dtype

    def fetch() -> np.ndarray:
        t = torch.empty(shape, dtype=dtype)
        _load(reader, {key: t})
        a = to_numpy(t)
        if progress is not None:
            progress(int(a.nbytes))
        return a

    return LazyArray(shape, numpy_dtype(dtype), fetch)


def _plain(x: Any, key: str) -> Any:
    """A non-tensor DCP value as a state-tree value (tuples become lists)."""
    if isinstance(x, (tuple, list)):
        return [_plain(v, key) for v in x]
    if isinstance(x, dict):
        return {str(k): _plain(v, key) for k, v in x.items()}
    if isinstance(x, torch.Tensor):
        return to_numpy(x.detach().cpu().clone())
    if x is None or isinstance(x, (bool, int, float, str, bytes)):
        return x
    raise UnsupportedLeafError(f"cannot import DCP entry {key!r}: a {type(x).__name__} "
                               "value has no state-tree form")


def _nest(flat: dict[tuple, Any]) -> Any:
    root: dict = {}
    for path, value in flat.items():
        node = root
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return _lists(root)


def _lists(x: Any) -> Any:
    """Dicts keyed 0..n-1 by ints (DCP's flattened lists) back into lists."""
    if not isinstance(x, dict):
        return x
    out = {k: _lists(v) for k, v in x.items()}
    if out and all(isinstance(k, int) for k in out) and sorted(out) == list(range(len(out))):
        return [out[i] for i in range(len(out))]
    return {str(k): v for k, v in out.items()}


def import_dcp(src: str | os.PathLike, dst: str | os.PathLike, *,
               progress: Progress | None = None, overwrite: bool = False) -> unickpt.SaveInfo:
    """Convert the DCP checkpoint directory ``src`` into a unickpt checkpoint at ``dst``.

    The tree is the nested state dict ``dcp.save`` was given (``{"model": ..., "optim": ...}``
    for torchtitan), rebuilt from DCP's flattened keys; tensors saved in shards are assembled;
    tuples become lists.  ``progress`` gets each tensor's byte count as it is read.
    """
    path, reader, meta = _open(src)
    mapping = getattr(meta, "planner_data", None) or {}
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    flat: dict[tuple, Any] = {}
    values: dict[str, Any] = {}
    for key, item in meta.state_dict_metadata.items():
        obj_path = tuple(mapping.get(key, (key,)))
        if isinstance(item, BytesStorageMetadata):
            values[key] = None
            flat[obj_path] = key
        else:
            flat[obj_path] = _lazy(reader, key, item, progress)
    if values:
        _load(reader, values)  # small values, all at once
        flat = {p: _plain(values[v], v) if isinstance(v, str) else v for p, v in flat.items()}
    return save_recorded(dst, _nest(flat), overwrite=overwrite,
                         info={"converted_from": "dcp", "source": path})


def _to_dcp(x: Any, path: tuple, progress: Progress | None) -> Any:
    if isinstance(x, dict):
        return {str(k): _to_dcp(v, (*path, k), progress) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_dcp(v, (*path, i), progress) for i, v in enumerate(x)]
    if isinstance(x, ShardedArray):
        x = x.assemble()
    if isinstance(x, (np.ndarray, np.generic)):
        if np.asarray(x).dtype.kind in "OUSV":
            raise UnsupportedLeafError(f"cannot export {format_path(path)}: a "
                                       f"{np.asarray(x).dtype} array has no torch dtype")
        try:
            return from_numpy(x)  # a view of the memory-mapped checkpoint: no copy here
        except TypeError as e:
            raise UnsupportedLeafError(f"cannot export {format_path(path)}: {e}") from None
    return x  # Python scalars, str, bytes, None: DCP stores them as values


@contextmanager
def _staged(dst: str, overwrite: bool) -> Iterator[str]:
    """A sibling staging directory renamed to ``dst`` only once DCP has finished writing."""
    if os.path.lexists(dst) and not overwrite:
        raise CheckpointExistsError(f"{dst} already exists; pass overwrite=True (--overwrite) "
                                    "to replace it")
    if os.path.exists(dst) and not is_dcp_dir(dst):
        raise CheckpointExistsError(f"{dst} exists and is not a DCP checkpoint; refusing to "
                                    "replace it")
    tmp = f"{dst}.unickpt-tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        if os.path.exists(dst):
            shutil.rmtree(dst)
        os.rename(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_dcp(src: str | os.PathLike, dst: str | os.PathLike, *,
               progress: Progress | None = None, overwrite: bool = False) -> None:
    """Write the unickpt checkpoint ``src`` as a DCP checkpoint directory ``dst``.

    ``dcp.save`` (DCP's own writer) writes it, in this one process; ``dcp.load`` then reads it
    at any world size, into DTensors (FSDP2) or plain tensors.  Arrays are handed to DCP as
    views of the memory-mapped checkpoint; sharded leaves are assembled.  The directory appears
    at ``dst`` only once complete.
    """
    import torch.distributed.checkpoint as dcp

    tree = unickpt.load(src, mmap=True)
    sd = _to_dcp(tree, (), progress)
    final = os.path.abspath(os.fspath(dst))
    from torch.distributed.checkpoint.api import CheckpointException

    with _staged(final, overwrite) as tmp:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp.save(sd, storage_writer=dcp.FileSystemWriter(tmp), no_dist=True)
        except CheckpointException as e:  # a BaseException: hand on the real cause
            raise _cause(e) from None
    if progress is not None:
        progress(unickpt.inspect(src).total_bytes)


def convert_total_bytes(src: str | os.PathLike, *, to: Literal["unickpt", "dcp"]) -> int:
    """Array bytes :func:`convert` reports through ``progress`` (for a progress bar)."""
    if to == "dcp":
        return unickpt.inspect(src).total_bytes
    if to != "unickpt":
        raise ConfigError(f"convert_total_bytes(to={to!r}): expected 'unickpt' or 'dcp'")
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = read_metadata(src)
    return sum(int(np.prod(list(m.size))) * m.properties.dtype.itemsize
               for m in meta.state_dict_metadata.values()
               if isinstance(m, TensorStorageMetadata))


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, to: Literal["unickpt", "dcp"],
            progress: Progress | None = None, overwrite: bool = False) -> None:
    """Convert between DCP and unickpt (what ``unickpt convert --to unickpt|dcp`` runs)."""
    if to == "unickpt":
        import_dcp(src, dst, progress=progress, overwrite=overwrite)
    elif to == "dcp":
        export_dcp(src, dst, progress=progress, overwrite=overwrite)
    else:
        raise ConfigError(f"convert(to={to!r}): expected 'unickpt' or 'dcp'")
