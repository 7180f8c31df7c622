"""benchmarks/dist_bench.py stays runnable: a tiny 2-process run, and its summary arithmetic."""

from __future__ import annotations

import json
import os
import sys

import pytest

pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import dist_bench  # noqa: E402

# One process by default (the orchestration and every system's code path, in CI time);
# UNICKPT_DIST_BENCH_PROCS=2 runs the FSDP2 path too.
PROCS = int(os.environ.get("UNICKPT_DIST_BENCH_PROCS", "1"))


def test_quick_run_writes_json_and_markdown(tmp_path):
    doc = dist_bench.main(["--quick", "--procs", str(PROCS), "--out", str(tmp_path)])
    (job,) = doc["jobs"]
    assert job["world"] == PROCS and job["bytes"] > 0
    for system in ("unickpt", "dcp"):
        assert set(job["rows"][system]) == {"save", "load"}
    assert set(job["rows"]["raw"]) == {"save"}
    assert json.loads((tmp_path / "dist.json").read_text())["jobs"][0]["world"] == PROCS
    md = (tmp_path / "dist.md").read_text()
    assert f"| {PROCS} | save |" in md and f"| {PROCS} | load |" in md
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".dist-bench-")]  # cleaned


def test_summary_ratios_and_bound_fraction():
    times = {"unickpt": {"save": [2.0, 1.0, 3.0], "load": [1.0, 1.0, 1.0]},
             "dcp": {"save": [3.0, 4.0, 2.0], "load": [0.5, 0.5, 0.5]},
             "raw": {"save": [0.8, 0.9, 1.0], "load": []}}
    s = dist_bench.summarize({"world": 2, "bytes": 10**9, "times": times})
    assert s["rows"]["unickpt"]["save"]["best"] == 1.0
    assert s["rows"]["unickpt"]["save"]["median"] == 2.0
    assert s["vs_dcp_save"] == {"best": 2.0, "median": 1.5}  # > 1: unickpt faster
    assert s["vs_dcp_load"] == {"best": 0.5, "median": 0.5}
    assert s["bound_fraction"] == pytest.approx({"best": 0.8, "median": 0.45})
    assert s["rows"]["unickpt"]["save"]["gbps"] == pytest.approx(1.0)
