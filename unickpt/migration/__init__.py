"""Move a training run between PyTorch and JAX/Flax: weights, optimizer state, schedule, step.

``unickpt.migrate(src, dst, to=..., target=...)`` is :func:`unickpt.migration.api.migrate`
(this package is ``unickpt.migration``, so it never shadows that function); the
building blocks are framework-neutral and work on numpy trees:

* :mod:`~unickpt.migration.rules`: name matching and layout transforms (Linear, Conv, Embedding,
  LayerNorm, BatchNorm, user rules, the NCHW/NHWC flatten permutation);
* :mod:`~unickpt.migration.optim`: torch.optim <-> optax state and hyperparameter checks;
* :mod:`~unickpt.migration.schedule`: torch ``last_epoch`` <-> optax ``count``.

None of these modules imports torch or jax at import time.  See docs/migration.md.
"""

from .api import MigrationReport, describe_optimizer, migrate
from .errors import HyperparameterMismatchError, MigrationError, UnsupportedOptimizerError
from .rules import Rule, flatten_rules

__all__ = ["migrate", "MigrationReport", "describe_optimizer", "Rule", "flatten_rules",
           "MigrationError", "HyperparameterMismatchError", "UnsupportedOptimizerError"]
