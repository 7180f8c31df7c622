"""The multi-process JAX benchmark stays runnable: a tiny 2-process run writes its report, with
both systems timed, every restore checked bit for bit inside the job, and RSS per process."""

from __future__ import annotations

import json
import os
import sys

import pytest

pytest.importorskip("jax")
pytest.importorskip("orbax.checkpoint")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import jax_dist_bench  # noqa: E402


def test_tiny_two_process_run_writes_its_report(tmp_path):
    out = tmp_path / "results"
    assert jax_dist_bench.main(["--mib", "1", "--repeats", "2", "--processes", "2",
                                "--out", str(out), "--dir", str(tmp_path),
                                "--timeout", "240", "--no-convert"]) == 0
    doc = json.loads((out / "jax_dist.json").read_text())
    (r,) = doc["results"]
    assert (r["processes"], r["devices_per_process"], r["repeats"]) == (2, 2, 2)
    # 90% of the bytes split over the 4 devices, 10% replicated on every one
    assert r["global_bytes"] > r["addressable_bytes"] > r["global_bytes"] / 2
    for system in ("unickpt", "orbax"):
        row = r["rows"][system]
        assert 0 < row["save_best"] <= row["save_median"]
        assert 0 < row["restore_best"] <= row["restore_median"]
        assert row["save_rss_rise"] >= 0 and row["restore_rss_frac"] >= 0
    assert set(r["speedup_vs_orbax"]) == {"save_best", "save_median", "restore_best",
                                          "restore_median"}
    assert doc["convert"] is None  # (skipped here: two more processes that import JAX)
    md = (out / "jax_dist.md").read_text()
    assert "| 2 x 2 | unickpt |" in md and "| 2 x 2 | orbax |" in md
    assert [n for n in os.listdir(tmp_path) if n != "results"] == []  # checkpoints removed
