"""The README's Performance section is generated from one benchmark run, idempotently."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import _readme  # noqa: E402


def _run(name: str, save: list[float], load: list[float]) -> dict:
    return {"save": save, "load": load, "rss": [1 << 20] if save else [], "load_rss": []}


def _doc() -> dict:
    """A run of two states on disk and tmpfs, with start-up and async figures."""
    states = []
    for fs in ("disk", "tmpfs"):
        states.append({"state": "small", "fs": fs, "bytes": 10 << 20, "narrays": 10000,
                       "cold_cache": fs == "disk", "runs": {
                           "unickpt": _run("unickpt", [0.040, 0.041, 0.042], [0.030, 0.031, 0.03]),
                           "safetensors (numpy)": _run("st", [0.050, 0.05, 0.05],
                                                       [0.045, 0.046, 0.047]),
                           "orbax Standard": _run("o", [4.0, 4.1, 4.2], [8.0, 8.0, 8.0]),
                           "raw write+fsync": _run("raw", [0.02] * 3, [0.02] * 3)}})
        states.append({"state": "big", "fs": fs, "bytes": 1 << 30, "narrays": 64,
                       "cold_cache": fs == "disk", "runs": {
                           "unickpt": _run("u", [0.30, 0.33, 0.60], [0.5, 0.5, 0.5]),
                           "unickpt (mmap)": _run("m", [], [0.002] * 3),
                           "torch.save": _run("t", [0.6] * 3, [0.4, 0.41, 0.42])}})
    machine = {"cpu_count": 2, "cpu_model": "AMD EPYC", "ram_gib": 24.0, "disk": "/dev/vda (ext4)",
               "kernel": "6.18", "python": "3.11.7", "load_at_start": [0.5], "load_at_end": [1.0],
               "versions": {"unickpt": "0.1.0", "torch.save": "2.13.0"}}
    startup = {"repeats": 7, "best": {"import numpy": 0.2, "import unickpt": 0.26,
                                      "unickpt ls (root of 100)": 0.35},
               "targets": [["start-up: import", "1.30x", True]]}
    return {"quick": False, "repeats": 3, "machine": machine, "missing": [],
            "fsync_added": {}, "descriptions": {"small": "10,000 small arrays",
                                                "big": "1 GiB in 64 arrays"},
            "states": states, "async": {"blocking": [0.13], "memcpy": [0.14], "total": [2.2]},
            "write_bound": {}, "startup": startup}


def test_section_has_the_runs_figures():
    text = _readme.section(_doc())
    assert text.startswith("## Performance\n\n") and text.endswith("\n\n")
    # best of N: unickpt 40 ms vs safetensors 50 ms saves, 30 vs 45 ms restores
    assert "| 10,000 small arrays | disk | 40.0 ms, **1.25x** | safetensors (numpy) 50.0 ms | " \
           "30.0 ms, **1.50x** | safetensors (numpy) 45.0 ms |" in text
    assert "| 10,000 small arrays | tmpfs |" in text
    # the big save's repeats spread 2x: its ratio is marked unstable, and said to be
    assert "300 ms (3.6 GB/s), **2.00x** ~ | torch.save 600 ms" in text
    prose = " ".join(text.split())  # the bullets are wrapped
    assert "Unstable ratios (`~`: the repeats disagree, a rerun may flip them): big (tmpfs) " \
           "save, big save." in prose
    assert "`import unickpt` 0.26 s, `import numpy` 0.20 s (1.30x)" in prose
    assert "opens the 1024 MiB state in 2.0 ms" in prose
    assert "blocks for 130 ms" in prose
    assert all(len(line) <= 95 for line in text.splitlines() if not line.startswith("|"))


def test_rewrite_replaces_only_the_section_and_is_idempotent(tmp_path):
    readme = tmp_path / "README.md"
    shutil.copy(os.path.join(ROOT, "README.md"), readme)
    results = tmp_path / "results" / "results.json"
    results.parent.mkdir()
    results.write_text(json.dumps(_doc()))
    before = readme.read_text()
    assert not _readme.update(str(readme), str(results), check=True)  # stale: left alone
    assert readme.read_text() == before
    assert not _readme.update(str(readme), str(results))  # rewritten
    once = readme.read_text()
    assert _readme.update(str(readme), str(results))  # a second run changes nothing
    assert readme.read_text() == once
    assert _readme.update(str(readme), str(results), check=True)
    head, _, _ = before.partition("## Performance\n")
    ends = [e for e in (before.find(h, len(head) + 5) for h in ("\n## ", "\n### ")) if e >= 0]
    tail = before[min(ends) + 1:] if ends else ""  # the next (sub)section, if any
    assert once.startswith(head) and once.endswith(tail)
    # the README's hand-written multi-process subsections survive the rewrite
    for sub in ("### Multi-process (JAX)\n", "### Multi-process (PyTorch)\n"):
        assert before.count(sub) == once.count(sub) == 1, sub
    assert _readme.rewrite(head + "## Performance\n\nold\n\n### Mine\n\nkept\n\n## Next\n",
                           "## Performance\n\nnew\n\n") == \
        head + "## Performance\n\nnew\n\n### Mine\n\nkept\n\n## Next\n"
    assert _readme.rewrite(head + "## Performance\n\nold\n", "## Performance\n\nnew\n") == \
        head + "## Performance\n\nnew\n"
    assert once.count("## Performance") == 1
    assert "](results/results.md)" in once  # links relative to the README


def test_committed_results_render(tmp_path):
    """The committed results (an older run: no tmpfs, no start-up) still give a section."""
    path = os.path.join(ROOT, "benchmarks", "results", "results.json")
    if not os.path.exists(path):
        pytest.skip("no committed results")
    with open(path) as f:
        text = _readme.section(json.load(f))
    assert "\n| 10,000 small arrays (f32/i32/f16, 4 B - 1 KiB each) | disk | " in text
    assert _readme.rewrite(_readme.rewrite("# x\n\n" + text, text), text) == "# x\n\n" + text


def test_readme_without_the_heading_is_refused():
    with pytest.raises(ValueError, match="no '## Performance' heading"):
        _readme.rewrite("# title\n", _readme.section(_doc()))
