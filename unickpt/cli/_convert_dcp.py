"""The DCP half of ``unickpt convert``: ``torch.distributed.checkpoint`` directories in and out.

:func:`wants` says whether a ``convert`` call is about DCP (``--to dcp``, or ``--to unickpt``
from a directory holding a DCP ``.metadata``); :func:`run` then runs it through the torch
adapter (:mod:`unickpt_torch.dcp`), imported only here, so the CLI works without torch.
"""

from __future__ import annotations

import argparse
import os

from ._output import error, progress_bar
from .exit_codes import ExitCode

NAME = "convert"

#: Appended to the command's help: reading DCP means reading pickles, through torch.
TRUST_NOTE = (
    "Reading a DCP checkpoint (--to unickpt from a directory with a .metadata file) relies on "
    "torch's own DCP loader, and the DCP format stores its .metadata (and non-tensor values) "
    "as Python pickles: unickpt refuses a .metadata naming anything but DCP's classes and "
    "reads values with weights_only=True, but only convert DCP checkpoints you trust.")


def wants(args: argparse.Namespace) -> bool:
    return args.to == "dcp" or (
        args.to == "unickpt" and os.path.isfile(os.path.join(args.src, ".metadata")))


def run(args: argparse.Namespace) -> ExitCode:
    from ..errors import UnickptError

    try:
        from unickpt_torch.dcp import convert, convert_total_bytes
    except ImportError as e:
        return ExitCode(error(NAME, f"DCP needs the torch extra (pip install "
                                    f"'unickpt[torch]'): {e}", ExitCode.FAILED))
    try:
        total = None if args.quiet else convert_total_bytes(args.src, to=args.to)
        with progress_bar(f"converting to {args.to}", total, enabled=not args.quiet) as advance:
            convert(args.src, args.dst, to=args.to, overwrite=args.overwrite, progress=advance)
    except (UnickptError, OSError) as e:
        return ExitCode(error(NAME, e, ExitCode.FAILED))
    print(f"wrote {args.dst} ({args.to})")
    return ExitCode.OK
