"""Errors specific to moving a run between frameworks.

>>> import unickpt
>>> issubclass(HyperparameterMismatchError, unickpt.UnickptError)
True
"""

from __future__ import annotations

from ..errors import ConfigError, UnickptError

__all__ = ["MigrationError", "HyperparameterMismatchError", "UnsupportedOptimizerError"]


class MigrationError(UnickptError, ValueError):
    """A run cannot be migrated as asked; the message says why and what to do."""


class HyperparameterMismatchError(MigrationError, ConfigError):
    """Source and target optimizers disagree on a hyperparameter.

    Attributes:
        differences: ``(name, source value, target value)`` for every disagreement.
    """

    def __init__(self, message: str, differences: list[tuple[str, object, object]]):
        super().__init__(message)
        self.differences = differences


class UnsupportedOptimizerError(MigrationError):
    """The optimizer (or an option of it) has no faithful twin in the other framework."""
