"""What every command prints the same way: sizes, JSON values, errors, progress bars.

Sizes are binary (IEC) units everywhere: 1 KiB = 1024 bytes.

>>> human_size(512), human_size(1536), human_size(3 << 30)
('512 B', '1.5 KiB', '3.0 GiB')
>>> jsonable({"b": b"\\x00\\xff", "x": float("inf")})
{'b': {'bytes_hex': '00ff'}, 'x': 'inf'}
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from .exit_codes import ExitCode

__all__ = ["human_size", "jsonable", "error", "progress_bar", "plain_table", "want_progress",
           "counting_downloads", "PROGRESS_ENV"]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_size(n: float) -> str:
    """``n`` bytes in binary units: ``B`` as an integer, larger units with one decimal."""
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def jsonable(x: Any) -> Any:
    """Manifest values as strict JSON (bytes as hex, non-finite floats as strings)."""
    if isinstance(x, bytes):
        return {"bytes_hex": x.hex()}
    if isinstance(x, float) and not math.isfinite(x):
        return repr(x)
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def error(command: str, e: BaseException | str, code: ExitCode) -> int:
    """Print ``unickpt COMMAND: error: ...`` on stderr (never a traceback); return ``code``."""
    what = e if isinstance(e, str) else f"{type(e).__name__}: {e}"
    print(f"unickpt {command}: error: {what}", file=sys.stderr)
    return int(code)


#: ``UNICKPT_PROGRESS=1`` shows every progress bar (also when stderr is not a terminal, and
#: below the size thresholds); ``0`` shows none.  ``--quiet`` wins over both.
PROGRESS_ENV = "UNICKPT_PROGRESS"


def _forced() -> bool | None:
    v = os.environ.get(PROGRESS_ENV, "").strip().lower()
    return True if v in ("1", "always", "yes", "true") else \
        False if v in ("0", "never", "no", "false") else None


def want_progress(quiet: bool, nbytes: int | None = None, min_bytes: int = 0) -> bool:
    """Whether to show a bar: not ``quiet``; then :data:`PROGRESS_ENV` if set; else only
    for ``min_bytes`` or more on a terminal.

    >>> want_progress(True, 1 << 40)
    False
    """
    if quiet:
        return False
    forced = _forced()
    if forced is not None:
        return forced
    return (nbytes is None or nbytes >= min_bytes) and sys.stderr.isatty()


def remote(storage: Any) -> bool:
    """Whether ``storage`` is an object store (reads are downloads, counted as they arrive)."""
    return not getattr(storage, "maps_files", True)


@contextlib.contextmanager
def counting_downloads(storage: Any, advance: Callable[[int], None]
                       ) -> Iterator[Callable[[int], None] | None]:
    """Feed ``advance`` the bytes downloaded from ``storage`` while the block runs, when it
    is an object store; yields the per-array callback to use instead otherwise (None then)."""
    if not remote(storage):
        yield advance
        return
    from ..storage.objio import observe_reads

    with observe_reads(advance):
        yield None


@contextlib.contextmanager
def progress_bar(label: str, total: int | None, *, enabled: bool = True
                 ) -> Iterator[Callable[[int], None]]:
    """A byte progress bar on stderr (rich, imported only when shown); yields ``advance(n)``."""
    if not enabled or _forced() is False:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(TextColumn(label), BarColumn(), DownloadColumn(binary_units=True),
                  TransferSpeedColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True, force_terminal=_forced() or None),
                  transient=True) as bar:
        task = bar.add_task(label, total=total or None)
        yield lambda n: bar.advance(task, n)


def plain_table(header: list[str], rows: list[list[str]], right: frozenset[int] | set[int] = frozenset()
                ) -> str:
    """Columns aligned with two spaces, never cut (no terminal-width truncation).

    >>> print(plain_table(["step", "size"], [["1", "2 B"], ["10", "3.0 KiB"]], right={0}))
    step  size
       1  2 B
      10  3.0 KiB
    """
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for r in [header, *rows]:
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
