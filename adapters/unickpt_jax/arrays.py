"""jax.Array <-> neutral array leaves, with shardings and typed PRNG keys.

Saving:

* an array on one device, or fully replicated, becomes one array leaf (a
  :class:`~unickpt.tree.LazyArray` whose host copy is made when the writer needs it; a host
  copy right away for snapshots);
* an array split over devices becomes a :class:`~unickpt.tree.ShardedArray` with one piece
  per *unique* shard (replicas, ``replica_id != 0``, are skipped);
* a typed PRNG key array (``jax.random.key``) becomes ``{"impl": name, "key_data": uint32}``;
* an array that spans several processes (not fully addressable, a ``jax.distributed`` job)
  becomes, during a multi-process save, a ShardedArray holding only *this process's* unique
  shards (``replica_id == 0``) with their global offsets: the save protocol writes each piece
  from the process that holds it (docs/distributed.md).  Anywhere else it is refused.

Restoring builds each array with the sharding of the target (a ``jax.Array`` or a
``jax.ShapeDtypeStruct`` with ``.sharding``), reading only the region each device needs, so a
checkpoint saved on one mesh restores onto another without a full host gather.

>>> import jax.numpy as jnp
>>> import numpy as np
>>> from unickpt.state import to_tree, restore_tree
>>> tree, _ = to_tree({"w": jnp.arange(3.0)})
>>> out = restore_tree({"w": jnp.zeros(3)}, {"w": np.array([1.0, 2.0, 3.0], np.float32)})
>>> out["w"].tolist()
[1.0, 2.0, 3.0]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from unickpt.dist.save import in_collective_save
from unickpt.errors import UnsupportedLeafError
from unickpt.tree import LazyArray, Path, Piece, ShardedArray, format_path

KEY_FIELDS = ("impl", "key_data")


def is_key_dtype(dtype: Any) -> bool:
    """True for the dtype of a typed PRNG key array (``key<fry>``)."""
    try:
        return bool(jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key))
    except TypeError:
        return False


def key_impl_name(x: Any) -> str:
    """The PRNG implementation name (``"threefry2x32"``, ``"rbg"``...) of a key array/struct."""
    try:
        return str(jax.random.key_impl(x))
    except (TypeError, ValueError):
        # ShapeDtypeStruct targets: the dtype carries the implementation.
        return str(x.dtype._impl.name)  # noqa: SLF001 - no public accessor on the dtype


# ------------------------------------------------------------------------------- saving
def _host_copy(a: jax.Array) -> np.ndarray:
    # np.array(copy=True): on CPU np.asarray may alias the device buffer, which a later
    # donation could free; a snapshot must not depend on it.
    return np.array(a, copy=True)


def _norm_index(index: tuple, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    out = []
    for s, n in zip(index, shape):
        start, stop, step = s.indices(n)
        if step != 1:  # pragma: no cover - jax shardings are contiguous
            raise UnsupportedLeafError(f"strided shard index {index}")
        out.append((start, stop))
    return tuple(out)


def array_to_tree(a: jax.Array, snapshot: bool, path: Path) -> Any:
    """One ``jax.Array`` (not a key array) as a neutral leaf."""
    if a.is_deleted():
        raise UnsupportedLeafError(
            f"cannot save {format_path(path)}: the jax.Array has been deleted (donated to a "
            "jitted function, or .delete() was called); save the array that replaced it")
    shape = tuple(int(n) for n in a.shape)
    dtype = np.dtype(a.dtype)
    sharding = a.sharding
    if len(sharding.device_set) <= 1 or sharding.is_fully_replicated:
        # One copy holds everything: store it as a plain array (replicas once).
        src = a if len(sharding.device_set) <= 1 else a.addressable_shards[0].data
        if snapshot:
            return _host_copy(src)
        return LazyArray(shape, dtype, lambda src=src: np.asarray(src))
    if not a.is_fully_addressable and not in_collective_save():
        raise UnsupportedLeafError(_not_addressable(path))
    # replica_id is global: of the copies of one region held anywhere in the job, exactly
    # one has replica_id 0, so every region is written once, by the process holding it.
    pieces = []
    for sh in a.addressable_shards:
        if sh.replica_id != 0:
            continue  # replicas are stored once
        idx = _norm_index(sh.index, shape)
        pshape = tuple(b - s for s, b in idx)
        data: Any = (_host_copy(sh.data) if snapshot else
                     LazyArray(pshape, dtype, lambda d=sh.data: np.asarray(d)))
        pieces.append(Piece(idx, data))
    pieces.sort(key=lambda p: p.index)
    return ShardedArray(shape, dtype, pieces)


def _not_addressable(path: Path) -> str:
    return (f"cannot save {format_path(path)}: the array spans several processes "
            "(not fully addressable) and this save is not collective; save it with a "
            "CheckpointManager called by every process of the jax.distributed job (it "
            "writes each process's shards), or gather it first "
            "(jax.experimental.multihost_utils.process_allgather)")


def key_to_tree(k: jax.Array, snapshot: bool, path: Path) -> dict:
    """A typed PRNG key array as ``{"impl": name, "key_data": uint32 array}``."""
    return {"impl": key_impl_name(k),
            "key_data": array_to_tree(jax.random.key_data(k), snapshot, (*path, "key_data"))}


def value_to_tree(a: jax.Array, snapshot: bool, path: Path) -> Any:
    """Any ``jax.Array`` (typed key arrays included) as a neutral tree."""
    if is_key_dtype(a.dtype):
        return key_to_tree(a, snapshot, path)
    return array_to_tree(a, snapshot, path)


# ------------------------------------------------------------------------------ restoring
def _describe(x: Any) -> str:
    if isinstance(x, (np.ndarray, ShardedArray, LazyArray)):
        return f"an array {x.dtype}{list(x.shape)}"
    if isinstance(x, np.generic):
        return f"a numpy {x.dtype} scalar"
    if isinstance(x, dict) and set(x) == set(KEY_FIELDS):
        return f"a typed PRNG key ({x['impl']})"
    if x is None:
        return "None"
    return f"a {type(x).__name__}"


def _x64() -> bool:
    return bool(jax.config.jax_enable_x64)


def _convertible(src: np.dtype, dst: np.dtype) -> bool:
    """Whether ``src`` may be restored into ``dst`` (values are checked separately).

    Besides equal dtypes, only the 64 <-> 32 bit moves that ``jax_enable_x64`` itself causes
    are accepted (same kind: int, uint or float): a checkpoint written with x64 on restores
    into a 32-bit target if every value fits exactly, one written with x64 off into a 64-bit
    target.
    """
    if src == dst:
        return True
    return src.kind == dst.kind and src.kind in "iuf" and {src.itemsize, dst.itemsize} == {4, 8}


def _exact_cast(a: np.ndarray, dst: np.dtype) -> np.ndarray | None:
    """``a`` cast to ``dst`` if every value survives exactly, else None."""
    with np.errstate(all="ignore"):
        b = a.astype(dst)
        back = b.astype(a.dtype)
    if a.dtype.kind == "f":
        ok = np.array_equal(back.view(f"u{a.dtype.itemsize}"), a.view(f"u{a.dtype.itemsize}"))
    else:
        ok = np.array_equal(back, a)
    return b if ok else None


def _source(tree: Any) -> tuple[tuple[int, ...], np.dtype, Callable[[tuple], np.ndarray]] | None:
    if isinstance(tree, ShardedArray):
        return tuple(tree.shape), np.dtype(tree.dtype), tree.read
    if isinstance(tree, (np.ndarray, np.generic, LazyArray)):
        arr = tree.materialize() if isinstance(tree, LazyArray) else np.asarray(tree)
        return arr.shape, arr.dtype, lambda idx: np.array(arr[idx], copy=True)
    return None


def plan_array(target: Any, tree: Any, ctx: Any, path: Path) -> Callable[[], Any]:
    """Plan restoring an array ``tree`` into a ``jax.Array``/``ShapeDtypeStruct`` target."""
    if is_key_dtype(target.dtype):
        return plan_key(target, tree, ctx, path)
    if isinstance(tree, (bool, int, float)) and tuple(target.shape) == ():
        # A Python scalar (e.g. a step saved as an int) into a 0-d array: exact or refused.
        scalar = np.asarray(tree)
        cast = _exact_cast(scalar, np.dtype(target.dtype)) if scalar.dtype != object else None
        if cast is None:
            ctx.mismatch(path, f"checkpoint value {tree!r} does not fit the target's "
                               f"{np.dtype(target.dtype)} exactly")
            return lambda: target
        tree = cast
    src = _source(tree)
    if src is None:
        ctx.mismatch(path, f"target is an array {target.dtype}{list(target.shape)}, "
                           f"checkpoint has {_describe(tree)}")
        return lambda: target
    shape, sdtype, read = src
    tdtype = np.dtype(target.dtype)
    tshape = tuple(int(n) for n in target.shape)
    if shape != tshape:
        ctx.mismatch(path, f"target {tdtype}{list(tshape)}, checkpoint {sdtype}{list(shape)}")
        return lambda: target
    if not _convertible(sdtype, tdtype):
        ctx.mismatch(path, f"target {tdtype}{list(tshape)}, checkpoint {sdtype}{list(shape)}")
        return lambda: target
    if sdtype != tdtype:
        full = read(tuple(slice(0, n) for n in shape))
        cast = _exact_cast(full, tdtype)
        if cast is None:
            hint = ("; enable 64-bit mode (JAX_ENABLE_X64=1 or "
                    "jax.config.update('jax_enable_x64', True)) before restoring"
                    if tdtype.itemsize < sdtype.itemsize and not _x64() else "")
            ctx.mismatch(path, f"checkpoint {sdtype} values do not fit the target's "
                               f"{tdtype} exactly{hint}")
            return lambda: target
        src = _source(cast)
        assert src is not None
        read = src[2]
    sharding = getattr(target, "sharding", None)
    if isinstance(target, jax.Array) and not target.committed:
        # An uncommitted target (e.g. made by jnp.zeros) gets an uncommitted array, so jit may
        # still move it next to committed (sharded) arguments as it could before the restore.
        sharding = None
    return lambda: build_array(tshape, tdtype, sharding, read)


def build_array(shape: tuple[int, ...], dtype: np.dtype, sharding: Any,
                read: Callable[[tuple], np.ndarray]) -> jax.Array:
    """Make a jax.Array of ``sharding`` reading only each device's region via ``read``.

    Devices holding the same region (replicas) share one host read; host memory in flight is
    one region at a time, never the whole global array (unless one device holds it all).
    """
    if sharding is None:  # the default device, uncommitted
        return jax.device_put(read(tuple(slice(0, n) for n in shape)))
    index_map = sharding.addressable_devices_indices_map(shape)
    groups: dict[tuple, list] = {}
    for dev, idx in index_map.items():
        groups.setdefault(_norm_index(idx, shape), []).append(dev)
    per_device: dict[Any, jax.Array] = {}
    for idx, devs in groups.items():
        region = read(tuple(slice(a, b) for a, b in idx))
        for d in devs:
            per_device[d] = jax.device_put(region, d)
        # Transfers are asynchronous and keep ``region`` alive until done: wait, so that
        # only one region is in host memory at a time.
        jax.block_until_ready([per_device[d] for d in devs])
        del region
    arrays = [per_device[d] for d in index_map]
    if len(arrays) == 1 and len(sharding.device_set) == 1:
        return jax.device_put(arrays[0], sharding)
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def plan_key(target: Any, tree: Any, ctx: Any, path: Path) -> Callable[[], Any]:
    """Plan restoring a ``{"impl", "key_data"}`` tree into a typed key array target."""
    impl = key_impl_name(target)
    if not (isinstance(tree, dict) and set(tree) == set(KEY_FIELDS)):
        hint = (" (a raw uint32 key was saved: wrap it with jax.random.wrap_key_data, or "
                "restore into a uint32 target)" if isinstance(tree, (np.ndarray, ShardedArray))
                and np.dtype(tree.dtype) == np.uint32 else "")
        ctx.mismatch(path, f"target is a typed PRNG key ({impl}), checkpoint has "
                           f"{_describe(tree)}{hint}")
        return lambda: target
    if tree["impl"] != impl:
        ctx.mismatch(path, f"PRNG implementation {tree['impl']!r} in checkpoint, {impl!r} in "
                           "target; set jax_default_prng_impl (or build the key with impl=) to "
                           "match the checkpoint")
        return lambda: target
    if isinstance(target, jax.Array):
        data_target: Any = jax.random.key_data(target)
    else:
        data_target = jax.eval_shape(jax.random.key_data, target)
        sh = getattr(target, "sharding", None)
        if sh is not None:  # key_data adds a trailing dim; a mesh sharding still applies
            data_target = jax.ShapeDtypeStruct(data_target.shape, data_target.dtype,
                                               sharding=sh)
    inner = plan_array(data_target, tree["key_data"], ctx, (*path, "key_data"))
    return lambda: jax.random.wrap_key_data(inner(), impl=impl)
