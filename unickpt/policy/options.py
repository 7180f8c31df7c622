"""The manager's options: a frozen, keyword-only config validated before any I/O.

>>> ManagerConfig(keep_last=3).keep_last
3
>>> ManagerConfig(best_mode="lowest")
Traceback (most recent call last):
...
unickpt.errors.ConfigError: best_mode='lowest' is not allowed; use 'min' or 'max'
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..storage import STALE_TEMP_SECONDS

__all__ = ["ManagerConfig", "RESUME_MODES", "ON_EXISTING", "BEST_MODES", "make_config"]

RESUME_MODES = ("auto", "never", "must")
ON_EXISTING = ("archive", "error")
BEST_MODES = ("min", "max")
# Bare words a user may plausibly mean as a mode; as paths they would only fail later.
_MODE_LIKE = {"latest", "last", "true", "false", "yes", "no", "none", "always", "if_exists"}


def _pos_int(name: str, v: Any) -> None:
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{name}={v!r} is not allowed; use a positive int or None")


@dataclass(frozen=True, kw_only=True)
class ManagerConfig:
    """Options of :class:`unickpt.CheckpointManager` (see docs/manager.md).

    Attributes:
        resume: "auto" | "never" | "must" | an int step | a checkpoint path.
        on_existing: "archive" | "error": what happens to root checkpoints that the start
            does not continue from.
        enabled: False turns the manager off (no resume, no archive, no saves).
        save_every: save when ``step % save_every == 0``.
        save_every_seconds: save when this much wall time passed since the last save.
        keep_last / keep_every / keep_best / best_metric / best_mode: retention.
        async_save: write and commit in a background thread after a host snapshot.
        stale_temp_seconds: age after which a leftover temporary directory of a process
            that cannot be checked (other host) counts as stale.
        verify: checksum every array when restoring.
        incremental: share array files that did not change since the previous committed
            checkpoint of the root instead of writing them again (hard links locally; a
            backend without ``Storage.share`` writes everything).  False writes every byte.
    """

    resume: str | int | os.PathLike = "auto"
    on_existing: str = "archive"
    enabled: bool = True
    save_every: int | None = None
    save_every_seconds: float | None = None
    keep_last: int | None = None
    keep_every: int | None = None
    keep_best: int | None = None
    best_metric: str | None = None
    best_mode: str = "min"
    async_save: bool = False
    stale_temp_seconds: float = STALE_TEMP_SECONDS
    verify: bool = True
    incremental: bool = True

    def __post_init__(self) -> None:
        r = self.resume
        if isinstance(r, bool):
            raise ConfigError(f"resume={r!r} is not allowed; use 'auto' (resume if possible), "
                              "'never', 'must', an int step or a checkpoint path")
        if isinstance(r, int):
            if r < 0:
                raise ConfigError(f"resume={r} is not allowed; a step is >= 0")
        elif isinstance(r, (str, os.PathLike)):
            s = os.fspath(r)
            if not s or (s.lower() in _MODE_LIKE or (s.lower() in RESUME_MODES
                                                     and s not in RESUME_MODES)):
                raise ConfigError(
                    f"resume={s!r} is not allowed; use one of {', '.join(map(repr, RESUME_MODES))}"
                    ", an int step, or a path to a checkpoint directory")
        else:
            raise ConfigError(f"resume={r!r} is not allowed; use 'auto', 'never', 'must', an "
                              "int step or a checkpoint path")
        if self.on_existing not in ON_EXISTING:
            raise ConfigError(f"on_existing={self.on_existing!r} is not allowed; use 'archive' "
                              "or 'error'")
        for name in ("enabled", "async_save", "verify", "incremental"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} is not allowed; use True or "
                                  "False")
        for name in ("save_every", "keep_last", "keep_every", "keep_best"):
            _pos_int(name, getattr(self, name))
        for name in ("save_every_seconds", "stale_temp_seconds"):
            v = getattr(self, name)
            if v is None and name == "save_every_seconds":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 \
                    or math.isinf(v):
                raise ConfigError(f"{name}={v!r} is not allowed; use a positive number of "
                                  "seconds" + (" or None" if name == "save_every_seconds" else ""))
        if self.best_mode not in BEST_MODES:
            raise ConfigError(f"best_mode={self.best_mode!r} is not allowed; use 'min' or 'max'")
        if self.keep_best is not None and not self.best_metric:
            raise ConfigError("keep_best needs best_metric (the name of a metric passed to "
                              "save(metrics=...)); set best_metric='loss' for example")
        if self.best_metric is not None:
            if not isinstance(self.best_metric, str) or not self.best_metric:
                raise ConfigError(f"best_metric={self.best_metric!r} is not allowed; use a "
                                  "metric name (str)")
            if self.keep_best is None:
                raise ConfigError("best_metric is only used by keep_best; set keep_best=N "
                                  "(how many best checkpoints to keep) or drop best_metric")

    @property
    def has_retention(self) -> bool:
        return any(x is not None for x in (self.keep_last, self.keep_every, self.keep_best))

    def retention_options(self) -> dict:
        """The retention options, as recorded in each checkpoint's info (for ``unickpt ls``)."""
        return {"keep_last": self.keep_last, "keep_every": self.keep_every,
                "keep_best": self.keep_best, "best_metric": self.best_metric,
                "best_mode": self.best_mode}


def make_config(options: dict) -> ManagerConfig:
    """Build a config from keyword options; unknown names are a ConfigError listing the
    allowed ones."""
    allowed = [f.name for f in dataclasses.fields(ManagerConfig)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown CheckpointManager option(s) {', '.join(unknown)}; allowed: "
                          f"{', '.join(allowed)}")
    return ManagerConfig(**options)
