"""unickpt.RNG and numpy Generators as state leaves: bit-exact streams after restore."""

from __future__ import annotations

import random

import numpy as np
import pytest

import unickpt
from unickpt import CheckpointManager
from unickpt.state import restore_tree, to_tree


def draws(gen: np.random.Generator | None = None) -> tuple:
    out = (random.random(), random.gauss(0, 1), np.random.rand(3).tobytes(),
           np.random.standard_normal())
    return out + ((gen.integers(0, 2**62, 4).tobytes(),) if gen is not None else ())


def test_rng_round_trip_through_manager(tmp_path):
    random.seed(123)
    np.random.seed(7)
    random.gauss(0, 1)  # leave a cached gauss value in both generators
    np.random.standard_normal()
    gen = np.random.default_rng(5)
    gen.random(3)
    with CheckpointManager(tmp_path) as m:
        m.save(1, {"rng": unickpt.RNG(), "gen": gen})
    expected = draws(gen)
    random.seed(0)
    np.random.seed(0)
    gen2 = np.random.default_rng(99)
    with CheckpointManager(tmp_path) as m:
        r = m.restore({"rng": unickpt.RNG(), "gen": gen2})
    assert r.state["gen"] is gen2  # restored in place
    assert draws(gen2) == expected
    kinds = unickpt.inspect(tmp_path / "step_1").kinds
    assert kinds == {"rng": "unickpt.RNG", "gen": "numpy.random.Generator"}


@pytest.mark.parametrize("bitgen", [np.random.PCG64, np.random.MT19937, np.random.Philox,
                                    np.random.SFC64, np.random.PCG64DXSM])
def test_generator_leaf_all_bit_generators(tmp_path, bitgen):
    g = np.random.Generator(bitgen(11))
    g.random(5)
    tree, _ = to_tree({"g": g})
    unickpt.save(tmp_path / "c", tree)
    expected = g.random(4).tobytes()
    g2 = np.random.Generator(bitgen(0))
    restore_tree({"g": g2}, unickpt.load(tmp_path / "c", mmap=True))
    assert g2.random(4).tobytes() == expected


def test_generator_of_other_algorithm_is_a_mismatch(tmp_path):
    tree, _ = to_tree({"g": np.random.Generator(np.random.PCG64(1))})
    with pytest.raises(unickpt.IncompatibleCheckpointError,
                       match=r"g: target is a numpy Generator\(MT19937\), checkpoint has PCG64"):
        restore_tree({"g": np.random.Generator(np.random.MT19937(1))}, tree)


def test_missing_and_extra_entries_warn_and_restore_the_rest(tmp_path):
    random.seed(3)
    tree, _ = to_tree({"rng": unickpt.RNG()})
    expected = random.random()
    del tree["rng"]["numpy"]  # as if written by a version without numpy capture
    tree["rng"]["mlx"] = {"key": np.zeros(2, np.uint32)}  # framework this process lacks
    unickpt.save(tmp_path / "step_1", tree)
    random.seed(0)
    np.random.seed(5)
    before = np.random.get_state()[1].copy()
    with CheckpointManager(tmp_path) as m:
        with pytest.warns(UserWarning) as rec:
            m.restore({"rng": unickpt.RNG()})
    msgs = [str(w.message) for w in rec]
    assert any("not restored: numpy (not in the checkpoint)" in s for s in msgs), msgs
    assert any("holds RNG state for mlx" in s and "ignored" in s for s in msgs), msgs
    assert random.random() == expected  # python was restored
    assert (np.random.get_state()[1] == before).all()  # numpy untouched


def test_malformed_entry_warns_never_crashes(tmp_path):
    tree, _ = to_tree({"rng": unickpt.RNG()})
    tree["rng"]["python"]["mt"] = np.zeros(3, np.uint32)
    with pytest.warns(UserWarning, match=r"python \(expected 624 uint32"):
        restore_tree({"rng": unickpt.RNG()}, tree)


class FakeAdapter:
    name = "fakefw"

    def __init__(self, fail: bool = False):
        self.state = np.arange(4, dtype=np.uint8)
        self.fail = fail

    def capture_rng(self):
        return {"seed": self.state.copy()}

    def restore_rng(self, s):
        if self.fail:
            raise RuntimeError("no such device")
        self.state = np.array(s["seed"])
        return ["fakefw: device 1 RNG not restored (only one device here)"]


def test_adapter_rng_entries(tmp_path, monkeypatch):
    fake = FakeAdapter()
    monkeypatch.setattr("unickpt.rng.loaded_adapters", lambda: [fake])
    tree, _ = to_tree({"rng": unickpt.RNG()})
    assert tree["rng"]["fakefw"]["seed"].tolist() == [0, 1, 2, 3]
    fake.state = np.zeros(4, np.uint8)
    with pytest.warns(UserWarning, match="device 1 RNG not restored"):
        restore_tree({"rng": unickpt.RNG()}, tree)
    assert fake.state.tolist() == [0, 1, 2, 3]
    fake.fail = True
    with pytest.warns(UserWarning, match=r"fakefw \(RuntimeError: no such device\)"):
        restore_tree({"rng": unickpt.RNG()}, tree)
    # a checkpoint written before the framework was in use lacks its entry: a warning
    del tree["rng"]["fakefw"]
    with pytest.warns(UserWarning, match=r"fakefw \(not in the checkpoint\)"):
        restore_tree({"rng": unickpt.RNG()}, tree)


def test_rng_target_against_non_dict_is_a_mismatch():
    with pytest.raises(unickpt.IncompatibleCheckpointError,
                       match="rng: target is unickpt.RNG\\(\\), checkpoint has a int"):
        restore_tree({"rng": unickpt.RNG()}, {"rng": 3})
