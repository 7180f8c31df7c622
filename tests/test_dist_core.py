"""The coordinator protocol and the multi-process save/restore, with ranks as threads.

No framework: the ranks share one process and talk through tests/_thread_coord.py, so these
run in a second and exercise every branch of the protocol (the torch job tests are in
test_dist_torch.py).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from _thread_coord import run_ranks
from hypothesis import given, settings
from hypothesis import strategies as st

import unickpt
from unickpt.dist import CoordinationError, Coordinator, SingleProcess, detect
from unickpt.dist.plan import assign, per_rank_paths
from unickpt.errors import ConfigError, IncompatibleCheckpointError, UnickptError
from unickpt.format.reader import CheckpointReader
from unickpt.storage import LocalStorage
from unickpt.tree import Piece, ShardedArray


class Counter:
    """A per-rank Stateful object (a data position, say)."""

    def __init__(self, n: int = 0):
        self.n = n

    def state_dict(self) -> dict:
        return {"n": self.n, "seen": np.full(3, self.n, np.int64)}

    def load_state_dict(self, s: dict) -> None:
        self.n = int(s["n"])


GLOBAL = np.arange(60, dtype=np.float32).reshape(10, 6)


def shard(rank: int, world: int) -> ShardedArray:
    """Rank ``rank``'s rows of GLOBAL (uneven split, like FSDP2's Shard(0))."""
    bounds = np.array_split(np.arange(10), world)[rank]
    lo, hi = (int(bounds[0]), int(bounds[-1]) + 1) if len(bounds) else (10, 10)
    return ShardedArray((10, 6), GLOBAL.dtype, [Piece(((lo, hi), (0, 6)), GLOBAL[lo:hi])])


def target(rank: int) -> dict:
    """A restore target: sharded arrays come back into plain arrays (any world size)."""
    return {"w": np.zeros((4, 3)), "b": np.zeros(7, np.int16), "big": np.zeros(1000, np.float32),
            "sharded": np.zeros((10, 6), np.float32), "repl": np.zeros(2, np.int64),
            "pos": Counter(rank), "step": 0}


def state(rank: int, world: int, step: int = 0) -> dict:
    return {"w": np.full((4, 3), 1.5, np.float64), "b": np.arange(7, dtype=np.int16),
            "big": np.ones(1000, np.float32) * step, "sharded": shard(rank, world),
            "repl": ShardedArray((2,), np.dtype("int64"), [Piece(((0, 2),), np.array([5, 6]))]),
            "pos": Counter(rank + 10 * step), "step": step}


def test_single_process_is_the_default_and_round_trips_plain_data():
    c = detect()
    assert isinstance(c, SingleProcess) and isinstance(c, Coordinator)
    assert c.all_gather("x", {"a": [1, b"2", None]}) == [{"a": [1, b"2", None]}]
    with pytest.raises(TypeError, match="phase-x: a coordinator message must be plain"):
        c.broadcast("phase-x", object())
    with pytest.raises(ConfigError, match="does not implement unickpt.dist.Coordinator"):
        detect(coordinator=object())


def test_coordination_error_is_a_timeout_error():
    e = CoordinationError("m", phase="save step_1: plan", missing=[2, 1])
    assert isinstance(e, UnickptError) and isinstance(e, TimeoutError)
    assert e.missing == [1, 2] and e.phase == "save step_1: plan"


def test_a_transport_failure_inside_a_collective_becomes_a_coordination_error():
    from unickpt.dist.coordinator import failures_as

    with pytest.raises(CoordinationError) as got:
        with failures_as("save step_4: gather", "rank 1 of 2"):
            raise RuntimeError("Connection reset by peer\nat gloo/transport/tcp/pair.cc")
    assert str(got.value) == ("unickpt: save step_4: gather: rank 1 of 2: "
                              "Connection reset by peer")
    assert got.value.phase == "save step_4: gather"
    assert isinstance(got.value.__cause__, RuntimeError)
    # An error that is already typed passes through untouched, and so does anything that is
    # not a transport failure (a bug in the caller must not read as a dead peer).
    mine = CoordinationError("m", phase="p", missing=[1])
    with pytest.raises(CoordinationError) as again:
        with failures_as("x", "y"):
            raise mine
    assert again.value is mine
    with pytest.raises(ValueError, match="not a transport"):
        with failures_as("x", "y"):
            raise ValueError("not a transport failure")


def test_per_rank_paths_outermost_only():
    kinds = {("a",): "unickpt.RNG", ("a", "x"): "torch:torch.Generator",
             ("m",): "torch:torch.nn.Module", ("d", 0): "stateful:x.Loader",
             ("g",): "get_state:grain.It", ("s",): "torch:torch.optim.lr_scheduler.LRScheduler"}
    assert per_rank_paths(kinds) == [("a",), ("d", 0), ("g",)]


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text("abc", min_size=1, max_size=3), st.integers(0, 1000), max_size=12),
       st.integers(1, 5), st.data())
def test_assign_writes_each_array_once_by_an_allowed_rank_balanced(sizes, world, data):
    holders = {k: data.draw(st.lists(st.integers(0, world - 1), min_size=1, unique=True))
               for k in sizes if data.draw(st.booleans())}
    loads = [0] * world
    owner = assign(sizes, loads, holders)
    assert set(owner) == set(sizes)
    assert all(owner[k] in holders[k] for k in holders)
    assert assign(sizes, [0] * world, holders) == owner  # deterministic: every rank agrees
    assert loads == [sum(sizes[k] for k in owner if owner[k] == r) for r in range(world)]
    if not holders and sizes:  # unrestricted greedy: loads differ by at most the largest item
        assert max(loads) - min(loads) <= max(sizes.values())


def save_job(root: str, world: int, step: int, *, storage=None, **mgr_kw) -> list:
    def body(coord):
        mgr = unickpt.CheckpointManager(root, coordinator=coord, storage=storage, **mgr_kw)
        r = mgr.restore(target(coord.rank))
        s = state(coord.rank, world, step)
        try:
            mgr.save(step, s, force=True)
        finally:
            mgr.close()
        return r.step

    return run_ranks(world, body)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_save_by_every_rank_commits_one_checkpoint(tmp_path, world):
    root = str(tmp_path / "run")
    assert save_job(root, world, 5) == [0] * world
    path = os.path.join(root, "step_5")
    with CheckpointReader(path) as r:
        files = [f.name for f in r.manifest.files]
        arrays = r.manifest.arrays
    if world > 1:
        assert files == [f"arrays-r{i}.safetensors" for i in range(world)]
        # replicated arrays once each; the big one's rank writes little else (balance)
        assert [a.name for a in arrays].count("big") == 1
        assert [a.name for a in arrays].count("repl/<piece 0>") == 1
    tree = unickpt.load(path)
    np.testing.assert_array_equal(tree["sharded"], GLOBAL)
    np.testing.assert_array_equal(tree["repl"], [5, 6])
    if world > 1:
        assert [p["n"] for p in tree["pos"]] == [r + 50 for r in range(world)]

    # same world size: each rank gets its own per-rank state and its shard
    def restore(coord):
        with unickpt.CheckpointManager(root, coordinator=coord) as mgr:
            r = mgr.restore(target(coord.rank))
        return r.step, r.state["pos"].n, np.asarray(r.state["big"]).sum()

    assert run_ranks(world, restore) == [(5, r + 50, 5000.0) for r in range(world)]


def test_other_world_size_refuses_per_rank_state_unless_kept(tmp_path):
    root = str(tmp_path / "run")
    save_job(root, 2, 3)

    def restore(coord, **kw):
        with unickpt.CheckpointManager(root, coordinator=coord) as mgr:
            r = mgr.restore(target(coord.rank), **kw)
        return r.state["pos"].n, np.asarray(r.state["sharded"]).tolist()

    out = run_ranks(3, restore)
    assert all(isinstance(e, IncompatibleCheckpointError) for e in out), out
    assert "written by 2 processes and is restored by 3" in str(out[0])
    assert "pos: per-rank state of 2 ranks, restoring at 3" in str(out[0])
    out = run_ranks(3, lambda c: restore(c, per_rank="keep"))
    assert [n for n, _ in out] == [0, 1, 2]  # kept as the target had them
    assert all(sh == GLOBAL.tolist() for _, sh in out)  # plain array target: all of it


def test_a_failing_rank_means_nothing_committed_and_every_rank_raises(tmp_path):
    root = str(tmp_path / "run")
    save_job(root, 2, 1)

    class Broken(LocalStorage):
        def create(self, path, size=0):
            if path.endswith("arrays-r1.safetensors"):
                raise OSError(28, "No space left on device")
            return super().create(path, size)

    out = save_job(root, 2, 2, storage=Broken())
    assert all(isinstance(e, CoordinationError) for e in out), out
    assert "save step_2: nothing was committed: rank 1: OSError" in str(out[0])
    assert "No space left on device" in str(out[1])
    names = sorted(os.listdir(root))
    assert "step_2" not in names and not [n for n in names if n.startswith(".unickpt-tmp")]
    assert save_job(root, 2, 3) == [1, 1]  # the previous checkpoint resumes


def test_a_rank_that_does_not_arrive_is_named(tmp_path):
    root = str(tmp_path / "run")

    def body(coord):
        mgr = unickpt.CheckpointManager(root, coordinator=coord)
        mgr.resolve_start()
        if coord.rank == 1:
            return "gone"  # never calls save
        coord.timeout = 0.5
        try:
            mgr.save(1, state(0, 2), force=True)
        finally:
            mgr.close()

    out = run_ranks(2, body)
    assert out[1] == "gone" and isinstance(out[0], CoordinationError)
    assert out[0].missing == [1] and out[0].phase == "save step_1: plan"
    assert not [n for n in os.listdir(root) if n.startswith((".unickpt-tmp", "step_"))]


def test_ranks_that_do_not_share_the_filesystem_get_a_clear_error(tmp_path):
    root = str(tmp_path / "run")

    class NodeLocal(LocalStorage):
        """What rank 1 sees when the root is on a node-local disk: not rank 0's files."""

        def is_dir(self, path):
            return False if ".unickpt-tmp" in path else super().is_dir(path)

    def body(coord):
        storage = NodeLocal() if coord.rank == 1 else None
        with unickpt.CheckpointManager(root, coordinator=coord, storage=storage) as mgr:
            mgr.save(1, state(coord.rank, 2), force=True)

    out = run_ranks(2, body)
    assert all(isinstance(e, CoordinationError) for e in out), out
    assert "rank 1 does not see the staging directory" in str(out[0])
    assert "shared by every rank (not a node-local path" in str(out[0])


def test_start_decision_is_rank_zeros(tmp_path):
    root = str(tmp_path / "run")
    save_job(root, 2, 4)

    def body(coord):
        with unickpt.CheckpointManager(root, coordinator=coord, resume="never",
                                       on_existing="archive") as mgr:
            d = mgr.resolve_start()
        return d.resume, d.step, d.archived

    assert run_ranks(2, body) == [(False, 0, ("step_4",))] * 2
    assert sorted(os.listdir(os.path.join(root, "run_1"))) == ["step_4"]


def test_structure_mismatch_between_ranks_is_refused(tmp_path):
    root = str(tmp_path / "run")

    def body(coord):
        s = state(coord.rank, 2)
        if coord.rank == 1:
            s["w"] = np.zeros(3)
        with unickpt.CheckpointManager(root, coordinator=coord) as mgr:
            mgr.save(1, s, force=True)

    out = run_ranks(2, body)
    assert all(isinstance(e, CoordinationError) for e in out), out
    assert "rank(s) 1 hold a state whose replicated arrays" in str(out[1])


def test_a_rank_with_an_unsavable_leaf_stops_every_rank_at_once(tmp_path):
    root = str(tmp_path / "run")

    def body(coord):
        s = state(coord.rank, 2)
        if coord.rank == 1:
            s["bad"] = object()
        coord.timeout = 30  # the failure must be reported, not waited out
        with unickpt.CheckpointManager(root, coordinator=coord) as mgr:
            mgr.save(1, s, force=True)

    out = run_ranks(2, body)
    assert type(out[1]).__name__ == "UnsupportedLeafError"
    assert isinstance(out[0], CoordinationError)
    assert "rank 1: UnsupportedLeafError: cannot save bad" in str(out[0])
    assert not [n for n in os.listdir(root) if n.startswith((".unickpt-tmp", "step_"))]


def test_async_saves_run_the_protocol_in_the_background(tmp_path):
    root = str(tmp_path / "run")

    def body(coord):
        with unickpt.CheckpointManager(root, coordinator=coord, async_save=True,
                                       keep_last=2) as mgr:
            mgr.restore(target(coord.rank))
            for step in (1, 2, 3):
                assert mgr.save(step, state(coord.rank, 2, step), force=True)
        return [c.step for c in mgr.checkpoints()]

    assert run_ranks(2, body) == [[2, 3], [2, 3]]
    tree = unickpt.load(os.path.join(root, "step_3"))
    assert [p["n"] for p in tree["pos"]] == [30, 31]
    np.testing.assert_array_equal(tree["big"], np.full(1000, 3, np.float32))


def test_a_restore_reads_only_the_pieces_its_region_overlaps(tmp_path):
    from unickpt.dist.restore import read_tree

    root = str(tmp_path / "run")
    save_job(root, 4, 1)  # GLOBAL's rows split 3/3/2/2 over four ranks
    with CheckpointReader(os.path.join(root, "step_1")) as r:
        reads: list[int] = []
        real = r.read_array

        def counting(i, **kw):
            reads.append(i)
            return real(i, **kw)

        r.read_array = counting
        tree = read_tree(r, verify=True)
        piece_arrays = {a for _, a in r.manifest.sharded[0].pieces}
        reads.clear()
        region = tree["sharded"].read((slice(3, 5), slice(0, 6)))  # rows of the 2nd piece only
        np.testing.assert_array_equal(region, GLOBAL[3:5])
        assert len(reads) == 1 and set(reads) <= piece_arrays
        reads.clear()
        np.testing.assert_array_equal(tree["sharded"].read((slice(2, 7), slice(0, 6))),
                                      GLOBAL[2:7])
        assert len(reads) == 3  # three of the four pieces overlap rows 2..6


class _Dead(BaseException):
    """A rank vanishing (as if SIGKILLed): it stops taking part in anything."""


@settings(max_examples=10, deadline=None)
@given(phase=st.sampled_from(["plan", "report", "commit"]),
       dead=st.sets(st.integers(0, 2), min_size=1, max_size=2))
def test_ranks_dying_at_any_phase_leave_a_complete_checkpoint_or_none(tmp_path_factory, phase,
                                                                       dead):
    root = str(tmp_path_factory.mktemp("kill") / "run")
    save_job(root, 3, 1)

    def body(coord):
        mgr = unickpt.CheckpointManager(root, coordinator=coord)
        mgr.restore(target(coord.rank))
        coord.timeout = 0.5
        if coord.rank in dead:
            real = coord.all_gather if phase != "commit" else coord.broadcast

            def dying(ph, *a, **k):
                if ph == f"save step_2: {phase}":
                    mgr.run_root.release()  # a dead process holds no lock
                    raise _Dead()
                return real(ph, *a, **k)

            setattr(coord, "all_gather" if phase != "commit" else "broadcast", dying)
        try:
            mgr.save(2, state(coord.rank, 3, 2), force=True)
        except _Dead:
            return "dead"
        except CoordinationError as e:
            mgr.close()
            return e
        mgr.close()
        return "saved"

    out = run_ranks(3, body)
    committed = os.path.exists(os.path.join(root, "step_2", "manifest.msgpack"))
    assert all(out[r] == "dead" for r in dead)
    # every survivor raises: a rank died.  Whether step 2 exists depends only on whether rank
    # 0 had published it (the commit step follows the publish), and then it is complete.
    assert all(isinstance(out[r], CoordinationError) for r in set(range(3)) - dead), out
    assert committed == (phase == "commit")
    if committed:
        tree = unickpt.load(os.path.join(root, "step_2"))
        assert [p["n"] for p in tree["pos"]] == [20, 21, 22]
        np.testing.assert_array_equal(tree["sharded"], GLOBAL)
    assert save_job(root, 3, 3) == [2 if committed else 1] * 3  # the relaunch resumes it
