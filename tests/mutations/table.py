"""The planted bugs: each is text substitutions on the repository plus the tests to run.

A substitution is ``(file, search, replace)``; ``search`` must occur exactly once in ``file``
(``Sub(..., count=None)`` replaces every occurrence, at least one).  When a refactor moves the
code, the runner reports the mutation as STALE naming the file and pattern: update it here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sub:
    file: str
    search: str
    replace: str
    count: int | None = 1  # None: every occurrence (at least one)


@dataclass(frozen=True)
class Mutation:
    name: str
    subs: list[Sub]
    tests: list[str] = field(default_factory=list)


MUTATIONS: list[Mutation] = [
    Mutation("RNG not restored", [Sub(
        "adapters/unickpt_torch/rng.py",
        "        torch.set_rng_state(torch.from_numpy(",
        "        (lambda _s: None)(torch.from_numpy(")],
        ["tests/test_rng.py", "tests/test_torch_resume.py"]),
    Mutation("optimizer step zeroed", [Sub(
        "adapters/unickpt_torch/optim.py",
        "sd_state[i] = {k: _to_torch(v, ",
        'sd_state[i] = {k: _to_torch(v * 0 if k == "step" else v, ')],
        ["tests/test_torch_optim.py"]),
    Mutation("NNX key not restored", [Sub(
        "adapters/unickpt_jax/nnx.py",
        "new.append((p, var.replace(thunk())))",
        'new.append((p, var if type(var).__name__ == "RngKey" else var.replace(thunk())))')],
        ["tests/test_jax_adapter.py"]),
    Mutation("rename before write", [Sub(
        # the staged directory is published (renamed to its final name) before any file of
        # the checkpoint is written into it
        "unickpt/format/commit.py",
        """        stats = write_tree(tmp, None, metadata=metadata, info=info, kinds=kinds,
                           prepared=flat, storage=storage, incremental=incremental,
                           previous=previous)
        with publish_guard():
            storage.commit(tmp, final, replace=replace)""",
        """        with publish_guard():
            storage.commit(tmp, final, replace=replace)
        stats = write_tree(final, None, metadata=metadata, info=info, kinds=kinds,
                           prepared=flat, storage=storage, incremental=incremental,
                           previous=previous)""")],
        ["tests/test_durability.py"]),
    Mutation("manifest overlap checks disabled", [Sub(
        "unickpt/format/manifest.py",
        "        pair = _first_overlap(file_starts, file_ends)\n        if pair is not None:",
        "        pair = _first_overlap(file_starts, file_ends)\n        if False:")],
        ["tests/test_format_hostile.py"]),
    Mutation("async save without a host copy", [Sub(
        "unickpt/state.py",
        "return obj.copy() if self.snapshot else obj",
        "return obj")],
        ["tests/test_manager.py", "tests/test_manager_io.py"]),
    Mutation("Adam count off by one", [Sub(
        "unickpt/migration/_convert.py",
        'entry["step"] = np.asarray(float(st.count if st.count is not None else self.step),',
        'entry["step"] = np.asarray(float(st.count if st.count is not None else self.step) + 1,')],
        ["tests/test_migrate_units.py", "tests/test_migrate_e2e.py", "-k", "jax_to_torch or units"]),
    Mutation("bf16 conversion returning zeros", [Sub(
        "adapters/unickpt_torch/tensors.py",
        "        return t.view(carrier).numpy().view(np_type)",
        "        return np.zeros(tuple(t.shape), np_type)")],
        ["tests/test_roundtrip_independent.py"]),
    Mutation("float64 migration rounded through float32", [Sub(
        "unickpt/migration/rules.py",
        "        return self.transform(a)",
        "        return self.transform(a.astype(np.float32).astype(a.dtype))")],
        ["tests/test_migrate_e2e.py"]),
    # Every fsync of the local backend (directories, data files through LocalWriteHandle.sync,
    # the manifest, the latest pointer): the writer syncs only through the storage's handles.
    Mutation("fsync removed", [
        Sub("unickpt/storage/local.py", "os.fsync(", "(lambda _fd: None)(", None)],
        ["tests/test_durability.py"]),
    # Finer durability mutations: each fsync of the commit protocol, one at a time, and order.
    Mutation("durability: data file not fsynced", [
        Sub("unickpt/format/writer.py",
            "                for fh in handles:\n                    fh.sync()",
            "                pass"),
        Sub("unickpt/format/writer.py",
            "                    for f in [ex.submit(fh.sync) for fh in handles]:\n"
            "                        f.result()",
            "                    pass")],
        ["tests/test_durability.py"]),
    Mutation("durability: manifest not fsynced", [Sub(
        "unickpt/format/writer.py", "        mh.sync()", "        pass")],
        ["tests/test_durability.py"]),
    Mutation("durability: data fsynced before it is written", [
        Sub("unickpt/format/writer.py",
            "                handles.append(fh)\n",
            "                handles.append(fh)\n                fh.sync()\n"),
        Sub("unickpt/format/writer.py",
            "                for fh in handles:\n                    fh.sync()",
            "                pass"),
        Sub("unickpt/format/writer.py",
            "                    for f in [ex.submit(fh.sync) for fh in handles]:\n"
            "                        f.result()",
            "                    pass")],
        ["tests/test_durability.py"]),
    Mutation("durability: temp dir not fsynced before the commit rename", [Sub(
        "unickpt/storage/local.py", "        fsync_dir(temp)\n", "")],
        ["tests/test_durability.py"]),
    Mutation("durability: parent fsynced before the rename, not after", [Sub(
        "unickpt/storage/local.py",
        "        os.rename(temp, final)\n        fsync_dir(parent)",
        "        fsync_dir(parent)\n        os.rename(temp, final)")],
        ["tests/test_durability.py"]),
    Mutation("durability: overwrite exchange without a parent fsync", [Sub(
        "unickpt/storage/local.py",
        "            if _exchange(temp, final):\n                fsync_dir(parent)",
        "            if _exchange(temp, final):\n                pass")],
        ["tests/test_durability.py"]),
    Mutation("durability: latest pointer file not fsynced", [Sub(
        "unickpt/storage/local.py", "            os.write(fd, data)\n            os.fsync(fd)",
        "            os.write(fd, data)")],
        ["tests/test_durability.py"]),
    Mutation("durability: latest pointer rename not fsynced", [Sub(
        "unickpt/storage/local.py",
        "        os.replace(tmp, path)\n        fsync_dir(os.path.dirname(os.path.abspath(path)))",
        "        os.replace(tmp, path)")],
        ["tests/test_durability.py"]),
    Mutation("durability: retention renames not fsynced", [Sub(
        "unickpt/storage/local.py", "        for d in sorted(dirs):\n            fsync_dir(d)",
        "        for d in sorted(dirs):\n            pass")],
        ["tests/test_durability.py"]),
    # The archive's moves (steps into the staging directory, staging to run_<K>) go through
    # move_many like retention's: only the archive's renames lose their directory fsyncs.
    Mutation("durability: archive move not fsynced", [Sub(
        "unickpt/storage/local.py", "        for d in sorted(dirs):\n            fsync_dir(d)",
        "        for d in sorted(dirs):\n"
        "            if any(\".unickpt-archive.\" in a + b for a, b in pairs):\n"
        "                break\n"
        "            fsync_dir(d)")],
        ["tests/test_durability.py"]),
]
