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

# ``unickpt.migrate`` is the function (re-exported by the top-level package), which hides this
# subpackage's attributes.  Hang the public names and submodules on the function too, so that
# ``unickpt.migrate.Rule``, ``unickpt.migrate.describe_optimizer(...)`` and
# ``import unickpt.migrate.rules as rules`` work as users expect.
from . import errors, optax_spec, optim, rules, schedule  # noqa: E402

for _name, _obj in {"rules": rules, "optim": optim, "schedule": schedule,
                    "optax_spec": optax_spec, "errors": errors, "Rule": Rule,
                    "flatten_rules": flatten_rules, "describe_optimizer": describe_optimizer,
                    "MigrationReport": MigrationReport, "MigrationError": MigrationError,
                    "HyperparameterMismatchError": HyperparameterMismatchError,
                    "UnsupportedOptimizerError": UnsupportedOptimizerError}.items():
    setattr(migrate, _name, _obj)
del _name, _obj
