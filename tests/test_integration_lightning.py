"""Lightning integration: pickle-free checkpoints through the CheckpointIO plugin, and a
SIGKILLed ``fit`` resumed with ``ckpt_path="last"`` bitwise equal to an uninterrupted one."""

from __future__ import annotations

import collections
import os
import subprocess
import sys

import numpy as np
import pytest

pl = pytest.importorskip("pytorch_lightning")
torch = pytest.importorskip("torch")

from _integration_helpers import run_script  # noqa: E402

import unickpt  # noqa: E402
from unickpt.integrations._codec import decode, encode  # noqa: E402
from unickpt.integrations.lightning import UnickptCheckpointIO  # noqa: E402
from unickpt.testing import assert_trees_equal  # noqa: E402


def _lightning_like() -> dict:
    sd = collections.OrderedDict(w=torch.arange(6, dtype=torch.float32).reshape(2, 3),
                                 b=torch.tensor([1.5], dtype=torch.bfloat16))
    sd._metadata = {"": {"version": 1}}
    return {
        "epoch": 1, "global_step": 10, "pytorch-lightning_version": pl.__version__,
        "state_dict": sd,
        "optimizer_states": [{"state": {0: {"step": torch.tensor(10.0),
                                            "exp_avg": torch.ones(2, 3)}},
                              "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999),
                                                "params": [0, 1]}]}],
        "lr_schedulers": [{"last_epoch": 10, "base_lrs": [0.01], "lr_lambdas": [None]}],
        "loops": {"fit_loop": {"epoch_progress": {"current": {"ready": 2}}}},
        "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_score": None,
                                                          "kth_value": torch.tensor(float("inf"))}},
        "hyper_parameters": {"lr": 0.01, "dtype": torch.float16, "size": torch.Size([2, 3])},
    }


def test_plugin_round_trip_types_and_bits(tmp_path):
    io = UnickptCheckpointIO()
    ckpt = _lightning_like()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(ckpt, path)
    back = io.load_checkpoint(path)
    sd = back["state_dict"]
    assert type(sd) is collections.OrderedDict and sd._metadata == {"": {"version": 1}}
    assert sd["b"].dtype == torch.bfloat16 and torch.equal(sd["b"], ckpt["state_dict"]["b"])
    assert list(back["optimizer_states"][0]["state"]) == [0]  # int keys come back as ints
    assert back["optimizer_states"][0]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert back["hyper_parameters"]["dtype"] is torch.float16
    assert back["hyper_parameters"]["size"] == torch.Size([2, 3])
    assert back["lr_schedulers"][0]["lr_lambdas"] == [None]
    assert torch.isinf(back["callbacks"]["ModelCheckpoint{'monitor': None}"]["kth_value"])
    # overwriting "last.ckpt" replaces it atomically; plain unickpt tools read it
    ckpt["global_step"] = 12
    io.save_checkpoint(ckpt, path)
    plain = unickpt.load(path)
    assert plain["global_step"] == 12
    assert plain["optimizer_states"][0]["state"]["0"]["exp_avg"].dtype == np.float32
    assert unickpt.verify(path).ok
    io.remove_checkpoint(path)
    assert not os.path.exists(path) and os.listdir(tmp_path) == []


def test_plugin_refuses_unstorable_values_naming_the_key(tmp_path):
    ckpt = _lightning_like()
    ckpt["hyper_parameters"]["loss_fn"] = lambda x: x
    with pytest.raises(unickpt.UnsupportedLeafError,
                       match=r"hyper_parameters/loss_fn of the Lightning checkpoint .*last\.ckpt"):
        UnickptCheckpointIO().save_checkpoint(ckpt, tmp_path / "last.ckpt")
    assert os.listdir(tmp_path) == []  # nothing written, not even a temp directory
    with pytest.raises(unickpt.UnsupportedLeafError, match=r"dict key \(1, 2\) is a tuple"):
        encode({"state": {(1, 2): 3}})
    with pytest.raises(TypeError, match="storage_options"):
        UnickptCheckpointIO().save_checkpoint({}, tmp_path / "x.ckpt", storage_options={})


def test_plugin_load_verifies(tmp_path):
    path = tmp_path / "last.ckpt"
    UnickptCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(64)}}, path)
    data = [f for f in os.listdir(path) if f != "manifest.msgpack" and
            os.path.getsize(path / f) >= 256]
    assert data, os.listdir(path)
    with open(path / data[0], "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\x00\x01\x02\x03\x04\x05\x06\x07")
    with pytest.raises(unickpt.CorruptCheckpointError, match="state_dict/w"):
        UnickptCheckpointIO().load_checkpoint(path)
    with pytest.raises(unickpt.CheckpointNotFoundError):
        UnickptCheckpointIO().load_checkpoint(tmp_path / "missing.ckpt")


def test_codec_keeps_exact_bits_of_every_dtype():
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8,
              torch.uint8, torch.int64, torch.bool, torch.float8_e4m3fn]
    g = torch.Generator().manual_seed(0)
    src = {str(d): torch.randn(3, 2, generator=g).to(d) for d in dtypes}
    src["scalar"] = torch.tensor(3.25)
    tree, schema = encode(src)
    back = decode(unickpt_roundtrip(tree), schema)
    for k, t in src.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape
        assert back[k].reshape(-1).view(torch.uint8).tolist() == \
            t.reshape(-1).view(torch.uint8).tolist(), k


def unickpt_roundtrip(tree):
    import tempfile

    path = os.path.join(tempfile.mkdtemp(), "c")
    unickpt.save(path, tree)
    return unickpt.load(path)


@pytest.mark.slow
def test_fit_killed_and_resumed_from_last_is_bitwise_equal(tmp_path):
    root, out = str(tmp_path / "root"), str(tmp_path / "out")
    killed = run_script("_integration_lightning_run.py", "kill", root, "11")
    assert killed.returncode == -9, killed.stdout[-3000:]
    assert sorted(os.listdir(root)) == ["epoch=1-step=10.ckpt", "last.ckpt"]
    last = os.path.join(root, "last.ckpt")
    plain = unickpt.load(last)  # plain unickpt reads Lightning's checkpoint
    assert plain["global_step"] == 10 and "net.0.weight" in plain["state_dict"]
    cli = subprocess.run([sys.executable, "-m", "unickpt", "inspect", last],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "exp_avg: float32[16, 6]" in cli.stdout and "net.0.weight" in cli.stdout
    resumed = run_script("_integration_lightning_run.py", "resume", root, out)
    assert resumed.returncode == 0 and "done 20" in resumed.stdout, resumed.stdout[-3000:]
    a, b = unickpt.load(os.path.join(out, "resumed")), unickpt.load(os.path.join(out, "reference"))
    assert a["global_step"] == b["global_step"] == 20
    assert_trees_equal(a, b)  # weights, AdamW moments and steps, scheduler: bit for bit
    assert a["optimizer"]["state"]["0"]["exp_avg"].any()
