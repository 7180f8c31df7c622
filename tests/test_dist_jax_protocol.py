"""The multi-process save protocol with the piece layouts JAX produces (ranks as threads).

A ``jax.Array`` spanning processes is saved as each process's ``replica_id == 0`` shards:
a process may hold several pieces of an array, or none at all (every shard it has is a
replica), and a region may be held by several processes.  Property: whatever the tiling and
whoever holds which piece, the checkpoint is committed once, every region is written exactly
once by a process that holds it, and it loads back bitwise.  No framework needed, so
hypothesis can explore many layouts in a second (``UNICKPT_EXAMPLES`` raises the count).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from _thread_coord import run_ranks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import unickpt
from unickpt.dist.save import collective_save, in_collective_save
from unickpt.format.reader import CheckpointReader
from unickpt.tree import Piece, ShardedArray

EXAMPLES = int(os.environ.get("UNICKPT_EXAMPLES", "12"))


@st.composite
def layouts(draw):
    """(world, global array, row bounds of the pieces, holders of each piece)."""
    world = draw(st.integers(2, 4))
    rows = draw(st.integers(1, 9))
    cols = draw(st.integers(1, 4))
    cuts = sorted(draw(st.sets(st.integers(1, rows - 1), max_size=rows - 1))) if rows > 1 else []
    bounds = list(zip([0, *cuts], [*cuts, rows]))
    holders = [sorted(draw(st.sets(st.integers(0, world - 1), min_size=1, max_size=2)))
               for _ in bounds]
    dtype = draw(st.sampled_from(["float32", "int16", "uint8", "float64"]))
    g = (np.arange(rows * cols) * 7 % 253).astype(dtype).reshape(rows, cols)
    return world, g, bounds, holders


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=layouts())
def test_any_piece_layout_commits_once_and_loads_back_bitwise(tmp_path_factory, layout):
    world, g, bounds, holders = layout
    root = str(tmp_path_factory.mktemp("p") / "run")
    cols = g.shape[1]

    def body(coord):
        r = coord.rank
        mine = [Piece(((a, b), (0, cols)), g[a:b].copy())
                for (a, b), h in zip(bounds, holders) if r in h]
        state = {"x": ShardedArray(g.shape, g.dtype, mine), "rep": np.arange(3) + 1,
                 "step": 1}
        with unickpt.CheckpointManager(root, coordinator=coord) as mgr:
            mgr.save(1, state, force=True)
        return len(mine)

    out = run_ranks(world, body)
    assert all(isinstance(n, int) for n in out), out
    path = os.path.join(root, "step_1")
    with CheckpointReader(path) as rd:
        m = rd.manifest
        (entry,) = m.sharded
        assert len(entry.pieces) == len(bounds)  # each region once
        for (_idx, a), h in zip(sorted(entry.pieces), holders):
            rank = int(m.arrays[a].file.split("-r")[1].split(".")[0])
            assert rank in h  # written by a process that holds it
        assert sum(1 for a in m.arrays if a.name == "rep") == 1
    tree = unickpt.load(path)
    assert tree["x"].dtype == g.dtype and tree["x"].tobytes() == g.tobytes()


def test_collective_save_is_scoped():
    assert not in_collective_save()
    with collective_save():
        assert in_collective_save()
        with collective_save(False):
            assert not in_collective_save()
        assert in_collective_save()
    assert not in_collective_save()


def test_jax_without_distributed_is_one_process():
    pytest.importorskip("jax")
    from unickpt_jax.dist import JaxCoordinator

    from unickpt.dist import SingleProcess, detect

    assert isinstance(detect(), SingleProcess)  # jax imported, jax.distributed not started
    with pytest.raises(RuntimeError, match="jax.distributed is not initialized"):
        JaxCoordinator()
