"""PyTorch data loading in a real training loop: interrupted mid-epoch, resumed in fresh objects.

Every kind of loader is run three times: uninterrupted; interrupted after ``stop`` steps (the
objects are abandoned, as a killed process would leave them); resumed from the checkpoint
with freshly built objects.  The resumed run must see exactly the batches the uninterrupted
run saw after step ``stop`` (the rest of the interrupted epoch and the later epochs) and end
with bitwise equal weights.  The dataset adds random noise in ``__getitem__``, so worker (and
main-process) random state must be resumed too.
"""

from __future__ import annotations

import pytest
import torch
import unickpt_torch.data  # noqa: F401  (tracks loaders built from here on)
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

import unickpt
from unickpt.errors import UnsupportedLeafError

# Workers are forked; when another test of the session has imported JAX, JAX warns at every
# fork (it is multithreaded). These workers run torch code only.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:os.fork\(\) was called:RuntimeWarning")

N, BATCH, EPOCHS = 11, 3, 3  # 4 batches per epoch, the last one short


class Noisy(Dataset):
    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        x = torch.full((4,), float(i)) + torch.rand(4)  # augmentation: random per sample
        return i, x, torch.tensor([i % 3], dtype=torch.float32)


def _collate(items):
    return torch.utils.data.default_collate(items)


def make(kind: str, workers: int):
    """(iterable of batches, object put in the state, per-epoch hook)."""
    ds = Noisy()
    g = torch.Generator().manual_seed(7)
    if kind == "shuffle":
        dl = DataLoader(ds, batch_size=BATCH, shuffle=True, generator=g, num_workers=workers)
        return dl, dl, None
    if kind == "sequential":
        dl = DataLoader(ds, batch_size=BATCH, num_workers=workers, generator=g)
        return dl, dl, None
    if kind == "batch_sampler":
        bs = BatchSampler(RandomSampler(ds, generator=g), BATCH, drop_last=False)
        dl = DataLoader(ds, batch_sampler=bs, num_workers=workers,
                        generator=torch.Generator().manual_seed(3))
        return dl, dl, None
    if kind == "distributed":
        ds_s = DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=5)
        dl = DataLoader(ds, batch_size=2, sampler=ds_s, num_workers=workers, generator=g)
        return dl, dl, ds_s.set_epoch
    if kind == "sampler_by_hand":  # no DataLoader: the loop indexes the dataset itself
        bs = BatchSampler(RandomSampler(ds, generator=g), BATCH, drop_last=False)
        batches = _ByHand(ds, bs)
        return batches, bs, None
    if kind == "sequential_by_hand":
        bs = BatchSampler(SequentialSampler(ds), BATCH, drop_last=False)
        return _ByHand(ds, bs), bs, None
    raise AssertionError(kind)


class _ByHand:
    def __init__(self, ds, bs):
        self.ds, self.bs = ds, bs

    def __iter__(self):
        for idxs in self.bs:
            yield _collate([self.ds[i] for i in idxs])


def train(root, kind: str, workers: int, stop: int | None = None):
    """Run the loop; returns (batch indices seen, final weights or None when stopped)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches, data_obj, set_epoch = make(kind, workers)
    state = {"model": model, "opt": opt, "data": data_obj, "rng": unickpt.RNG(), "epoch": 0}
    seen: list[list[int]] = []
    with unickpt.CheckpointManager(root, resume="auto", save_every=1, keep_last=2) as mgr:
        restored = mgr.restore(state)
        step, start = restored.step, restored.state["epoch"]
        for epoch in range(start, EPOCHS):
            state["epoch"] = epoch
            if set_epoch is not None:
                set_epoch(epoch)
            for idx, x, y in batches:
                loss = torch.nn.functional.mse_loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                seen.append(idx.tolist())
                mgr.save(step, state)
                if step == stop:
                    return seen, None
    return seen, model.weight.detach().clone()


KINDS = ["shuffle", "sequential", "batch_sampler", "distributed"]


# Interrupted mid-epoch (2, 6) and right after an epoch's last batch (4); with workers (slow
# to start) once, mid-epoch.
CASES = [(k, 0, stop) for k in KINDS for stop in (2, 4, 6)] + [(k, 2, 6) for k in KINDS]


@pytest.mark.parametrize(("kind", "workers", "stop"), CASES)
def test_loader_resumes_mid_epoch_with_exactly_the_remaining_batches(tmp_path, kind, workers,
                                                                     stop):
    ref, w_ref = train(tmp_path / "ref", kind, workers)
    first, _ = train(tmp_path / "run", kind, workers, stop=stop)
    assert first == ref[:stop]
    rest, w = train(tmp_path / "run", kind, workers)
    assert rest == ref[stop:]
    assert torch.equal(w, w_ref)
    assert w.numpy().tobytes() == w_ref.numpy().tobytes()


@pytest.mark.parametrize("kind", ["sampler_by_hand", "sequential_by_hand"])
def test_samplers_iterated_by_hand_resume_mid_epoch(tmp_path, kind):
    ref, w_ref = train(tmp_path / "ref", kind, 0)
    train(tmp_path / "run", kind, 0, stop=5)
    rest, w = train(tmp_path / "run", kind, 0)
    assert rest == ref[5:]
    assert w.numpy().tobytes() == w_ref.numpy().tobytes()


def test_random_sampler_without_generator_is_refused_with_the_fix():
    dl = DataLoader(Noisy(), batch_size=2, shuffle=True)
    with pytest.raises(UnsupportedLeafError, match=r"loader.*generator=torch.Generator"):
        unickpt.state.to_tree({"loader": dl})


def test_loader_position_and_epoch_are_stored_as_plain_data():
    ds = DistributedSampler(Noisy(), num_replicas=2, rank=0, seed=1)
    ds.set_epoch(4)
    dl = DataLoader(Noisy(), batch_size=2, sampler=ds, generator=torch.Generator())
    it = iter(dl)
    next(it), next(it)
    tree, kinds = unickpt.state.to_tree({"loader": dl})
    assert tree["loader"]["epoch"] == 4 and tree["loader"]["position"] == 2
    assert kinds[("loader",)] == "torch:torch.utils.data.DataLoader"
    fresh = DataLoader(Noisy(), batch_size=2, sampler=DistributedSampler(
        Noisy(), num_replicas=2, rank=0, seed=1), generator=torch.Generator())
    unickpt.state.restore_tree({"loader": fresh}, tree)
    assert fresh.sampler.epoch == 4
    assert [b[0].tolist() for b in fresh] == [b[0].tolist() for b in it]


def test_restored_loader_saved_before_it_is_iterated_keeps_its_position():
    def mk():
        return DataLoader(Noisy(), batch_size=2, shuffle=True,
                          generator=torch.Generator().manual_seed(1))
    dl = mk()
    it = iter(dl)
    next(it), next(it), next(it)
    tree, _ = unickpt.state.to_tree({"loader": dl})
    fresh = mk()
    unickpt.state.restore_tree({"loader": fresh}, tree)
    again, _ = unickpt.state.to_tree({"loader": fresh})  # e.g. a save right after restore
    assert again["loader"]["position"] == 3
    other = mk()
    unickpt.state.restore_tree({"loader": other}, again)
    assert [b[0].tolist() for b in other] == [b[0].tolist() for b in it]


def test_loader_built_before_tracking_is_refused_with_the_fix(monkeypatch):
    dl = DataLoader(Noisy(), batch_size=2)
    dl.__dict__.pop("_unickpt_seen")  # as if built before unickpt_torch.data was imported
    with pytest.raises(UnsupportedLeafError,
                       match=r"cannot save loader: .*import unickpt_torch.data"):
        unickpt.state.to_tree({"loader": dl})
