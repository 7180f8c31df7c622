"""Incremental saves: array files whose arrays did not change since the previous committed
checkpoint are shared with it (hard links locally), never written twice, and every
checkpoint stays self-contained (load, verify, inspect, safetensors)."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import unickpt
from unickpt.format import groups
from unickpt.format.reader import CheckpointReader
from unickpt.format.writer import flatten
from unickpt.manager import RunRoot
from unickpt.storage import LocalStorage, can_share


@pytest.fixture(autouse=True)
def small_groups(monkeypatch):
    """Group thresholds scaled down so that small test states split into many files."""
    monkeypatch.setattr(groups, "SPLIT_BYTES", 0)
    monkeypatch.setattr(groups, "ALONE_BYTES", 4096)
    monkeypatch.setattr(groups, "GROUP_BYTES", 8192)
    monkeypatch.setattr(groups, "MERGE_BYTES", 0)


def lora_state(step: int) -> dict:
    """A frozen base (big arrays that never change) and small trained adapters."""
    base = np.random.default_rng(0)
    train = np.random.default_rng(1000 + step)
    return {"base": {f"w{i}": base.standard_normal((64, 32)).astype(np.float32)
                     for i in range(6)},
            "adapter": {"a": train.standard_normal((4, 32)).astype(np.float32),
                        "b": train.standard_normal((64, 4)).astype(np.float32)},
            "step": step}


def same_tree(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray):
        return (isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
                and a.tobytes() == b.tobytes())
    return type(a) is type(b) and a == b


def inodes(path) -> dict[str, int]:
    return {n: os.stat(os.path.join(path, n)).st_ino for n in os.listdir(path)
            if n.endswith(".safetensors")}


@pytest.mark.parametrize("async_save", [False, True])
def test_unchanged_files_are_hard_links_and_every_checkpoint_stands_alone(tmp_path,
                                                                         async_save):
    with unickpt.CheckpointManager(tmp_path, async_save=async_save) as m:
        for s in (1, 2, 3):
            m.save(s, lora_state(s))
    i1, i2, i3 = (inodes(tmp_path / f"step_{s}") for s in (1, 2, 3))
    assert len(i1) == 7  # six frozen weights alone, the adapter packed
    shared = {n for n in i3 if i3[n] == i2[n] == i1[n]}
    assert len(shared) == 6 and all(os.stat(tmp_path / "step_3" / n).st_nlink == 3
                                    for n in shared)
    info = RunRoot(tmp_path).read_info(3)
    adapter = 4 * 32 * 4 + 64 * 4 * 4
    assert info["written_bytes"] == adapter and info["shared_files"] == 6 and info["files"] == 7
    assert info["nbytes"] == adapter + 6 * 64 * 32 * 4
    assert RunRoot(tmp_path).read_info(1)["written_bytes"] == info["nbytes"]
    # deleting checkpoints is deleting directories: the others keep every byte
    shutil.rmtree(tmp_path / "step_2")
    shutil.rmtree(tmp_path / "step_1")
    assert same_tree(unickpt.load(tmp_path / "step_3"), lora_state(3))
    assert unickpt.verify(tmp_path / "step_3").ok
    leaves = {lf.path for lf in unickpt.inspect(tmp_path / "step_3").leaves}
    assert "base/w0" in leaves and "adapter/a" in leaves
    safetensors = pytest.importorskip("safetensors.numpy")
    got = {}
    for n in i3:
        got.update(safetensors.load_file(str(tmp_path / "step_3" / n)))
    assert got["base/w5"].tobytes() == lora_state(0)["base"]["w5"].tobytes()


def test_incremental_false_writes_everything(tmp_path):
    with unickpt.CheckpointManager(tmp_path, incremental=False) as m:
        m.save(1, lora_state(1))
        m.save(2, lora_state(2))
    i1, i2 = inodes(tmp_path / "step_1"), inodes(tmp_path / "step_2")
    assert list(i1) == list(i2) == ["arrays.safetensors"]  # one file, as a plain save writes
    assert not set(i1.values()) & set(i2.values())
    info = RunRoot(tmp_path).read_info(2)
    assert info["written_bytes"] == info["nbytes"] and info["shared_files"] == 0
    with pytest.raises(unickpt.ConfigError, match="incremental=1 is not allowed; use True or"):
        unickpt.CheckpointManager(tmp_path, incremental=1)


def test_ls_and_log_report_bytes_written(tmp_path, capsys, caplog):
    from unickpt.cli.cmd_ls import ls

    with caplog.at_level("INFO", logger="unickpt"):
        with unickpt.CheckpointManager(tmp_path) as m:
            m.save(1, lora_state(1))
            m.save(2, lora_state(2))
    assert "step_2: 0.1 MB (0.0 MB written, 0.0 MB shared with the previous checkpoint)" \
        in caplog.text
    assert "step_1: 0.1 MB in" in caplog.text
    assert ls(str(tmp_path)) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("2 "))
    assert "(1.5 KiB written)" in line  # 1,536 bytes of adapters; 48 KiB shared
    ls(str(tmp_path), json_out=True)
    import json

    rows = json.loads(capsys.readouterr().out)["checkpoints"]
    assert [(r["written"], r["shared_files"]) for r in rows] == [(50688, 0), (1536, 6)]


def test_corruption_of_a_shared_file_is_found_in_every_checkpoint_using_it(tmp_path):
    with unickpt.CheckpointManager(tmp_path) as m:
        for s in (1, 2):
            m.save(s, lora_state(s))
    name = next(n for n, i in inodes(tmp_path / "step_2").items()
                if i == inodes(tmp_path / "step_1")[n])
    path = tmp_path / "step_2" / name
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:  # a bit flip in the data section (the test damages it)
        f.seek(-1, os.SEEK_END)
        b = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([b[0] ^ 1]))
    for s in (1, 2):
        with pytest.raises(unickpt.CorruptCheckpointError, match="damaged leaves: base/w"):
            unickpt.verify(tmp_path / f"step_{s}")


def test_nothing_in_the_previous_checkpoint_is_opened_for_writing(tmp_path):
    with unickpt.CheckpointManager(tmp_path) as m:
        m.save(1, lora_state(1))
        for n in os.listdir(tmp_path / "step_1"):  # read-only files: a write would fail
            os.chmod(tmp_path / "step_1" / n, stat.S_IRUSR)
        m.save(2, lora_state(2))
        m.save(3, lora_state(3))
    assert RunRoot(tmp_path).read_info(2)["shared_files"] == 6
    assert same_tree(unickpt.load(tmp_path / "step_2", verify=True), lora_state(2))


def test_a_change_anywhere_in_an_array_is_seen(tmp_path):
    # arrays over 64 KiB record head_xxh3; a change past the first 4 KiB leaves it equal, and
    # the full checksum decides; a change in the head is seen from 4 KiB of hashing
    big = np.arange(16384, dtype=np.float64)
    with unickpt.CheckpointManager(tmp_path) as m:
        m.save(1, {"x": big, "y": big + 1})
        tail = big.copy()
        tail[-1] = -1.0
        m.save(2, {"x": tail, "y": big + 1})
        # dtype, shape, a renamed, added or removed array: never shared
        m.save(3, {"x": tail.view(np.int64), "y": (big + 1).reshape(128, 128)})
        m.save(4, {"z": tail.view(np.int64), "y": (big + 1).reshape(128, 128), "w": big})
        head = (big + 1).reshape(128, 128).copy()
        head[0, 0] = 7.0
        m.save(5, {"z": tail.view(np.int64), "y": head, "w": big})
    got = unickpt.load(tmp_path / "step_2")
    assert got["x"].tobytes() == tail.tobytes()
    with CheckpointReader(tmp_path / "step_1") as r:
        assert {e.head_xxh3 for e in r.manifest.arrays} == {
            groups.head_digest(big.view(np.uint8)), groups.head_digest((big + 1).view(np.uint8))}
    info = [RunRoot(tmp_path).read_info(s) for s in (2, 3, 4, 5)]
    n = big.nbytes
    assert [(i["shared_files"], i["written_bytes"]) for i in info] == [
        (1, n), (0, 2 * n), (1, 2 * n), (2, n)]
    assert unickpt.load(tmp_path / "step_3")["x"].dtype == np.int64
    assert unickpt.load(tmp_path / "step_5")["y"][0, 0] == 7.0
    for s in (1, 2, 3, 4, 5):
        assert unickpt.verify(tmp_path / f"step_{s}").ok


def test_big_endian_and_scalar_leaves_keep_their_flags_when_shared(tmp_path):
    be = np.arange(2048, dtype=">f4")
    with unickpt.CheckpointManager(tmp_path) as m:
        m.save(1, {"a": be.astype("<f4"), "s": np.float64(2.5)})
        m.save(2, {"a": be, "s": np.array(2.5)})
    got = unickpt.load(tmp_path / "step_2")
    assert got["a"].dtype == np.dtype(">f4") and got["a"].tobytes() == be.tobytes()
    assert isinstance(got["s"], np.ndarray) and got["s"].shape == ()
    assert RunRoot(tmp_path).read_info(2)["shared_files"] >= 1


def test_a_backend_without_share_writes_everything(tmp_path):
    class NoShare(LocalStorage):
        share = None

    assert not can_share(NoShare()) and can_share(LocalStorage())
    with unickpt.CheckpointManager(tmp_path, storage=NoShare()) as m:
        m.save(1, lora_state(1))
        m.save(2, lora_state(2))
    info = RunRoot(tmp_path).read_info(2)
    assert info["shared_files"] == 0 and info["written_bytes"] == info["nbytes"]


def test_share_refused_by_the_filesystem_falls_back_to_writing(tmp_path, monkeypatch):
    import errno

    def no_link(src, dst, **kw):
        raise OSError(errno.EXDEV, "cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    with unickpt.CheckpointManager(tmp_path) as m:
        m.save(1, lora_state(1))
        m.save(2, lora_state(2))
    info = RunRoot(tmp_path).read_info(2)
    assert info["shared_files"] == 0 and info["written_bytes"] == info["nbytes"]
    assert same_tree(unickpt.load(tmp_path / "step_2"), lora_state(2))


def test_a_previous_file_that_no_longer_matches_its_manifest_is_not_shared(tmp_path):
    with unickpt.CheckpointManager(tmp_path) as m:
        m.save(1, lora_state(1))
        victim = tmp_path / "step_1" / "arrays-00000.safetensors"
        os.truncate(victim, 100)  # damaged after its commit
        m.save(2, lora_state(2))
    info = RunRoot(tmp_path).read_info(2)
    assert info["shared_files"] == 5
    assert unickpt.verify(tmp_path / "step_2").ok


def test_small_states_stay_one_file(tmp_path, monkeypatch):
    monkeypatch.setattr(groups, "SPLIT_BYTES", 1 << 20)
    with unickpt.CheckpointManager(tmp_path) as m:
        m.save(1, lora_state(1))
        m.save(2, lora_state(1) | {"step": 2})  # arrays unchanged: the one file is shared
    assert sorted(os.listdir(tmp_path / "step_2")) == ["arrays.safetensors", "manifest.msgpack"]
    assert inodes(tmp_path / "step_1") == inodes(tmp_path / "step_2")
    assert unickpt.load(tmp_path / "step_2")["step"] == 2


def test_memory_backend_shares(monkeypatch):
    from test_storage_memory import MemoryStorage

    mem = MemoryStorage()
    with unickpt.CheckpointManager("/mem/run", storage=mem) as m:
        m.save(1, lora_state(1))
        m.save(2, lora_state(2))
    info = RunRoot("/mem/run", mem).read_info(2)
    assert info["shared_files"] == 6
    assert mem.files["/mem/run/step_2/arrays-00000.safetensors"] is \
        mem.files["/mem/run/step_1/arrays-00000.safetensors"]
    assert same_tree(unickpt.load("/mem/run/step_2", storage=mem), lora_state(2))


def test_grouping_is_stable_and_deterministic():
    _, jobs, _ = flatten(lora_state(1))
    g1 = groups.group_jobs(jobs)
    _, jobs2, _ = flatten(lora_state(7))
    assert groups.group_jobs(jobs2) == g1
    assert [[jobs[i].path for i in g] for g in g1][-1] == [("adapter", "a"), ("adapter", "b")]


# ----------------------------------------------------------------- property test

SIZES = st.lists(st.sampled_from([0, 3, 40, 300, 600, 1100, 2000]), min_size=1, max_size=8)


@st.composite
def scenarios(draw):
    tops = draw(st.lists(SIZES, min_size=1, max_size=3))
    layout = [(f"t{k}", f"a{i}", n) for k, sizes in enumerate(tops) for i, n in enumerate(sizes)]
    nsaves = draw(st.integers(2, 7))
    changes = [draw(st.sets(st.integers(0, len(layout) - 1))) for _ in range(nsaves - 1)]
    deletes = [draw(st.sets(st.integers(0, 6), max_size=3)) for _ in range(nsaves - 1)]
    keep_last = draw(st.sampled_from([None, 2, 3]))
    return layout, changes, deletes, keep_last


def _build(layout, values) -> dict:
    out: dict = {}
    for (top, name, n), v in zip(layout, values):
        out.setdefault(top, {})[name] = np.full(n, v, np.float64)
    return out


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(scenarios())
def test_property_random_saves_changes_and_deletions(scenario):
    layout, changes, deletes, keep_last = scenario
    values = list(range(len(layout)))
    saved: dict[int, dict] = {}
    fresh = len(layout)
    with tempfile.TemporaryDirectory() as root:
        m = unickpt.CheckpointManager(root, keep_last=keep_last)
        try:
            m.save(1, _build(layout, values))
            saved[1] = _build(layout, values)
            for step, (changed, doomed) in enumerate(zip(changes, deletes), start=2):
                for i in changed:
                    values[i] = fresh = fresh + 1
                state = _build(layout, values)
                moved = {layout[i][:2] for i in changed if layout[i][2]}  # bytes that differ
                # the rule, from the previous checkpoint's manifest alone: a previous file is
                # shared iff none of its arrays changed; everything else is written
                with CheckpointReader(os.path.join(root, f"step_{step - 1}")) as r:
                    members: dict[str, list] = {}
                    for i, e in enumerate(r.manifest.arrays):
                        members.setdefault(e.file, []).append((r.array_paths[i], e.nbytes))
                clean = [f for f, ms in members.items() if not {p for p, _ in ms} & moved]
                total = sum(n for _, _, n in layout) * 8
                expect_written = total - sum(n for f in clean for _, n in members[f])
                m.save(step, state)
                saved[step] = state
                path = os.path.join(root, f"step_{step}")
                info = m.run_root.read_info(step)
                assert info["written_bytes"] == expect_written
                assert info["shared_files"] == len(clean)
                # bytes that reached the disk: exactly the written arrays plus new headers
                new = [n for n in os.listdir(path) if n.endswith(".safetensors")
                       and os.stat(os.path.join(path, n)).st_nlink == 1]
                with CheckpointReader(path) as r:
                    starts = {f.name: f.data_start for f in r.manifest.files}
                    paths = {n: {r.array_paths[i] for i, e in enumerate(r.manifest.arrays)
                                 if e.file == n} for n in new}
                assert len(new) == len(starts) - len(clean)
                # a new file holds changed arrays or unchanged ones, never both: the unchanged
                # ones are shared at the next save where they are still unchanged
                assert all(not p & moved or p <= moved for p in paths.values())
                assert sum(os.path.getsize(os.path.join(path, n)) - starts[n]
                           for n in new) == expect_written
                # retention by hand between saves: delete random older checkpoints
                m.close()
                present = sorted(s for s in saved if os.path.isdir(f"{root}/step_{s}"))
                for s in present[:-1]:
                    if s % 7 in doomed:
                        shutil.rmtree(f"{root}/step_{s}")
                m = unickpt.CheckpointManager(root, keep_last=keep_last)
                m.resolve_start()
        finally:
            m.close()
        present = sorted(s for s in saved if os.path.isdir(f"{root}/step_{s}"))
        assert present and present[-1] == max(saved)
        for s in present:
            p = f"{root}/step_{s}"
            assert same_tree(unickpt.load(p), saved[s]), s
            assert unickpt.verify(p).ok


# ----------------------------------------------------------------- golden multi-file checkpoint

GOLDEN_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
# tests/golden/<version>/incremental, for every format version that has one
GOLDEN_VERSIONS = [v for v in ("v2", "v3")
                   if os.path.isdir(os.path.join(GOLDEN_ROOT, v, "incremental"))]


def golden_state(step: int) -> dict:
    """What tests/golden/v*/incremental holds: step 2 of a manager run with sharing, whose
    frozen array file (arrays-00000) was shared with step 1 (written once, never again)."""
    return {"frozen": {"w": np.arange(16400, dtype=np.float32)},
            "train": {"a": np.array([1, 2, 3], np.float32) * step, "n": np.int64(step)},
            "step": step}


def _spec_table_entries(t: dict, files: list) -> list[dict]:
    """The entries of a v3 array table (docs/FORMAT.md 4.1.2) as v2 maps, decoded with numpy
    from the spec alone: index columns sized by their table, packed little-endian columns,
    sparse optional fields."""
    n = len(t["name"])

    def column(key: str, dtype: str, count: int = n) -> list:
        a = np.frombuffer(t[key], np.dtype(dtype))
        assert len(a) == count and len(t[key]) == count * a.itemsize, key
        return a.tolist()

    def index(key: str, k: int) -> list:
        ix = column(key, f"<u{1 if k <= 256 else 2 if k <= 65536 else 4}")
        assert all(x < k for x in ix)
        return ix

    file, dtype = index("file", len(files)), index("dtype", len(t["dtypes"]))
    ndim = column("ndim", "u1")
    dims = column("shape", "<i8", sum(ndim))
    offset, nbytes, xxh3 = column("offset", "<i8"), column("nbytes", "<i8"), column("xxh3", "<u8")
    head = t.get("head", [])
    head_xxh3 = dict(zip(head, column("head_xxh3", "<u8", len(head)) if head else []))
    out, pos = [], 0
    for i in range(n):
        e = {"file": files[file[i]]["name"], "name": t["name"][i], "dtype": t["dtypes"][dtype[i]],
             "shape": dims[pos:pos + ndim[i]], "offset": offset[i], "nbytes": nbytes[i],
             "xxh3": xxh3[i]}
        pos += ndim[i]
        if i in head_xxh3:
            e["head_xxh3"] = head_xxh3[i]
        if i in t.get("byteorder", []):
            e["byteorder"] = ">"
        if i in t.get("scalar", []):
            e["scalar"] = True
        out.append(e)
    return out


def _spec_reader_multi(path) -> dict:
    """Arrays by tensor name, read from docs/FORMAT.md alone: every file of ``files``, sizes
    and header checksums checked, ``xxh3`` and (4.1) ``head_xxh3`` of every array; the array
    entries as v2 maps or (v3) as the array table."""
    import json

    import msgpack
    import xxhash

    with open(os.path.join(path, "manifest.msgpack"), "rb") as f:
        outer = msgpack.unpackb(f.read(), raw=False)
    body = msgpack.unpackb(outer["body"], raw=False, strict_map_key=False)
    assert body["format_version"] == outer["unickpt"] in (2, 3)
    data = {}
    for fe in body["files"]:
        with open(os.path.join(path, fe["name"]), "rb") as f:
            raw = f.read()
        assert len(raw) == fe["size"]
        assert xxhash.xxh3_64_intdigest(raw[:fe["data_start"]]) == fe["header_xxh3"]
        meta = json.loads(raw[8:fe["data_start"]])["__metadata__"]
        assert meta == {"format": "unickpt", "unickpt_format": str(outer["unickpt"])}
        data[fe["name"]] = raw
    entries = body["arrays"] if outer["unickpt"] < 3 else \
        _spec_table_entries(body["arrays"], body["files"])
    out = {}
    for e in entries:
        chunk = data[e["file"]][e["offset"]:e["offset"] + e["nbytes"]]
        assert xxhash.xxh3_64_intdigest(chunk) == e["xxh3"]
        if "head_xxh3" in e:
            assert xxhash.xxh3_64_intdigest(chunk[:4096]) == e["head_xxh3"]
        out[e["name"]] = np.frombuffer(chunk, np.dtype(e["dtype"])).reshape(e["shape"])
        if e.get("byteorder") == ">":
            out[e["name"]] = out[e["name"]].astype(out[e["name"]].dtype.newbyteorder(">"))
        if e.get("scalar"):
            out[e["name"]] = out[e["name"]][()]
    return out


def test_a_fresh_multi_file_checkpoint_reads_by_the_spec(tmp_path):
    # the v3 array table as written now: several files, one shared, head_xxh3, flags
    with unickpt.CheckpointManager(tmp_path) as m:
        for step in (1, 2):
            m.save(step, {**golden_state(step), "be": np.arange(3, dtype=">i4"),
                          "sc": np.float32(step)})
    path = tmp_path / "step_2"
    assert RunRoot(tmp_path).read_info(2)["shared_files"] >= 1
    assert unickpt.inspect(path).format_version == 3
    import msgpack
    with open(path / "manifest.msgpack", "rb") as f:
        table = msgpack.unpackb(msgpack.unpackb(f.read())["body"])["arrays"]
    assert {"head", "head_xxh3", "byteorder", "scalar"} <= table.keys()  # all read below
    spec = _spec_reader_multi(path)
    exp = golden_state(2)
    assert len(os.listdir(path)) >= 3 and set(spec) == {
        "frozen/w", "train/a", "train/n", "be", "sc"}
    for name, want in (("frozen/w", exp["frozen"]["w"]), ("train/a", exp["train"]["a"]),
                       ("train/n", exp["train"]["n"]), ("be", np.arange(3, dtype=">i4")),
                       ("sc", np.float32(2))):
        assert type(spec[name]) is type(want) and spec[name].dtype == want.dtype
        assert spec[name].tobytes() == want.tobytes(), name


@pytest.mark.parametrize("version", GOLDEN_VERSIONS)
def test_golden_multi_file_checkpoint_reads_everywhere(version):
    GOLDEN = os.path.join(GOLDEN_ROOT, version, "incremental")
    assert sorted(os.listdir(GOLDEN)) == ["arrays-00000.safetensors",
                                          "arrays-00001.safetensors", "manifest.msgpack"]
    assert same_tree(unickpt.load(GOLDEN), golden_state(2))
    assert same_tree(unickpt.load(GOLDEN, mmap=True), golden_state(2))
    assert unickpt.verify(GOLDEN).ok
    ins = unickpt.inspect(GOLDEN)
    assert ins.format_version == int(version[1:]) and ins.info["shared_files"] == 1
    spec = _spec_reader_multi(GOLDEN)
    exp = golden_state(2)
    assert spec["frozen/w"].tobytes() == exp["frozen"]["w"].tobytes()
    assert spec["train/a"].tobytes() == exp["train"]["a"].tobytes()
    safetensors = pytest.importorskip("safetensors")
    with safetensors.safe_open(os.path.join(GOLDEN, "arrays-00000.safetensors"), "np") as f:
        assert f.get_tensor("frozen/w").tobytes() == exp["frozen"]["w"].tobytes()
