"""Bitwise-identical resumption of PyTorch training, interrupted in-process and by SIGKILL.

For generated training configurations and interruption points, training N steps without
interruption and training with interruptions + restore must end in bit-identical model
parameters and buffers, optimizer state, scheduler state, sampler position and global RNG.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace

import pytest
import torch
from _torch_helpers import assert_bitwise_equal
from _torch_trainer import Config, _latest, train
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import unickpt

HERE = os.path.dirname(os.path.abspath(__file__))
# 100 generated schedules in the default run (CI); UNICKPT_TORCH_RESUME_EXAMPLES=300+ nightly
RESUME_EXAMPLES = int(os.environ.get("UNICKPT_TORCH_RESUME_EXAMPLES", "100"))


@pytest.fixture(autouse=True)
def _deterministic():
    # Deterministic kernels: a resumed run must take the same code paths bit for bit.
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@st.composite
def configs(draw) -> Config:
    steps = draw(st.integers(4, 12))
    return Config(
        width=draw(st.sampled_from([3, 8, 16])),
        depth=draw(st.integers(1, 3)),
        dropout=draw(st.sampled_from([0.0, 0.3])),
        optimizer=draw(st.sampled_from(["sgd", "sgd_momentum", "adam", "adamw", "rmsprop"])),
        scheduler=draw(st.sampled_from(["none", "step", "warmup_cosine", "onecycle"])),
        accum=draw(st.integers(1, 3)),
        clip=draw(st.sampled_from([None, 0.5])),
        batch_size=draw(st.sampled_from([1, 3, 4, 7])),
        shuffle=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
        steps=steps,
        save_every=draw(st.integers(1, 4)),
        n_samples=draw(st.sampled_from([10, 24])),
    )


@st.composite
def schedules(draw) -> tuple[Config, list[int]]:
    """A config and 1-3 increasing interruption steps, often right at or next to a save."""
    cfg = draw(configs())
    near_save = [s + d for s in range(cfg.save_every, cfg.steps, cfg.save_every)
                 for d in (-1, 0, 1)]
    candidates = sorted({c for c in near_save if 1 <= c < cfg.steps})
    point = st.integers(1, cfg.steps - 1)
    if candidates:
        point = st.one_of(st.sampled_from(candidates), point)
    cuts = draw(st.lists(point, min_size=1, max_size=3, unique=True))
    return cfg, sorted(cuts)


def _interrupted(cfg: Config, root: str, cuts: list[int]) -> dict:
    for i, cut in enumerate(cuts):
        # A run that resumes starts from different weights and RNG: restore must overwrite them.
        seed = 1234 if _latest(root) is None else 777 + i
        assert train(cfg, root, stop_at=cut, init_seed=seed) is None
    restored_from = _latest(root)
    final = train(cfg, root, init_seed=1234 if restored_from is None else 4321)
    assert final is not None
    return final


@settings(max_examples=RESUME_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(schedules())
def test_interrupted_training_resumes_bit_for_bit(tmp_path_factory, schedule):
    cfg, cuts = schedule
    ref = train(cfg, str(tmp_path_factory.mktemp("ref")))
    got = _interrupted(cfg, str(tmp_path_factory.mktemp("cut")), cuts)
    assert got["step"] == ref["step"] == cfg.steps
    assert_bitwise_equal(got, ref)


def test_a_broken_restore_is_detected(tmp_path):
    # The comparison has teeth: losing the optimizer state on resume must be caught.
    cfg = Config(optimizer="adam", steps=6, save_every=2, dropout=0.3)
    ref = train(cfg, str(tmp_path / "ref"))
    root = str(tmp_path / "cut")
    train(cfg, root, stop_at=3)
    ckpt = _latest(root)
    tree = unickpt.load(ckpt)
    tree["optimizer"]["state"] = {}
    unickpt.save(ckpt, tree, overwrite=True)
    got = train(cfg, root, init_seed=99)
    with pytest.raises(AssertionError):
        assert_bitwise_equal(got, ref)


def test_checkpoint_contents_are_named_and_complete(tmp_path):
    cfg = Config(depth=2, dropout=0.3, steps=3, save_every=3)
    train(cfg, str(tmp_path))
    kinds = unickpt.inspect(tmp_path / "step_3").kinds
    assert kinds["model"] == "torch:torch.nn.Module"
    assert kinds["optimizer"] == "torch:torch.optim.Optimizer"
    assert kinds["scheduler"] == "torch:torch.optim.lr_scheduler.LRScheduler"
    tree = unickpt.load(tmp_path / "step_3")
    assert sorted(tree["optimizer"]["state"]) == ["0.bias", "0.weight", "3.bias", "3.weight",
                                                  "6.bias", "6.weight"]
    assert tree["sampler"] == {"epoch": 0, "pos": 12}


def _run_child(cfg: Config, root: str, kill_after: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "adapters"), HERE,
         os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, os.path.join(HERE, "_torch_trainer.py"), json.dumps(asdict(cfg)),
            root] + ([str(kill_after)] if kill_after is not None else [])
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_sigkilled_trainer_resumes_bit_for_bit(tmp_path):
    cfg = Config(width=16, depth=2, dropout=0.3, optimizer="adamw", accum=2, clip=0.5,
                 steps=12, save_every=3)
    ref = train(cfg, str(tmp_path / "ref"))
    root = str(tmp_path / "run")
    # 1. the trainer SIGKILLs itself right after step 7 (two steps past the last save)
    p = _run_child(cfg, root, kill_after=7)
    _, err = p.communicate(timeout=120)
    assert p.returncode == -signal.SIGKILL, err.decode()
    assert _latest(root).endswith("step_6")
    assert not os.path.exists(root + ".final")
    # 2. the resumed trainer is SIGKILLed from outside at an arbitrary moment (possibly
    #    mid-save), once it has written a checkpoint past step 6
    slow = replace(cfg, step_sleep=0.25)
    p = _run_child(slow, root)
    deadline = time.monotonic() + 120
    while p.poll() is None and _latest(root).endswith("step_6") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert p.poll() is None, p.communicate()[1].decode()  # still training: kill it now
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert not os.path.exists(root + ".final")
    # 3. resume to the end in a fresh process
    p = _run_child(cfg, root)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err.decode()
    final = unickpt.load(root + ".final")
    assert final["step"] == cfg.steps
    assert_bitwise_equal(final, ref)


@pytest.mark.slow
def test_quickstart_example_reports_bitwise_identical(tmp_path):
    example = os.path.join(os.path.dirname(HERE), "examples", "torch_quickstart.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "adapters"),
         os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, example, "--root", str(tmp_path), "--steps", "100"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "killed with SIGKILL at step 55" in out.stdout
    assert "resumed from step 40 (epoch 0, sample 1280)" in out.stdout
    assert out.stdout.rstrip().endswith("bitwise identical to the uninterrupted run")
