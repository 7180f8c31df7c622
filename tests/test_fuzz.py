"""Fuzzing the readers (issue 18 harness): structure-aware manifest mutations with a valid
outer checksum and byte-level mutations of both files.

CI runs a fixed-seed slice; ``UNICKPT_FUZZ_EXAMPLES=N`` runs N cases per kind.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

import unickpt
from unickpt.testing.fuzz import KINDS, default_examples, fuzz, mutate_body, read_body


@pytest.mark.parametrize("kind", KINDS)
def test_fuzz_slice(tmp_path, kind):
    n = default_examples(60)
    rep = fuzz(str(tmp_path), examples=n, seed=18, kinds=(kind,))
    assert rep.cases == {kind: n}
    assert not rep.failures, "\n".join(rep.failures[:20])
    # the mutations do reach the readers: most cases are refused, with typed errors only
    refused = sum(v for k, v in rep.outcomes.items() if k.startswith("load:") and
                  not k.endswith(":ok"))
    assert refused > n // 2


def test_structure_mutations_keep_a_valid_checksum(tmp_path):
    p = tmp_path / "c"
    unickpt.save(p, {"w": np.arange(3.0)})
    body = read_body(p)
    seen = set()
    rng = random.Random(0)
    for _ in range(200):
        mutated, what = mutate_body(body, rng)
        seen.add(what.split(" ")[0])
        assert mutated is not body
    assert read_body(p) == body  # the source is never changed
    assert {"delete", "duplicate", "wrap"} <= seen


def test_structure_mutations_reach_every_column_of_the_array_table(tmp_path):
    p = tmp_path / "c"
    unickpt.save(p, {"w": np.arange(3.0), "be": np.arange(2, dtype=">i4"), "n": np.int64(1)})
    body = read_body(p)
    assert body["format_version"] == 3 and isinstance(body["arrays"], dict)
    rng = random.Random(1)
    packed: dict = {}
    for _ in range(300):
        mutated, what = mutate_body(body, rng)
        if what.startswith("packed ('arrays', "):
            col = what.split("'")[3]
            packed[col] = packed.get(col, 0) + 1
            assert mutated["arrays"][col] != body["arrays"][col]
            assert {k: v for k, v in mutated["arrays"].items() if k != col} == \
                {k: v for k, v in body["arrays"].items() if k != col}  # one column changed
    assert set(packed) == {"file", "dtype", "ndim", "shape", "offset", "nbytes", "xxh3"}


def test_verify_is_not_ok_when_a_file_does_not_load(tmp_path):
    # found by the fuzzer: every array checks out, but the array file was extended, so
    # load refuses it; verify said ok
    p = tmp_path / "c"
    unickpt.save(p, {"w": np.arange(3.0)})
    data = next(n for n in os.listdir(p) if n != "manifest.msgpack")
    with open(p / data, "ab") as f:
        f.write(bytes(10))
    report = unickpt.verify(p, raise_on_error=False)
    assert not report.ok and report.bad == []
    assert "is 162 bytes, the manifest says 152" in report.files[data]
    with pytest.raises(unickpt.CorruptCheckpointError,
                       match="0 damaged leaves: ; array file .* is 162 bytes"):
        unickpt.verify(p)
    with pytest.raises(unickpt.CorruptCheckpointError, match="is 162 bytes"):
        unickpt.load(p)
