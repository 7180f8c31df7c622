"""``unickpt convert``: bring Orbax checkpoints into unickpt and back, with progress.

The conversion itself lives in the JAX adapter (:mod:`unickpt_jax.orbax`); it is imported only
when the command runs, so the CLI stays usable without JAX installed.
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from .cli import EXIT_UNREADABLE, app
from .errors import UnickptError

__all__ = ["convert_command"]


@app.command("convert")
def convert_command(
    src: str = typer.Argument(..., help="The checkpoint to convert."),
    dst: str = typer.Argument(..., help="Where to write the converted checkpoint."),
    to: str = typer.Option(..., "--to", help="Target format: 'unickpt' (from an Orbax "
                           "checkpoint or CheckpointManager step) or 'orbax' (from unickpt)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing DST."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Convert between an Orbax checkpoint and a unickpt checkpoint."""
    err = Console(stderr=True, highlight=False)
    if to not in ("unickpt", "orbax"):
        err.print(f"unickpt convert: --to must be 'unickpt' or 'orbax', not {to!r}")
        raise typer.Exit(EXIT_UNREADABLE)
    try:
        from unickpt_jax.orbax import convert, convert_total_bytes
    except ImportError as e:
        err.print(f"unickpt convert needs the JAX extra (pip install 'unickpt[jax]'): {e}")
        raise typer.Exit(EXIT_UNREADABLE) from None
    try:
        if quiet:
            convert(src, dst, to=to, overwrite=overwrite)
        else:
            total = convert_total_bytes(src, to=to)
            with Progress(TextColumn(f"converting to {to}"), BarColumn(), DownloadColumn(),
                          TransferSpeedColumn(), console=err, transient=True) as bar:
                task = bar.add_task("convert", total=total or None)
                convert(src, dst, to=to, overwrite=overwrite,
                        progress=lambda n: bar.advance(task, n))
    except (UnickptError, OSError) as e:
        err.print(f"unickpt convert: {e}")
        raise typer.Exit(EXIT_UNREADABLE) from None
    Console(highlight=False).print(f"wrote {dst} ({to})")
