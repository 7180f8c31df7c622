"""The ``unickpt`` command line (``unickpt`` script and ``python -m unickpt``).

Each command is a module of this package with ``NAME``, ``HELP``, ``add_arguments(parser)``
and ``run(args) -> ExitCode``, listed in :data:`COMMANDS`: registration is this explicit
list, nothing happens on import.  The parser is the standard library's ``argparse`` and the
modules import nothing heavy at top level (numpy, the format, rich are imported inside
``run``), so ``unickpt ls`` starts fast.  Every command exits with a code from
:class:`~unickpt.cli.exit_codes.ExitCode`.

>>> import tempfile, numpy as np, unickpt
>>> p = tempfile.mkdtemp() + "/ck"
>>> _ = unickpt.save(p, {"w": np.zeros(2)})
>>> main(["verify", "--quiet", p])  # doctest: +ELLIPSIS
OK .../ck: 1 arrays, 16 B verified
0
>>> main(["verify", p + "-missing"])
3
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from . import cmd_convert, cmd_diff, cmd_inspect, cmd_ls, cmd_migrate, cmd_verify
from ._output import error
from .exit_codes import TABLE, ExitCode

__all__ = ["main", "build_parser", "COMMANDS", "ExitCode"]

#: The commands, in the order ``unickpt --help`` lists them.
COMMANDS = (cmd_inspect, cmd_verify, cmd_diff, cmd_ls, cmd_convert, cmd_migrate)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # usage errors exit with ExitCode.USAGE
        self.print_usage(sys.stderr)
        self.exit(int(ExitCode.USAGE), f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``unickpt`` argument parser with every command of :data:`COMMANDS`."""
    parser = _Parser(
        prog="unickpt", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Inspect, verify, compare, list, convert and migrate unickpt checkpoints."
                    " Sizes are in binary units (1 KiB = 1024 bytes).",
        epilog=f"exit status (every command):\n{TABLE}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.NAME, help=cmd.HELP, description=cmd.HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=f"exit status:\n{TABLE}")
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit code (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return int(ExitCode.USAGE)
    from ..errors import CorruptCheckpointError

    try:
        return int(args._run(args))
    except CorruptCheckpointError as e:  # last resort: never a raw traceback for a bad file
        return error(args.command, e, ExitCode.UNREADABLE)
    except KeyboardInterrupt:
        print("unickpt: interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    except BrokenPipeError:  # `unickpt ls ROOT | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return int(ExitCode.OK)
