"""``unickpt migrate SRC DST --to jax|torch --target MODULE:FUNCTION``.

The target function takes no arguments and returns the destination's state dict (the same
dict the resumed run will restore), e.g.::

    # mytrain.py
    def flax_state():
        model = MLP(nnx.Rngs(0))
        return {"model": model, "optimizer": nnx.Optimizer(model, optax.adamw(1e-3,
                weight_decay=1e-2), wrt=nnx.Param), "step": 0}

    $ unickpt migrate runs/torch/step_500 runs/flax --to jax --target mytrain:flax_state
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from typing import Any

from ._output import error, progress_bar
from .exit_codes import ExitCode

__all__ = ["migrate_command", "load_target"]

NAME = "migrate"
HELP = "convert a run's checkpoint between PyTorch and JAX/Flax (see docs/migration.md)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="source checkpoint (a step_<N> directory)")
    p.add_argument("dst", help="destination run root (created if needed)")
    p.add_argument("--to", required=True, choices=("jax", "torch"),
                   help="destination framework")
    p.add_argument("--target", required=True,
                   help="MODULE:FUNCTION building the destination state dict")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show a progress bar")


def load_target(spec: str) -> Any:
    """Call ``module:function`` and return the state it builds; errors name what is wrong."""
    from ..errors import ConfigError

    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise ConfigError(f"--target must be MODULE:FUNCTION, got {spec!r}")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # let `--target mytrain:state` find ./mytrain.py
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"--target {spec}: cannot import module {module_name!r}: {e}") from e
    fn: Callable[[], Any] | None = getattr(module, func_name, None)
    if not callable(fn):
        raise ConfigError(f"--target {spec}: module {module_name!r} has no function "
                          f"{func_name!r}")
    return fn()


def migrate_command(src: str, dst: str, to: str, target: str, progress: bool = True) -> int:
    """Run a migration; print the checkpoint written and the rules applied; return the exit
    code (:attr:`ExitCode.FAILED` with the error, which lists every mismatched leaf)."""
    from ..api import inspect
    from ..errors import UnickptError
    from ..migration import migrate

    try:
        state = load_target(target)
        total = inspect(src).total_bytes
        with progress_bar("migrating", total, enabled=progress) as advance:
            report = migrate(src, dst, to=to, target=state, progress=advance)
    except UnickptError as e:
        return error(NAME, e, ExitCode.FAILED)
    print(f"wrote {report.path} (step {report.step}, {report.source_framework} -> "
          f"{report.to})")
    for title, items in (("rules applied", report.rules_applied), ("dropped", report.dropped),
                         ("synthesised", report.synthesised), ("notes", report.notes)):
        if items:
            print(f"{title}:")
            for i in items:
                print(f"  {i}")
    return int(ExitCode.OK)


def run(args: argparse.Namespace) -> ExitCode:
    return ExitCode(migrate_command(args.src, args.dst, args.to, args.target,
                                    progress=args.progress))
