"""HF Transformers integration: a 2-layer BERT trained by UnickptTrainer, SIGKILLed,
resumed with ``train(resume_from_checkpoint=True)``: bitwise equal, retention respected."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("torch")

from _integration_helpers import run_script  # noqa: E402

import unickpt  # noqa: E402
from unickpt.integrations.transformers import newest_verified  # noqa: E402
from unickpt.testing import assert_trees_equal  # noqa: E402


def _steps(root: str) -> list[int]:
    return [c.step for c in unickpt.CheckpointManager(root).checkpoints()]


def test_newest_verified_skips_a_damaged_newest_checkpoint(tmp_path):
    for step in (2, 4):
        unickpt.save(tmp_path / f"step_{step}", {"w": np.full(256, step, np.float32)})
    data = max((tmp_path / "step_4").iterdir(), key=lambda p: p.stat().st_size)
    with open(data, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\xff\xff\xff\xff")
    with pytest.warns(UserWarning, match=r"step_4 fails verification"):
        assert newest_verified(str(tmp_path)) == str(tmp_path / "step_2")
    assert newest_verified(str(tmp_path / "empty")) is None


def _tiny_trainer(root, **kw):
    import transformers

    from unickpt.integrations.transformers import UnickptTrainer

    cfg = transformers.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
                                  num_attention_heads=1, intermediate_size=8,
                                  max_position_embeddings=8)
    args = transformers.TrainingArguments(output_dir=str(root), use_cpu=True, report_to=[],
                                          disable_tqdm=True, **kw)
    return UnickptTrainer(model=transformers.BertForSequenceClassification(cfg), args=args,
                          train_dataset=[])


def test_resume_without_checkpoint_and_unsupported_options_are_typed_errors(tmp_path):
    with pytest.raises(unickpt.CheckpointNotFoundError,
                       match=r"holds no committed, verified unickpt checkpoint"):
        _tiny_trainer(tmp_path).train(resume_from_checkpoint=True)
    with pytest.raises(unickpt.ConfigError, match=r"does not support save_only_model"):
        _tiny_trainer(tmp_path, save_only_model=True).train()
    assert os.listdir(tmp_path) == []  # nothing created before the checks


def test_import_unickpt_imports_no_integration_framework():
    code = ("import sys, unickpt, unickpt.integrations; "
            "print(sorted(m for m in ('torch', 'transformers', 'accelerate', "
            "'pytorch_lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.slow
def test_trainer_killed_and_resumed_is_bitwise_equal(tmp_path):
    root, out = str(tmp_path / "root"), str(tmp_path / "out")
    killed = run_script("_integration_transformers_run.py", "kill", root, "10")
    assert killed.returncode == -9, killed.stdout[-3000:]
    assert _steps(root) == [4, 8]  # save_steps=4, save_total_limit=2
    assert not [n for n in os.listdir(root) if n.startswith("checkpoint-")]  # no pickles
    ckpt = unickpt.load(os.path.join(root, "step_8"))  # plain unickpt reads it
    assert '"global_step": 8' in ckpt["trainer_state"]
    assert ckpt["model"]["bert.encoder.layer.1.attention.self.query.weight"].shape == (32, 32)
    cli = subprocess.run([sys.executable, "-m", "unickpt", "inspect",
                          os.path.join(root, "step_8")], capture_output=True, text=True,
                         timeout=120)
    assert cli.returncode == 0 and "exp_avg_sq" in cli.stdout, cli.stdout + cli.stderr
    resumed = run_script("_integration_transformers_run.py", "resume", root, out)
    assert resumed.returncode == 0 and "done 18" in resumed.stdout, resumed.stdout[-3000:]
    a, b = unickpt.load(os.path.join(out, "resumed")), unickpt.load(os.path.join(out, "reference"))
    assert a["step"] == b["step"] == 18
    assert_trees_equal(a, b)  # weights, AdamW state, schedule: bit for bit
    assert _steps(os.path.join(out, "reference_root")) == [16, 18]  # save_total_limit=2
    # save_total_limit holds for the resumed run too: the checkpoint it resumed from is
    # protected only until a newer one is committed (docs/manager.md)
    assert _steps(root) == [16, 18]
