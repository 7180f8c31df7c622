"""The exit status of every ``unickpt`` command: one table, used by all of them.

>>> int(ExitCode.UNREADABLE)
3
>>> print(TABLE.splitlines()[0])
  0  ok: the command did what was asked (verify: intact; diff: bitwise equal)
"""

from __future__ import annotations

import enum

__all__ = ["ExitCode", "TABLE"]


class ExitCode(enum.IntEnum):
    """Process exit codes (also the README's table and the end of ``unickpt --help``)."""

    OK = 0
    #: the answer is "no": verify found damaged arrays, diff found differences
    NO = 1
    #: bad command line (unknown command or option, missing or invalid argument)
    USAGE = 2
    #: a checkpoint or run root cannot be read (missing, damaged manifest, unknown version)
    UNREADABLE = 3
    #: the operation was refused or failed (convert/migrate mismatch, destination exists,
    #: a needed optional dependency is not installed)
    FAILED = 4
    #: interrupted with Ctrl-C
    INTERRUPTED = 130


_MEANING = {
    ExitCode.OK: "ok: the command did what was asked (verify: intact; diff: bitwise equal)",
    ExitCode.NO: "the answer is no: verify found damaged arrays, diff found differences",
    ExitCode.USAGE: "bad command line: unknown command or option, missing or invalid argument",
    ExitCode.UNREADABLE: "cannot read the checkpoint or run root (missing, not a directory, "
                         "damaged manifest, unknown format version)",
    ExitCode.FAILED: "the operation was refused or failed (convert/migrate: mismatch, "
                     "destination exists, optional dependency missing); nothing was written",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C)",
}

#: The table as printed at the end of ``unickpt --help``.
TABLE = "\n".join(f"{int(c):>3}  {_MEANING[c]}" for c in ExitCode)
