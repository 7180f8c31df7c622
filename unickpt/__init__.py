"""unickpt: one checkpoint library for PyTorch and JAX/Flax training runs.

Framework-neutral, pickle-free, checksummed checkpoints committed atomically, plus the policy
layer that decides where a run starts, when to save and what to keep.

>>> import tempfile, numpy as np, unickpt
>>> path = tempfile.mkdtemp() + "/step_10"
>>> _ = unickpt.save(path, {"params": {"w": np.ones((2, 2), np.float32)}, "step": 10})
>>> unickpt.load(path)["params"]["w"].dtype
dtype('float32')
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING

from .api import Inspection, LeafInfo, SaveInfo, VerifyReport, inspect, load, save, verify
from .dist import CoordinationError
from .errors import (
    AdapterError,
    BackgroundSaveError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    FormatVersionError,
    IncompatibleCheckpointError,
    LockedError,
    ManagerClosedError,
    MissingDependencyError,
    RunRootError,
    UnickptError,
    UnsupportedLeafError,
)
from .tree import LazyArray, Piece, ShardedArray, format_path

if TYPE_CHECKING:  # the lazy names below, visible to type checkers (imported at run time on use)
    from .manager import (
        CheckpointInfo,
        CheckpointManager,
        ManagerConfig,
        ManagerProtocol,
        Restored,
        StartDecision,
        create_manager,
    )
    from .migration import (
        HyperparameterMismatchError,
        MigrationError,
        MigrationReport,
        Rule,
        UnsupportedOptimizerError,
        migrate,
    )
    from .rng import RNG

# unickpt.migration (the converter, optimizer specs, schedules) and unickpt.manager (the run
# manager and the policy layer) are imported on first use of one of these names, so
# ``import unickpt`` followed by save/load does not pay for them (issue 20: start-up time).
_LAZY = {
    **dict.fromkeys(("migrate", "MigrationReport", "Rule", "MigrationError",
                     "HyperparameterMismatchError", "UnsupportedOptimizerError"), "migration"),
    **dict.fromkeys(("CheckpointManager", "ManagerProtocol", "create_manager", "CheckpointInfo",
                     "Restored", "StartDecision", "ManagerConfig"), "manager"),
    "RNG": "rng",
}
_MIGRATION_NAMES = frozenset(n for n, m in _LAZY.items() if m == "migration")


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'unickpt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "__version__",
    "save",
    "load",
    "inspect",
    "verify",
    "SaveInfo",
    "Inspection",
    "LeafInfo",
    "VerifyReport",
    "ShardedArray",
    "Piece",
    "LazyArray",
    "format_path",
    "UnickptError",
    "CheckpointNotFoundError",
    "CheckpointExistsError",
    "CorruptCheckpointError",
    "FormatVersionError",
    "IncompatibleCheckpointError",
    "UnsupportedLeafError",
    "ConfigError",
    "LockedError",
    "ManagerClosedError",
    "AdapterError",
    "BackgroundSaveError",
    "MissingDependencyError",
    "CoordinationError",
    "migrate",
    "MigrationReport",
    "Rule",
    "MigrationError",
    "HyperparameterMismatchError",
    "UnsupportedOptimizerError",
    "RunRootError",
    "CheckpointManager",
    "ManagerConfig",
    "StartDecision",
    "Restored",
    "CheckpointInfo",
    "ManagerProtocol",
    "create_manager",
    "RNG",
]
