"""The typed error hierarchy of unickpt.

Every error derives from :class:`UnickptError` and also from the builtin exception a user
would naturally catch, so ``except FileNotFoundError`` keeps working for code that does not
know unickpt.  Messages name the checkpoint, the tree path and what to do next.

Example:
    >>> import unickpt
    >>> try:
    ...     unickpt.load("/nonexistent/step_1")
    ... except FileNotFoundError as e:
    ...     isinstance(e, unickpt.UnickptError)
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = [
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
    "RunRootError",
    "AdapterError",
    "BackgroundSaveError",
    "MissingDependencyError",
]


class UnickptError(Exception):
    """Root of every error unickpt raises."""


class CheckpointNotFoundError(UnickptError, FileNotFoundError):
    """No committed checkpoint exists where one was required."""


class CheckpointExistsError(UnickptError, FileExistsError):
    """A committed checkpoint already exists at the destination and overwrite was not asked."""


class CorruptCheckpointError(UnickptError, ValueError):
    """The bytes on disk do not match what the manifest promises (checksum, size, structure).

    Attributes:
        path: the checkpoint directory.
        leaves: tree paths of the affected leaves (may be empty for whole-file problems).
    """

    def __init__(self, message: str, *, path: object = None, leaves: Sequence[str] = ()):
        super().__init__(message)
        self.path = path
        self.leaves = list(leaves)


class FormatVersionError(CorruptCheckpointError):
    """The manifest declares a format version this unickpt cannot read."""


class IncompatibleCheckpointError(UnickptError, ValueError):
    """A checkpoint does not fit the target it is restored into.

    Attributes:
        missing: tree paths the target has but the checkpoint lacks.
        unexpected: tree paths the checkpoint has but the target lacks.
        mismatched: ``(path, why)`` pairs for shape, dtype or kind mismatches.
    """

    def __init__(
        self,
        message: str = "",
        *,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        mismatched: Iterable[tuple[str, str]] = (),
        checkpoint: object = None,
    ):
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = sorted(mismatched)
        self.checkpoint = checkpoint
        lines = [message or "checkpoint does not match the restore target"]
        if checkpoint is not None:
            lines[0] += f" (checkpoint: {checkpoint})"
        for title, items in (("missing in checkpoint", self.missing),
                             ("unexpected in checkpoint", self.unexpected)):
            if items:
                lines.append(f"{title} ({len(items)}):")
                lines.extend(f"  {p}" for p in items)
        if self.mismatched:
            lines.append(f"mismatched ({len(self.mismatched)}):")
            lines.extend(f"  {p}: {why}" for p, why in self.mismatched)
        lines.append(
            "To load only part of a checkpoint (e.g. weights for fine-tuning), pass "
            "strict=False to ignore missing/unexpected entries, or select=[...] to pick subtrees."
        )
        super().__init__("\n".join(lines))


class UnsupportedLeafError(UnickptError, TypeError):
    """A value in the state cannot be stored (no adapter and not a neutral leaf)."""


class ConfigError(UnickptError, ValueError):
    """An option value is unknown or options contradict each other."""


class LockedError(UnickptError, RuntimeError):
    """Another process holds the run root's writer lock."""


class ManagerClosedError(UnickptError, RuntimeError):
    """A :class:`~unickpt.CheckpointManager` was used after ``close()``."""


class RunRootError(UnickptError, OSError):
    """A run root cannot be used: it is a file, or it cannot be created or written."""


class AdapterError(UnickptError, RuntimeError):
    """An adapter plugin could not be loaded or failed."""


class BackgroundSaveError(UnickptError, RuntimeError):
    """A background (async) save failed; the original exception is chained as ``__cause__``."""


class MissingDependencyError(UnickptError, ImportError):
    """An optional package an operation needs is not installed (the message says which)."""
