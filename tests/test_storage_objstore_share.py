"""Incremental saves on an object store: unchanged array files are server-side copies."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fsspec")

import unickpt  # noqa: E402
from unickpt.manager import RunRoot  # noqa: E402
from unickpt.storage import storage_for  # noqa: E402


def _state(step: int) -> dict:
    frozen = np.arange(72 << 20 >> 3, dtype=np.float64)  # 72 MiB (over one file), frozen
    return {"base": {"w": frozen}, "adapter": {"a": np.full(1000, float(step))}, "step": step}


def test_unchanged_files_are_shared_on_memory_fs():
    root = "memory://share-test/run"
    with unickpt.CheckpointManager(root, keep_last=1) as m:  # retention deletes the source
        for step in (1, 2, 3):
            assert m.save(step, _state(step))
    rr = RunRoot(root, storage_for(root))
    info = rr.read_info(3)
    assert info["files"] >= 2 and info["shared_files"] >= 1
    assert info["written_bytes"] < info["nbytes"] // 2
    assert rr.scan().steps == (3,)  # the checkpoints it shared with are gone
    got = unickpt.load(f"{root}/step_3")
    np.testing.assert_array_equal(got["base"]["w"], _state(3)["base"]["w"])
    assert got["adapter"]["a"].tolist() == [3.0] * 1000 and got["step"] == 3
    unickpt.verify(f"{root}/step_3")


def test_share_refuses_an_existing_destination():
    storage = storage_for("memory://share-test2")
    storage.write_atomic("memory://share-test2/a", b"x")
    storage.write_atomic("memory://share-test2/b", b"y")
    with pytest.raises(FileExistsError):
        storage.share("memory://share-test2/a", "memory://share-test2/b")
