"""DCP (torch.distributed.checkpoint) interop: ``unickpt convert --to unickpt|dcp``.

The round trip is the real one: 2 gloo ranks train an FSDP2 model and write it with
``dcp.save`` (as torchtitan does); ``unickpt convert`` imports it and exports it back to DCP;
``dcp.load`` restores the export at world size 2 (FSDP2) and 1 (a plain model), and the
gathered parameters and optimizer state equal the saved ones bit for bit.  Every job runs
under a hard timeout in its own process group (tests/_dist_launch.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

pytest.importorskip("torch")

from _bitwise import assert_bitwise_equal  # noqa: E402
from _dist_launch import launch  # noqa: E402

import unickpt  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "_dcp_worker.py")
CONVERT = [sys.executable, "-m", "unickpt", "convert"]


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([*CONVERT, *args], capture_output=True, text=True, timeout=180)
    if check:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def fsdp_dcp(tmp_path_factory):
    """A DCP checkpoint written by 2 FSDP2 ranks, and each rank's gathered state."""
    tmp = tmp_path_factory.mktemp("dcp")
    cfg = {"world": 2, "mode": "save", "dir": str(tmp / "dcp"), "out": str(tmp / "saved")}
    assert launch(cfg, worker=WORKER) == [0, 0]
    return tmp, unickpt.load(f"{cfg['out']}.r0")


def test_fsdp2_dcp_round_trip_restores_at_world_2_and_1(fsdp_dcp):
    import _dcp_worker
    from unickpt_torch.dcp import export_dcp

    tmp, saved = fsdp_dcp
    files = sorted(os.listdir(tmp / "dcp"))
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # both ranks wrote shards
    r = cli(str(tmp / "dcp"), str(tmp / "uni"), "--to", "unickpt")  # with its progress bar
    assert r.stdout.strip() == f"wrote {tmp / 'uni'} (unickpt)"
    uni = unickpt.load(tmp / "uni")
    # the unickpt checkpoint holds the assembled tensors, keyed as dcp.save was given them
    for name, arr in saved["model"].items():
        assert_bitwise_equal(arr, uni["model"][name], ("model", name))
    for name, st in saved["opt"].items():
        for k, v in st.items():
            assert_bitwise_equal(v, uni["optim"]["state"][name][k], ("optim", name, k))
    assert uni["optim"]["param_groups"][0]["lr"] == saved["lr"][0]
    assert unickpt.inspect(tmp / "uni").info["converted_from"] == "dcp"
    export_dcp(tmp / "uni", tmp / "back")  # the CLI's --to dcp runs this (tested below)
    for world in (2, 1):
        cfg = {"world": world, "mode": "load", "dir": str(tmp / "back"),
               "out": str(tmp / f"restored{world}")}
        if world == 1:  # no process group: run the one rank here, saving a launch
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _dcp_worker.run(cfg, 0)
        else:
            assert launch(cfg, worker=WORKER) == [0, 0]
        for rank in range(world):
            assert_bitwise_equal(saved, unickpt.load(f"{cfg['out']}.r{rank}"),
                                 (f"world {world}",))


def test_import_streams_each_tensor_once(fsdp_dcp):
    from unickpt_torch.dcp import convert_total_bytes, import_dcp

    tmp, _ = fsdp_dcp
    seen: list[int] = []
    import_dcp(tmp / "dcp", tmp / "streamed", progress=seen.append)
    # 16 tensors (4 params, their exp_avg/exp_avg_sq/step), each read once, nothing else
    assert len(seen) == 16 and sum(seen) == convert_total_bytes(tmp / "dcp", to="unickpt")
    assert sum(seen) == unickpt.inspect(tmp / "streamed").total_bytes


def test_not_a_dcp_directory(tmp_path):
    from unickpt_torch.dcp import import_dcp

    (tmp_path / "d").mkdir()
    with pytest.raises(unickpt.CheckpointNotFoundError,
                       match=r"is not a torch.distributed.checkpoint \(DCP\) directory: it has "
                             r"no .metadata file"):
        import_dcp(tmp_path / "d", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no DCP checkpoint directory there"):
        import_dcp(tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# A protocol-2 pickle calling os.system("touch MARKER"), assembled by hand (no pickle module).
def _evil(marker: str) -> bytes:
    cmd = f"touch {marker}".encode()
    return (b"\x80\x02cos\nsystem\nX" + len(cmd).to_bytes(4, "little") + cmd
            + b"\x85R.")


# The same through STACK_GLOBAL with the module name taken from the memo.
def _evil_stack(marker: str) -> bytes:
    cmd = f"touch {marker}".encode()

    def s(b: bytes) -> bytes:
        return b"\x8c" + bytes([len(b)]) + b

    return (b"\x80\x04" + s(b"posix") + b"\x94" + s(b"Size") + b"\x94" + b"0"  # POP "Size"
            + b"h\x00" + s(b"system") + b"\x93" + b"X" + len(cmd).to_bytes(4, "little") + cmd
            + b"\x85R.")


@pytest.mark.parametrize(("payload", "named"), [(_evil, "os.system"),
                                               (_evil_stack, "posix.system")],
                         ids=["GLOBAL", "STACK_GLOBAL-via-memo"])
def test_crafted_metadata_is_refused_before_torch_reads_it(tmp_path, payload, named):
    from unickpt_torch.dcp import import_dcp

    marker = tmp_path / "pwned"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / ".metadata").write_bytes(payload(str(marker)))
    with pytest.raises(unickpt.CorruptCheckpointError, match=r"refusing to read it") as e:
        import_dcp(tmp_path / "d", tmp_path / "out")
    assert f"the DCP metadata references {named}, which is not one of DCP's" in str(e.value)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_truncated_metadata_is_a_typed_error(tmp_path):
    from unickpt_torch.dcp import import_dcp

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / ".metadata").write_bytes(b"\x80\x04\x95\x10")
    with pytest.raises(unickpt.CorruptCheckpointError, match="not a valid pickle stream"):
        import_dcp(tmp_path / "d", tmp_path / "out")


def test_export_refuses_existing_destination_and_unsupported_leaves(tmp_path):
    from unickpt_torch.dcp import export_dcp

    unickpt.save(tmp_path / "src", {"w": np.arange(4, dtype=np.int16), "n": 2**70, "s": "x"})
    export_dcp(tmp_path / "src", tmp_path / "dcp")
    with pytest.raises(unickpt.CheckpointExistsError, match="already exists; pass "
                                                            r"overwrite=True \(--overwrite\)"):
        export_dcp(tmp_path / "src", tmp_path / "dcp")
    (tmp_path / "other").mkdir()
    with pytest.raises(FileExistsError, match="is not a DCP checkpoint; refusing to replace"):
        export_dcp(tmp_path / "src", tmp_path / "other", overwrite=True)
    export_dcp(tmp_path / "src", tmp_path / "dcp", overwrite=True)  # atomic replace
    assert sorted(os.listdir(tmp_path)) == ["dcp", "other", "src"]  # no staging left
    r = cli(str(tmp_path / "nothing"), str(tmp_path / "x"), "--to", "dcp", check=False)
    assert r.returncode == 4 and "CheckpointNotFoundError" in r.stderr


def test_truncated_data_file_is_a_typed_error(tmp_path):
    import torch
    import torch.distributed.checkpoint as dcp
    from unickpt_torch.dcp import import_dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.arange(1000.0)}, checkpoint_id=str(tmp_path / "d"), no_dist=True)
    data = tmp_path / "d" / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(unickpt.CorruptCheckpointError, match=r"DCP could not read w: .*a "
                                                             "damaged or truncated .distcp"):
        import_dcp(tmp_path / "d", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_help_says_dcp_holds_pickles():
    import argparse

    from unickpt.cli import cmd_convert

    p = argparse.ArgumentParser()
    cmd_convert.add_arguments(p)
    text = " ".join(p.format_help().split())
    assert "{unickpt,orbax,dcp}" in text
    assert "relies on torch's own DCP loader, and the DCP format stores its .metadata (and " \
           "non-tensor values) as Python pickles" in text
    assert "only convert DCP checkpoints you trust" in text
