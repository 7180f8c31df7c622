"""Orbax interop for multi-process checkpoints: ``unickpt convert`` in one process reads what a
2-process x 2-device JAX job saved with Orbax, and writes what such a job restores with Orbax
onto another mesh, bit for bit (tests/_jax_orbax_worker.py is one process of those jobs)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("jax")
ocp = pytest.importorskip("orbax.checkpoint")

import unickpt_jax.orbax as uorbax  # noqa: E402
import unickpt_jax.orbax_stream as stream  # noqa: E402
from _bitwise import assert_bitwise_equal  # noqa: E402
from _jax_launch import launch_jax  # noqa: E402
from _jax_orbax_worker import global_state  # noqa: E402

import unickpt  # noqa: E402
from unickpt.cli import main as cli  # noqa: E402
from unickpt.format.reader import CheckpointReader  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "_jax_orbax_worker.py")


def test_convert_reads_a_2_process_orbax_checkpoint_and_writes_one_it_restores(
        tmp_path, monkeypatch, capsys):
    src = str(tmp_path / "orbax_2proc")
    launch_jax(WORKER, {"mode": "save", "dir": src})
    assert sorted(n for n in os.listdir(src) if n.startswith("ocdbt.process_")) == \
        ["ocdbt.process_0", "ocdbt.process_1"]  # really written by two processes

    # Tiny thresholds: the test state is small, the streaming path is what must be exercised.
    monkeypatch.setattr(stream, "SMALL_BYTES", 256)
    monkeypatch.setattr(stream, "EAGER_BYTES", 512)
    monkeypatch.setattr(stream, "PIECE_BYTES", 64)
    monkeypatch.setattr(uorbax, "CHUNK_BYTES", 1024)
    uni = tmp_path / "uni"
    assert cli(["convert", src, str(uni), "--to", "unickpt", "-q"]) == 0
    want = _key_sorted(global_state())  # Orbax stores dict keys sorted
    assert_bitwise_equal(want, unickpt.load(uni))
    # Arrays over SMALL_BYTES stay sharded, as the chunks Orbax wrote (here: its shards).
    meta = stream.item_metadata(src)
    with CheckpointReader(uni) as r:
        pieces = {r.manifest.sharded[i].shape: sorted(idx for idx, _ in r.manifest.sharded[i].pieces)
                  for i in range(len(r.manifest.sharded))}
    assert pieces[(8, 12)] == [((0, 4), (0, 6)), ((0, 4), (6, 12)), ((4, 8), (0, 6)),
                               ((4, 8), (6, 12))]  # params/w: P("a", "b") on the (2, 2) mesh
    rows = meta["big"].storage.chunk_shape[0]
    assert 1 < 64 // rows and pieces[(64, 32)] == [((a, a + rows), (0, 32))
                                                  for a in range(0, 64, rows)]
    assert unickpt.inspect(uni).info["converted_from"] == "orbax"

    back = str(tmp_path / "orbax_back")
    assert cli(["convert", str(uni), back, "--to", "orbax", "-q"]) == 0
    assert "wrote" in capsys.readouterr().out
    launch_jax(WORKER, {"mode": "restore", "dir": back})
    checked = []
    for p in range(2):
        with open(f"{back}.p{p}.json") as f:
            checked.append(json.load(f))
    # each process compared both its devices' shards of all 5 arrays, bit for bit
    assert [len(c) for c in checked] == [10, 10]
    assert len({n for c in checked for n, _ in c}) == 5


def _key_sorted(x):
    return {k: _key_sorted(x[k]) for k in sorted(x)} if isinstance(x, dict) else x


def test_import_reads_big_arrays_only_when_written(tmp_path):
    a = np.arange(4096, dtype=np.float32).reshape(64, 64)
    with ocp.StandardCheckpointer() as ck:
        ck.save(tmp_path / "ck", {"a": a, "s": np.arange(3, dtype=np.int64), "n": 5},
                save_args={"a": ocp.SaveArgs(chunk_byte_size=4096), "s": None, "n": None})
    seen: list[int] = []
    tree = stream.read_item(str(tmp_path / "ck"), seen.append, eager_bytes=64,
                            piece_bytes=4096)
    assert seen == [24]  # the small array only: nothing of "a" is read yet
    big = tree["a"]
    assert isinstance(big, unickpt.ShardedArray) and len(big.pieces) == 4
    # Orbax's 4 KiB chunks: 32 x 32
    assert [p.index for p in big.pieces] == [((r, r + 32), (c, c + 32))
                                             for r in (0, 32) for c in (0, 32)]
    piece = big.pieces[2].data.materialize()
    assert seen == [24, 4096] and piece.tobytes() == a[32:, :32].tobytes()
    assert big.assemble().tobytes() == a.tobytes() and tree["n"] == 5


def test_import_without_tree_metadata_is_a_typed_error(tmp_path):
    with ocp.StandardCheckpointer() as ck:
        ck.save(tmp_path / "ck", {"a": np.arange(3.0)})
    (tmp_path / "ck" / "_METADATA").unlink()
    with pytest.raises(unickpt.CorruptCheckpointError,
                       match="cannot read this checkpoint's tree metadata"):
        uorbax.import_orbax(tmp_path / "ck", tmp_path / "uni")
    assert not (tmp_path / "uni").exists()


def test_piece_shape_follows_the_saved_grid():
    # the saved shard, doubled along the last axis first, never past the array
    assert stream._piece_shape((8, 12), (4, 6), 4, 96) == (4, 6)
    assert stream._piece_shape((8, 12), (4, 6), 4, 192) == (4, 12)
    assert stream._piece_shape((8, 12), (4, 6), 4, 1 << 20) == (8, 12)
    assert stream._piece_shape((64, 32), (16, 32), 4, 4096) == (32, 32)
    assert stream._piece_shape((), (), 4, 16) == ()
