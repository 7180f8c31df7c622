"""``unickpt convert SRC DST --to unickpt|orbax``: Orbax checkpoints in and out, with progress.

The conversion lives in the JAX adapter (:mod:`unickpt_jax.orbax`), imported only when the
command runs, so the CLI works without JAX installed.  It runs in one process, whatever the
number of processes that wrote the Orbax checkpoint: big arrays are streamed piece by piece
(bounded memory) and keep the saved shard layout.
"""

from __future__ import annotations

import argparse

from . import _convert_dcp
from ._output import error, progress_bar
from .exit_codes import ExitCode

NAME = "convert"
HELP = ("convert between an Orbax or torch.distributed.checkpoint (DCP) checkpoint and a "
        "unickpt checkpoint")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="the checkpoint to convert")
    p.add_argument("dst", help="where to write the converted checkpoint")
    p.add_argument("--to", required=True, choices=("unickpt", "orbax", "dcp"),
                   help="'unickpt' (from an Orbax checkpoint or CheckpointManager step, single- "
                        "or multi-process, or from a DCP directory), 'orbax' or 'dcp' (from "
                        "unickpt). "
                        + _convert_dcp.TRUST_NOTE)
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> ExitCode:
    from ..errors import UnickptError

    if _convert_dcp.wants(args):
        return _convert_dcp.run(args)
    try:
        from unickpt_jax.orbax import convert, convert_total_bytes
    except ImportError as e:
        return ExitCode(error(NAME, f"needs the JAX extra (pip install 'unickpt[jax]'): {e}",
                              ExitCode.FAILED))
    try:
        total = None if args.quiet else convert_total_bytes(args.src, to=args.to)
        with progress_bar(f"converting to {args.to}", total,
                          enabled=not args.quiet) as advance:
            convert(args.src, args.dst, to=args.to, overwrite=args.overwrite,
                    progress=advance)
    except (UnickptError, OSError, ValueError) as e:
        # ValueError: Orbax refuses an existing destination with one, untyped
        return ExitCode(error(NAME, e, ExitCode.FAILED))
    print(f"wrote {args.dst} ({args.to})")
    return ExitCode.OK
