"""HF Trainer run for tests/test_integration_transformers.py (run as a subprocess).

    kill ROOT K      train a 2-layer BERT with UnickptTrainer, save every 4 steps, keep 2;
                     SIGKILL itself after step K
    resume ROOT OUT  train(resume_from_checkpoint=True) to the end, final state to
                     OUT/resumed, then an uninterrupted run, final state to OUT/reference
"""

from __future__ import annotations

import os
import signal
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import unickpt  # noqa: E402
from unickpt.integrations._codec import encode  # noqa: E402
from unickpt.integrations.transformers import UnickptTrainer  # noqa: E402


class Synthetic(torch.utils.data.Dataset):
    def __init__(self, n: int = 48) -> None:
        g = torch.Generator().manual_seed(11)
        self.ids = torch.randint(5, 100, (n, 12), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(12, dtype=torch.long),
                "labels": self.labels[i]}


class KillAt(transformers.TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def trainer(root: str, callbacks: list) -> UnickptTrainer:
    transformers.set_seed(42)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=32, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg)
    args = transformers.TrainingArguments(
        output_dir=root, per_device_train_batch_size=8, num_train_epochs=3,
        learning_rate=1e-3, warmup_steps=2, weight_decay=0.01, save_strategy="steps",
        save_steps=4, save_total_limit=2, logging_strategy="no", report_to=[], use_cpu=True,
        seed=42, dataloader_num_workers=0, disable_tqdm=True)
    return UnickptTrainer(model=model, args=args, train_dataset=Synthetic(),
                          callbacks=callbacks)


def final(t: UnickptTrainer) -> dict:
    tree, _ = encode({"model": dict(t.model.state_dict()), "optimizer": t.optimizer.state_dict(),
                      "scheduler": t.lr_scheduler.state_dict(), "step": t.state.global_step})
    return tree


def main() -> None:
    torch.set_num_threads(1)
    mode, root = sys.argv[1], sys.argv[2]
    if mode == "kill":
        trainer(root, [KillAt(int(sys.argv[3]))]).train()
        raise SystemExit("not killed")
    out = sys.argv[3]
    t = trainer(root, [])
    t.train(resume_from_checkpoint=True)
    unickpt.save(os.path.join(out, "resumed"), final(t))
    t = trainer(os.path.join(out, "reference_root"), [])
    t.train()
    unickpt.save(os.path.join(out, "reference"), final(t))
    print("done", t.state.global_step)


if __name__ == "__main__":
    main()
