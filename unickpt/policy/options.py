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
import signal
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
        preemption: save on a scheduler's stop signal (docs/preemption.md).
        preemption_signals: the signals that mean "stop" (names, numbers or
            ``signal.Signals``); SIGTERM and SIGUSR1 when None.  Normalized to a tuple of
            ``signal.Signals``.
        preemption_grace_seconds: the time the scheduler leaves between its signal and its
            SIGKILL; a warning is logged when recent saves took longer.
        preemption_check_every_steps / preemption_check_every_seconds: in a multi-process
            job, how often the ranks agree on the flag (one small collective); the first
            interval reached triggers a check.  Unused in a single process.
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
    preemption: bool = False
    preemption_signals: tuple | None = None
    preemption_grace_seconds: float = 30.0
    preemption_check_every_steps: int | None = None
    preemption_check_every_seconds: float | None = 5.0
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
        for name in ("enabled", "async_save", "verify", "preemption", "incremental"):
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
        _check_preemption(self)

    @property
    def has_retention(self) -> bool:
        return any(x is not None for x in (self.keep_last, self.keep_every, self.keep_best))

    def retention_options(self) -> dict:
        """The retention options, as recorded in each checkpoint's info (for ``unickpt ls``)."""
        return {"keep_last": self.keep_last, "keep_every": self.keep_every,
                "keep_best": self.keep_best, "best_metric": self.best_metric,
                "best_mode": self.best_mode}


# SIGKILL and SIGSTOP cannot be caught; SIGINT stays the user's Ctrl-C unless named.
_UNCATCHABLE = {signal.SIGKILL, signal.SIGSTOP}


def _signal_of(v: Any) -> signal.Signals:
    if isinstance(v, str):
        name = v.upper() if v.upper().startswith("SIG") else "SIG" + v.upper()
        if name in signal.Signals.__members__:
            return signal.Signals[name]
    elif isinstance(v, int) and not isinstance(v, bool):
        try:
            return signal.Signals(v)
        except ValueError:
            pass
    raise ConfigError(f"preemption_signals: {v!r} is not a signal; use names such as "
                      "'SIGTERM' / 'SIGUSR1', numbers or signal.Signals members")


def _check_preemption(cfg: ManagerConfig) -> None:
    """Validate (and normalize) the preemption options."""
    sigs = cfg.preemption_signals
    if sigs is not None and not cfg.preemption:
        raise ConfigError("preemption_signals is only used with preemption=True; set "
                          "preemption=True or drop preemption_signals")
    if cfg.preemption:
        if sigs is None:
            sigs = (signal.SIGTERM, signal.SIGUSR1)
        if isinstance(sigs, (str, int)) or not isinstance(sigs, (list, tuple)) or not sigs:
            raise ConfigError(f"preemption_signals={sigs!r} is not allowed; use a non-empty "
                              "list such as ['SIGTERM', 'SIGUSR1']")
        norm = tuple(dict.fromkeys(_signal_of(v) for v in sigs))
        bad = [s.name for s in norm if s in _UNCATCHABLE]
        if bad:
            raise ConfigError(f"preemption_signals: {', '.join(bad)} cannot be caught by any "
                              "process; use SIGTERM / SIGUSR1 (what schedulers send first)")
        object.__setattr__(cfg, "preemption_signals", norm)
    g = cfg.preemption_grace_seconds
    if isinstance(g, bool) or not isinstance(g, (int, float)) or not g > 0 or math.isinf(g):
        raise ConfigError(f"preemption_grace_seconds={g!r} is not allowed; use a positive "
                          "number of seconds (the scheduler's grace period, e.g. 30)")
    _pos_int("preemption_check_every_steps", cfg.preemption_check_every_steps)
    s = cfg.preemption_check_every_seconds
    if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0
                          or math.isinf(s)):
        raise ConfigError(f"preemption_check_every_seconds={s!r} is not allowed; use a "
                          "positive number of seconds or None")


def make_config(options: dict) -> ManagerConfig:
    """Build a config from keyword options; unknown names are a ConfigError listing the
    allowed ones."""
    allowed = [f.name for f in dataclasses.fields(ManagerConfig)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown CheckpointManager option(s) {', '.join(unknown)}; allowed: "
                          f"{', '.join(allowed)}")
    return ManagerConfig(**options)
