"""Move a training run between PyTorch and JAX/Flax: weights, optimizer state, schedule, step.

``unickpt.migrate(src, dst, to=..., target=...)`` is :func:`unickpt.migrate.api.migrate`; the
building blocks are framework-neutral and work on numpy trees:

* :mod:`~unickpt.migrate.rules`: name matching and layout transforms (Linear, Conv, Embedding,
  LayerNorm, BatchNorm, user rules, the NCHW/NHWC flatten permutation);
* :mod:`~unickpt.migrate.optim`: torch.optim <-> optax state and hyperparameter checks;
* :mod:`~unickpt.migrate.schedule`: torch ``last_epoch`` <-> optax ``count``.

None of these modules imports torch or jax at import time.  See docs/migration.md.
"""

from .api import MigrationReport, describe_optimizer, migrate
from .errors import HyperparameterMismatchError, MigrationError, UnsupportedOptimizerError
from .rules import Rule, flatten_rules

__all__ = ["migrate", "MigrationReport", "describe_optimizer", "Rule", "flatten_rules",
           "MigrationError", "HyperparameterMismatchError", "UnsupportedOptimizerError"]
