"""assert_trees_equal / diff_trees: bitwise comparison and the leaf-level report."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import unickpt
from unickpt.testing import TreesDifferError, assert_trees_equal, diff_trees

DTYPES = [np.bool_, np.int8, np.uint16, np.int32, np.int64, np.uint64, np.float16, np.float32,
          np.float64, np.complex64, np.complex128, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn,
          ml_dtypes.float8_e5m2]


def _arrays(draw: st.DrawFn) -> np.ndarray:
    dt = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    raw = draw(st.binary(min_size=n, max_size=n))
    return np.frombuffer(raw, dtype=np.uint8).view(dt).reshape(shape).copy()


arrays = st.composite(_arrays)()
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                    st.text(max_size=5), st.binary(max_size=5))
keys = st.text(max_size=4)
trees = st.recursive(
    st.one_of(arrays, scalars),
    lambda kids: st.one_of(st.dictionaries(keys, kids, max_size=3),
                           st.lists(kids, max_size=3)),
    max_leaves=8,
)


def _copy(t):
    if isinstance(t, dict):
        return {k: _copy(v) for k, v in t.items()}
    if isinstance(t, list):
        return [_copy(v) for v in t]
    return t.copy() if isinstance(t, np.ndarray) else t


def _leaf_paths(t, path=()):
    from unickpt.tree import iter_leaves

    return [(p, v) for p, v in iter_leaves(t, path)]


@settings(max_examples=60, deadline=None)
@given(tree=trees)
def test_a_tree_equals_its_copy_and_its_checkpoint(tree, tmp_path_factory):
    assert_trees_equal(tree, _copy(tree))
    assert diff_trees(tree, _copy(tree)) == []
    if isinstance(tree, dict):
        p = tmp_path_factory.mktemp("c") / "step_1"
        unickpt.save(p, tree)
        assert_trees_equal(tree, unickpt.load(p))


@settings(max_examples=60, deadline=None)
@given(tree=trees, data=st.data())
def test_flipping_one_bit_of_one_leaf_is_reported_at_that_path_only(tree, data):
    leaves = [(p, v) for p, v in _leaf_paths(tree)
              if isinstance(v, np.ndarray) and v.size and v.dtype.itemsize <= 8]
    if not leaves:
        return
    path, leaf = data.draw(st.sampled_from(leaves))
    flat = data.draw(st.integers(0, leaf.size - 1))
    bit = data.draw(st.integers(0, 8 * leaf.dtype.itemsize - 1))
    other = _copy(tree)
    node = other
    for k in path[:-1]:
        node = node[k]
    changed = leaf.copy() if path else other.copy()
    raw = changed.reshape(-1).view(np.uint8)
    raw[flat * leaf.dtype.itemsize + bit // 8] ^= 1 << (bit % 8)
    if path:
        node[path[-1]] = changed
    else:
        other = changed
    with pytest.raises(TreesDifferError) as e:
        assert_trees_equal(tree, other)
    name = unickpt.format_path(path)
    assert e.value.paths == [name]
    idx = "[" + ", ".join(map(str, np.unravel_index(flat, leaf.shape))) + "]"
    assert f"  {name}: {leaf.dtype}{list(leaf.shape)}: 1 of {leaf.size} elements differ" in str(
        e.value)
    assert f"first at {idx}:" in str(e.value)


def test_report_lists_every_leaf_sorted_with_details():
    a = {"model": {"w": np.float32([[1, 2], [3, 4]]), "b": np.zeros(3, np.float32)},
         "opt": {"step": 10, "lr": 0.1}, "only_a": np.int64(3), "name": "x"}
    b = {"model": {"w": np.float32([[1, 2.5], [3, 9]]), "b": np.zeros(4, np.float32)},
         "opt": {"step": 9, "lr": 0.1}, "only_b": [1, 2], "name": "x"}
    with pytest.raises(AssertionError) as e:
        assert_trees_equal(a, b, names=("reference", "resumed"))
    assert str(e.value) == "\n".join([
        "trees differ: 3 of 8 leaves differ, 1 only in reference, 2 only in resumed (bit for bit)",
        "  model/b: reference is float32[3], resumed is float32[4]",
        "  model/w: float32[2, 2]: 2 of 4 elements differ, max |reference-resumed| = 5.0, "
        "first at [0, 1]: reference=2.0, resumed=2.5",
        "  only_a: only in reference: int64[]",
        "  only_b/0: only in resumed: int 1",
        "  only_b/1: only in resumed: int 2",
        "  opt/step: int: reference=10, resumed=9",
    ])
    assert [d.kind for d in e.value.differences] == ["type", "value", "missing", "extra",
                                                     "extra", "value"]


def test_nans_compare_by_bits_and_signed_zeros_differ():
    nan = np.float64([np.nan, 0.0])
    assert_trees_equal({"x": nan}, {"x": nan.copy()})
    assert_trees_equal({"f": math.nan}, {"f": math.nan})
    payload = nan.copy()
    payload.view(np.uint64)[0] ^= 1
    with pytest.raises(AssertionError, match=r"NaN in a: 1, NaN in b: 1, first at \[0\]"):
        assert_trees_equal({"x": nan}, {"x": payload})
    with pytest.raises(AssertionError, match=r"x: float64\[2\]: 1 of 2 elements differ, max "
                                             r"\|a-b\| = 0.0 \(equal values, different bits"):
        assert_trees_equal({"x": nan}, {"x": np.float64([np.nan, -0.0])})
    with pytest.raises(AssertionError, match=r"f: float: a=0.0, b=-0.0"):
        assert_trees_equal({"f": 0.0}, {"f": -0.0})
    with pytest.raises(AssertionError, match=r"x: float32\[1\]: .* NaN in a: 0, NaN in b: 1"):
        assert_trees_equal({"x": np.float32([1])}, {"x": np.float32([np.nan])})


def test_scalar_kinds_are_strict_but_sequences_and_0d_arrays_are_not():
    with pytest.raises(AssertionError, match="<root>: a is bool True, b is int 1"):
        assert_trees_equal(True, 1)
    with pytest.raises(AssertionError, match=r"k: a is int 1, b is float 1.0"):
        assert_trees_equal({"k": 1}, {"k": 1.0})
    with pytest.raises(AssertionError, match=r"k: a is dict\(1 keys\), b is int 1"):
        assert_trees_equal({"k": {"x": 1}}, {"k": 1})
    # A tuple reads back as a list, and a numpy scalar as a 0-d array: the same leaves.
    assert_trees_equal({"t": (1, 2)}, {"t": [1, 2]})
    assert_trees_equal({"s": np.float32(1.5)}, {"s": np.array(1.5, np.float32)})
    with pytest.raises(AssertionError, match=r"s: a is float32\[\], b is float64\[\]"):
        assert_trees_equal({"s": np.float32(1.5)}, {"s": np.float64(1.5)})
    big = 2**100
    with pytest.raises(AssertionError, match=f"n: int: a={big}, b={big + 1}"):
        assert_trees_equal({"n": big}, {"n": big + 1})


def test_tolerances_apply_to_floats_only():
    a = {"w": np.float32([1.0, 2.0]), "f": 1.0, "i": np.int64([5])}
    b = {"w": np.float32([1.0, 2.0000002]), "f": 1.0000001, "i": np.int64([5])}
    with pytest.raises(AssertionError, match="2 of 3 leaves differ"):
        assert_trees_equal(a, b)
    assert_trees_equal(a, b, rtol=1e-6)
    with pytest.raises(AssertionError, match=r"trees differ: 1 of 3 leaves differ \(rtol=1e-06"):
        assert_trees_equal(a, {**b, "i": np.int64([6])}, rtol=1e-6)
    with pytest.raises(AssertionError, match=r"w: float32\[2\]: 1 of 2 elements differ, max "
                                             r"\|a-b\| = 1.0"):
        assert_trees_equal(a, {**b, "w": np.float32([1.0, 3.0])}, rtol=1e-6)
    inf = {"w": np.float32([np.inf, np.nan])}
    assert_trees_equal(inf, {"w": np.float32([np.inf, np.nan])}, atol=1e-3)


def test_report_is_capped_with_a_count():
    a = {f"k{i:03d}": i for i in range(120)}
    b = {f"k{i:03d}": i + 1 for i in range(120)}
    with pytest.raises(TreesDifferError) as e:
        assert_trees_equal(a, b, max_report=10)
    lines = str(e.value).splitlines()
    assert lines[0] == "trees differ: 120 of 120 leaves differ (bit for bit)"
    assert lines[1] == "  k000: int: a=0, b=1"
    assert lines[-1] == "  ... and 110 more differing leaves"
    assert len(e.value.differences) == 120


class _Counter:
    """A Stateful object: converted through its state dict like any framework object."""

    def __init__(self, n: int):
        self.n = n

    def state_dict(self):
        return {"n": self.n, "hist": np.arange(self.n, dtype=np.int32)}

    def load_state_dict(self, sd):
        self.n = sd["n"]


def test_objects_are_compared_through_their_state_trees():
    assert_trees_equal({"c": _Counter(3)}, {"c": {"n": 3, "hist": np.arange(3, dtype=np.int32)}})
    with pytest.raises(AssertionError, match=r"c/hist: a is int32\[3\], b is int32\[4\]"):
        assert_trees_equal({"c": _Counter(3)}, {"c": _Counter(4)})
    with pytest.raises(unickpt.UnsupportedLeafError, match="cannot compare x"):
        assert_trees_equal({"x": object()}, {"x": 1})


def test_sharded_and_lazy_leaves_compare_as_their_global_arrays():
    from unickpt.tree import LazyArray, Piece, ShardedArray

    full = np.arange(8.0).reshape(2, 4)
    sharded = ShardedArray((2, 4), full.dtype, [Piece(((0, 2), (0, 2)), full[:, :2]),
                                                Piece(((0, 2), (2, 4)), full[:, 2:])])
    lazy = LazyArray((2, 4), full.dtype, lambda: full.copy())
    assert_trees_equal({"x": sharded}, {"x": full})
    assert_trees_equal({"x": lazy}, {"x": sharded})
    changed = full.copy()
    changed[1, 3] = -1
    with pytest.raises(AssertionError, match=r"first at \[1, 3\]: a=7.0, b=-1.0"):
        assert_trees_equal({"x": sharded}, {"x": changed})


def test_torch_objects_are_compared_through_the_torch_adapter():
    torch = pytest.importorskip("torch")
    pytest.importorskip("unickpt_torch.adapter")
    torch.manual_seed(0)
    a = torch.nn.Linear(3, 2)
    torch.manual_seed(0)
    b = torch.nn.Linear(3, 2)
    assert_trees_equal({"m": a, "o": torch.optim.SGD(a.parameters(), lr=0.1)},
                       {"m": b, "o": torch.optim.SGD(b.parameters(), lr=0.1)})
    with torch.no_grad():
        b.weight[1, 2] += 1
    with pytest.raises(TreesDifferError) as e:
        assert_trees_equal({"m": a, "o": torch.optim.SGD(a.parameters(), lr=0.1)},
                           {"m": b, "o": torch.optim.SGD(b.parameters(), lr=0.2)})
    assert e.value.paths == ["m/weight", "o/param_groups/0/lr"]
    assert "  m/weight: float32[2, 3]: 1 of 6 elements differ" in str(e.value)
    assert "first at [1, 2]" in str(e.value)
    assert "  o/param_groups/0/lr: float: a=0.1, b=0.2" in str(e.value)
    zeros = torch.zeros(2, dtype=torch.bfloat16)
    with pytest.raises(AssertionError, match=r"<root>: bfloat16\[2\]: 1 of 2 elements differ, "
                                             r"max \|a-b\| = 0.0 \(equal values, different bits"):
        assert_trees_equal(zeros, torch.tensor([0.0, -0.0], dtype=torch.bfloat16))


def test_jax_pytrees_are_compared_through_the_jax_adapter():
    jnp = pytest.importorskip("jax.numpy")
    optax = pytest.importorskip("optax")
    pytest.importorskip("unickpt_jax.adapter")
    p = {"w": jnp.ones(3), "b": jnp.zeros((), jnp.bfloat16)}
    assert_trees_equal(optax.adam(1e-3).init(p), optax.adam(1e-3).init(p))
    assert_trees_equal(p, {"w": np.ones(3, np.float32), "b": np.zeros((), ml_dtypes.bfloat16)})
    with pytest.raises(AssertionError, match=r"^trees differ: 1 of 2 leaves differ \(bit for "
                                             r"bit\)\n  w: float32\[3\]: 1 of 3 elements differ, "
                                             r"max \|a-b\| = 1.0, first at \[1\]: a=1.0, b=2.0$"):
        assert_trees_equal(p, {**p, "w": jnp.array([1.0, 2.0, 1.0])})


def test_a_broken_adapter_of_another_loaded_framework_does_not_block_comparison(monkeypatch):
    import fractions

    from unickpt import adapters

    def broken():
        raise ImportError("No module named 'fake_adapter_impl'")

    plugins = adapters.plugins()
    monkeypatch.setattr(adapters, "_plugins", plugins)
    monkeypatch.setattr(adapters, "_type_cache", {})
    # "fractions" is imported, so this adapter is asked about every unknown object
    adapters.register_adapter(adapters.Plugin("fake", ("fractions",), load=broken))
    assert_trees_equal({"c": _Counter(2)}, {"c": _Counter(2)})
    with pytest.raises(unickpt.AdapterError, match="the fake adapter needs its framework"):
        assert_trees_equal({"f": fractions.Fraction(1, 2)}, {"f": 1})


def test_long_scalars_are_cut_short_in_the_report():
    with pytest.raises(AssertionError) as e:
        assert_trees_equal({"s": "x" * 500}, {"s": "x" * 499 + "y"})
    line = str(e.value).splitlines()[1]
    assert line == f"  s: str: a='{'x' * 119}... (502 chars), b='{'x' * 119}... (502 chars)"
