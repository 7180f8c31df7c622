"""torchdata's StatefulDataLoader inside a real training loop, interrupted mid-epoch.

The loader is a Stateful object: unickpt stores its ``state_dict()`` (with ``num_workers=2``
that holds each worker's state) as plain data and arrays and gives it back through
``load_state_dict``.  The resumed run must see exactly the remaining batches and end bitwise
equal to the uninterrupted run.
"""

from __future__ import annotations

import pytest
import torch

import unickpt

sdl = pytest.importorskip("torchdata.stateful_dataloader")

# Workers are forked; when another test of the session has imported JAX, JAX warns at every
# fork (it is multithreaded). These workers run torch code only.
pytestmark = [
    pytest.mark.filterwarnings(r"ignore:os.fork\(\) was called:RuntimeWarning"),
    pytest.mark.filterwarnings(  # torchdata 0.11 on torch >= 2.10
        "ignore:'set_vital' is deprecated:UserWarning")]

N, BATCH, EPOCHS = 11, 3, 3


class Noisy(torch.utils.data.Dataset):
    def __init__(self, noise: bool):
        self.noise = noise

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        x = torch.full((4,), float(i))
        if self.noise:  # random augmentation, drawn in the process that loads the sample
            x = x + torch.rand(4)
        return i, x, torch.tensor([i % 3.0])


def train(root, workers: int, stop: int | None = None):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader = sdl.StatefulDataLoader(Noisy(noise=workers == 0), batch_size=BATCH, shuffle=True,
                                    num_workers=workers,
                                    generator=torch.Generator().manual_seed(7))
    state = {"model": model, "opt": opt, "loader": loader, "rng": unickpt.RNG(), "epoch": 0}
    seen = []
    with unickpt.CheckpointManager(root, resume="auto", save_every=1, keep_last=2) as mgr:
        restored = mgr.restore(state)
        step, start = restored.step, restored.state["epoch"]
        for epoch in range(start, EPOCHS):
            state["epoch"] = epoch
            for idx, x, y in loader:
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


@pytest.mark.parametrize("workers", [0, 2])
def test_stateful_dataloader_resumes_exactly_the_remaining_batches(tmp_path, workers):
    # Interrupted in the last epoch: what follows is the rest of that epoch (see below).
    # With workers the data is noise-free: torchdata 0.11 reseeds the workers' RNGs on
    # resume (a new base seed), so random augmentation in workers is not replayed.
    ref, w_ref = train(tmp_path / "ref", workers)
    first, _ = train(tmp_path / "run", workers, stop=10)
    assert first == ref[:10]
    rest, w = train(tmp_path / "run", workers)
    assert rest == ref[10:]
    assert w.numpy().tobytes() == w_ref.numpy().tobytes()
    if workers:  # the worker states really are in the checkpoint
        tree = unickpt.load(unickpt.CheckpointManager(tmp_path / "run").latest().path)
        assert tree["loader"]["_snapshot"]["_worker_snapshots"]


@pytest.mark.xfail(strict=True, reason=(
    "torchdata 0.11: after load_state_dict the epochs that follow the resumed one are shuffled "
    "differently from an uninterrupted run; reproduced with torchdata alone (state_dict -> "
    "load_state_dict in one process, no unickpt), also when the loader's generator is restored"))
def test_stateful_dataloader_later_epochs_match():
    def mk():
        return sdl.StatefulDataLoader(list(range(N)), batch_size=BATCH, shuffle=True,
                                      generator=torch.Generator().manual_seed(7))
    loader = mk()
    ref = [b.tolist() for _ in range(EPOCHS) for b in loader]
    loader = mk()
    it = iter(loader)
    [next(it) for _ in range(2)]
    tree, _ = unickpt.state.to_tree({"loader": loader})
    fresh = mk()
    unickpt.state.restore_tree({"loader": fresh}, tree)
    rest = [b.tolist() for _ in range(EPOCHS) for b in fresh]
    assert rest[:len(ref) - 2] == ref[2:]
