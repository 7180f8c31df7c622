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

import importlib
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer

from .cli import app
from .errors import ConfigError, UnickptError

__all__ = ["migrate_command", "load_target", "migrate_cli"]


def load_target(spec: str) -> Any:
    """Call ``module:function`` and return the state it builds; errors name what is wrong."""
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
    """Run a migration from the command line; returns the process exit code.

    Prints the checkpoint written and the rules applied; on a problem prints the error
    (which lists every mismatched leaf) and returns 1.
    """
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    from .api import inspect
    from .migration import migrate

    console = Console(stderr=True)
    try:
        state = load_target(target)
        total = inspect(src).total_bytes
        with Progress("[progress.description]{task.description}", BarColumn(),
                      DownloadColumn(), TimeRemainingColumn(), console=console,
                      disable=not progress) as bar:
            task = bar.add_task("migrating", total=total or None)
            report = migrate(src, dst, to=to, target=state,
                             progress=lambda n: bar.advance(task, n))
    except UnickptError as e:
        # The message lists shapes like [3, 4]: print it without markup parsing.
        console.print("[red]error:[/red]", end=" ")
        console.print(str(e), markup=False, highlight=False, soft_wrap=True)
        return 1
    out = Console()
    out.print(f"wrote {report.path} (step {report.step}, {report.source_framework} -> "
              f"{report.to})", highlight=False, soft_wrap=True)
    for title, items in (("rules applied", report.rules_applied), ("dropped", report.dropped),
                         ("synthesised", report.synthesised), ("notes", report.notes)):
        if items:
            out.print(f"{title}:", highlight=False, soft_wrap=True)
            for i in items:
                out.print(f"  {i}", highlight=False, markup=False, soft_wrap=True)
    return 0


@app.command("migrate")
def migrate_cli(
    src: Annotated[str, typer.Argument(help="source checkpoint (a step_<N> directory)")],
    dst: Annotated[str, typer.Argument(help="destination run root (created if needed)")],
    to: Annotated[str, typer.Option("--to", help="destination framework: jax or torch")],
    target: Annotated[str, typer.Option(
        "--target", help="MODULE:FUNCTION building the destination state dict")],
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Convert a run's checkpoint between PyTorch and JAX/Flax (see docs/migration.md)."""
    raise typer.Exit(migrate_command(src, dst, to, target, progress=progress))
