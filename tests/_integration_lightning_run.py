"""Lightning training run for tests/test_integration_lightning.py (run as a subprocess).

    kill ROOT K      fit with unickpt checkpoints every 2 steps; SIGKILL itself after step K
    resume ROOT OUT  fit(ckpt_path="last") to the end, save the final state to OUT/resumed,
                     then an uninterrupted fit in a fresh root, final state to OUT/reference
"""

from __future__ import annotations

import os
import signal
import sys

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: E402

import unickpt  # noqa: E402
from unickpt.integrations._codec import encode  # noqa: E402
from unickpt.integrations.lightning import (  # noqa: E402
    ResumableDataLoader,
    UnickptCheckpointIO,
    UnickptResume,
)

MAX_STEPS = 20


class Net(pl.LightningModule):
    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(),
                                       torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.05)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1234)
        x = torch.randn(64, 6, generator=g)
        y = x.sum(1, keepdim=True) + 0.1 * torch.randn(64, 1, generator=g)
        return ResumableDataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8,
                                   shuffle=True)


class KillAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def fit(root: str, ckpt_path: str | None, extra: list) -> tuple[Net, pl.Trainer]:
    pl.seed_everything(7, verbose=False)
    model = Net()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=MAX_STEPS, logger=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, default_root_dir=root,
        plugins=[UnickptCheckpointIO()],
        callbacks=[UnickptResume(), *extra,
                   ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_last=True,
                                   save_top_k=1)])
    trainer.fit(model, ckpt_path=ckpt_path)
    return model, trainer


def final_state(model: Net, trainer: pl.Trainer) -> dict:
    return {"model": dict(model.state_dict()),
            "optimizer": trainer.optimizers[0].state_dict(),
            "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
            "global_step": trainer.global_step}


def save(path: str, state: dict) -> None:
    tree, _ = encode(state)
    unickpt.save(path, tree)


def main() -> None:
    mode, root = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    if mode == "kill":
        fit(root, None, [KillAt(int(sys.argv[3]))])
        raise SystemExit("not killed")
    out = sys.argv[3]
    model, trainer = fit(root, "last", [])
    save(os.path.join(out, "resumed"), final_state(model, trainer))
    model, trainer = fit(os.path.join(out, "reference_root"), None, [])
    save(os.path.join(out, "reference"), final_state(model, trainer))
    print("done", trainer.global_step)


if __name__ == "__main__":
    main()
