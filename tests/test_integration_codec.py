"""The integrations' codec: any checkpoint dict built from the supported types survives
encode -> unickpt.save -> unickpt.load -> decode with its types, key types and bits."""

from __future__ import annotations

import collections

import pytest

torch = pytest.importorskip("torch")
hyp = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")

import unickpt  # noqa: E402
from unickpt.integrations._codec import decode, encode  # noqa: E402

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool]


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(_DTYPES))
    shape = draw(st.lists(st.integers(0, 3), max_size=2))
    seed = draw(st.integers(0, 2**16))
    t = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed)) * 100
    return t.to(dtype)


scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=False), st.text(max_size=5), st.binary(max_size=5))
leaves = st.one_of(scalars, tensors(), st.sampled_from([torch.float16, torch.device("cpu"),
                                                        torch.Size([2, 3])]))
keys = st.one_of(st.text(max_size=4), st.integers(-5, 50))


def _dicts(children):
    def build(pairs, ordered):
        seen, out = set(), []
        for k, v in pairs:  # keys that differ only in type (1 and "1") are refused: skip
            if str(k) not in seen:
                seen.add(str(k))
                out.append((k, v))
        return collections.OrderedDict(out) if ordered else dict(out)
    return st.builds(build, st.lists(st.tuples(keys, children), max_size=4), st.booleans())


trees = st.recursive(leaves, lambda c: st.one_of(st.lists(c, max_size=3),
                                                 st.lists(c, max_size=3).map(tuple),
                                                 _dicts(c)), max_leaves=12)


def _same(a, b, path="") -> None:
    assert type(a) is type(b), f"{path}: {type(a)} vs {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        if a.numel():
            bits = [t.contiguous().reshape(-1).view(torch.uint8).tolist() for t in (a, b)]
            assert bits[0] == bits[1], path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            _same(a[k], b[k], f"{path}/{k!r}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}/{i}")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@hyp.settings(max_examples=40, deadline=None)
@hyp.given(tree=st.fixed_dictionaries({"ckpt": trees}))
@hyp.example(tree={"ckpt": torch.tensor([])})
@hyp.example(tree={"ckpt": torch.tensor(1.5, dtype=torch.bfloat16)})
@hyp.example(tree={"ckpt": collections.OrderedDict([(3, (torch.ones(2), "a")), ("k", [])])})
def test_codec_round_trip_through_a_checkpoint(tmp_path_factory, tree):
    path = tmp_path_factory.mktemp("c") / "ckpt"
    neutral, schema = encode(tree)
    unickpt.save(path, neutral, metadata={"schema": schema})
    back = decode(unickpt.load(path), unickpt.inspect(path).metadata["schema"])
    _same(tree, back)
