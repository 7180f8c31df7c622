"""Conformance tests for adapters: subclass :class:`AdapterConformance` in your test suite.

As fsspec ships abstract tests for filesystem backends, unickpt ships the checks every adapter
must pass (the rules of :mod:`unickpt.contract`).  A third-party adapter package writes one
test class that says how to build objects of its framework, and pytest runs every check::

    from unickpt.testing.conformance import AdapterConformance

    class TestMyAdapter(AdapterConformance):
        adapter_name = "toy"                       # the name its Plugin registers

        def make_state(self, seed):                # same structure, values depending on seed
            return {"v": toy.Vector([seed, seed + 1.5])}

        def mutate(self, state):                   # change every live value in place
            state["v"].data[0] += 100.0

        def make_mismatched(self):                 # a target that cannot take make_state's
            return {"v": toy.Vector([0.0, 0.0, 0.0])}, ["v"]    # ... and the paths to report

The checks (each a ``test_*`` method; the class name must not start with ``Test`` so pytest
collects only your subclass):

* ``kind_of`` claims the framework's objects (and :func:`unickpt.adapters.adapter_for` routes
  them to this adapter), never neutral leaves, and never raises;
* ``to_tree -> save -> load -> restore`` reproduces every value bit for bit, in a fresh target;
* ``snapshot=True`` trees do not change when the live objects are mutated afterwards;
* a restore where any part mismatches raises :class:`~unickpt.IncompatibleCheckpointError`
  listing the paths, and modifies nothing (also the parts that did fit);
* the global RNG (``capture_rng``/``restore_rng``/``seed_rng``) round trips, also through a
  checkpoint;
* unsupported objects raise :class:`~unickpt.UnsupportedLeafError` naming the tree path.

Hooks with defaults: :meth:`assert_equal` (bitwise, through :func:`assert_trees_equal`),
:meth:`draw_random` (None: the framework has no global RNG), :meth:`unsupported_objects`.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from ..adapters import adapter_for, loaded_adapters
from ..api import load, save
from ..contract import Adapter
from ..errors import IncompatibleCheckpointError, UnsupportedLeafError
from ..state import restore_tree, to_tree
from .compare import TreesDifferError, assert_trees_equal, diff_trees

__all__ = ["AdapterConformance"]

_NEUTRAL_LEAVES: tuple[Any, ...] = (1, 2.5, True, "s", b"b", None, np.zeros(2, np.float32),
                                    np.int64(3))


class AdapterConformance:
    """The conformance checks; subclass it (as ``Test<Something>``) and fill in the hooks."""

    #: The adapter's ``name`` (as registered by its plugin).
    adapter_name: str = ""

    # ------------------------------------------------------------------ hooks
    def make_state(self, seed: int) -> dict[str, Any]:
        """A state (a dict) of this framework's objects; values depend on ``seed``, the
        structure does not.  Each call returns new objects."""
        raise NotImplementedError

    def mutate(self, state: dict[str, Any]) -> None:
        """Change the values of every mutable object in ``state`` in place (no-op for a
        framework whose values are immutable)."""
        raise NotImplementedError

    def make_mismatched(self) -> tuple[dict[str, Any], list[str]]:
        """A restore target with ``make_state``'s keys where some entries cannot take the
        checkpoint (another shape, dtype...), and the tree paths the error must name."""
        raise NotImplementedError

    def assert_equal(self, a: Any, b: Any) -> None:
        """Bitwise equality of two states (default: :func:`assert_trees_equal`)."""
        assert_trees_equal(a, b)

    def draw_random(self) -> Any:
        """A value drawn from the framework's global RNG (None: it has no global RNG)."""
        return None

    def unsupported_objects(self) -> list[Any]:
        """Framework objects the adapter refuses to save (with UnsupportedLeafError)."""
        return []

    # ------------------------------------------------------------------ helpers
    def adapter(self) -> Adapter:
        self.make_state(0)  # objects exist: the framework is imported, the adapter loadable
        for a in loaded_adapters():
            if a.name == self.adapter_name:
                return a
        raise AssertionError(f"no loaded adapter named {self.adapter_name!r}; is its plugin "
                             "registered (entry point or unickpt.adapters.register_adapter)?")

    def frozen(self, state: Any) -> Any:
        """A neutral copy of ``state`` that nothing can change (even if the adapter's
        snapshot wrongly aliases live memory)."""
        return copy.deepcopy(to_tree(state, snapshot=True)[0])

    def round_trip(self, state: Any, target: Any,
                   restore: Callable[..., Any] = restore_tree) -> Any:
        """``state`` saved to a checkpoint, loaded, and restored into ``target``."""
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "ckpt")
            tree, kinds = to_tree(state)
            save(path, tree)
            return restore(target, load(path), kinds=kinds, checkpoint=path)

    # ------------------------------------------------------------------ checks
    def test_adapter_implements_the_contract(self) -> None:
        adapter = self.adapter()
        assert isinstance(adapter, Adapter)
        assert isinstance(adapter.name, str) and adapter.name == self.adapter_name

    def test_kind_of_claims_its_objects_only(self) -> None:
        adapter = self.adapter()
        for key, obj in self.make_state(0).items():
            if type(obj) in (dict, list, tuple):  # plain containers need no adapter
                continue
            kind = adapter.kind_of(obj)
            assert isinstance(kind, str) and kind, f"{key}: kind_of returned {kind!r}"
            found = adapter_for(obj)
            assert found is not None and found[0].name == adapter.name, (
                f"{key}: adapter_for routes {type(obj).__qualname__} to {found}")
        for leaf in (*_NEUTRAL_LEAVES, object()):
            assert adapter.kind_of(leaf) is None, f"kind_of claims {leaf!r}"

    def test_round_trip_is_bitwise(self) -> None:
        source, target = self.make_state(0), self.make_state(1)
        expected = self.frozen(source)
        assert diff_trees(expected, to_tree(target)[0]), (
            "make_state(0) and make_state(1) must differ in value for this check to mean "
            "anything")
        restored = self.round_trip(source, target)
        self.assert_equal(restored, expected)
        self.assert_equal(source, expected)  # saving did not change the source

    def test_snapshot_is_isolated_from_later_mutation(self) -> None:
        state = self.make_state(0)
        before = self.frozen(self.make_state(0))
        snap, _ = to_tree(state, snapshot=True)
        self.mutate(state)
        self.assert_equal(snap, before)

    def test_failed_restore_lists_paths_and_modifies_nothing(self) -> None:
        source = self.make_state(0)
        target, paths = self.make_mismatched()
        assert paths, "make_mismatched must name the paths the error reports"
        before = self.frozen(target)
        try:
            self.round_trip(source, target)
        except IncompatibleCheckpointError as e:
            message = str(e)
            for p in paths:
                assert p in message, f"{p!r} not named in: {message}"
        else:
            raise AssertionError("restoring into a mismatched target did not raise "
                                 "IncompatibleCheckpointError")
        try:
            self.assert_equal(target, before)
        except TreesDifferError as e:
            raise AssertionError("a failed restore modified the target:\n" + str(e)) from None

    def test_global_rng_round_trips(self) -> None:
        adapter = self.adapter()
        state = adapter.capture_rng()
        if state is None:
            assert self.draw_random() is None, "draw_random given but capture_rng is None"
            assert adapter.restore_rng({}) == []
            adapter.seed_rng(0)
            return
        first = self.draw_random()
        assert first is not None, "capture_rng returned state: define draw_random"
        adapter.restore_rng(state)
        self.assert_equal(self.draw_random(), first)
        with tempfile.TemporaryDirectory() as d:  # also through a checkpoint (a neutral tree)
            save(os.path.join(d, "rng"), {"rng": state})
            assert adapter.restore_rng(load(os.path.join(d, "rng"))["rng"]) == []
        self.assert_equal(self.draw_random(), first)
        adapter.seed_rng(1234)
        a = self.draw_random()
        adapter.seed_rng(1234)
        self.assert_equal(self.draw_random(), a)

    def test_unsupported_objects_raise_typed_errors(self) -> None:
        for obj in self.unsupported_objects():
            try:
                to_tree({"where": {"bad": obj}})
            except UnsupportedLeafError as e:
                assert "where/bad" in str(e), f"the path is not named in: {e}"
            else:
                raise AssertionError(f"saving {obj!r} did not raise UnsupportedLeafError")
