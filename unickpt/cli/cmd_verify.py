"""``unickpt verify CKPT``: recompute every array checksum, naming the damaged leaves.

Arrays whose bytes are all present and match their checksum count as intact, also in an
array file that was truncated: the count of damaged arrays is exact.
"""

from __future__ import annotations

import argparse

from ._output import counting_downloads, error, human_size, progress_bar, remote, want_progress
from .exit_codes import ExitCode

NAME = "verify"
HELP = "recompute every array checksum; exit 1 naming the damaged leaves"
#: Show a progress bar only when verifying this much or more (and stderr is a terminal).
PROGRESS_MIN_BYTES = 256 << 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="checkpoint directory")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> ExitCode:
    from ..errors import UnickptError
    from ..format.reader import CheckpointReader

    try:
        with CheckpointReader(args.ckpt) as r:
            total = sum(a.nbytes for a in r.manifest.arrays)
            narrays = len(r.manifest.arrays)
            # an object store: the bar counts the bytes downloaded (whole array files)
            work = sum(f.size for f in r.manifest.files) if remote(r.storage) else total
            show = want_progress(args.quiet, work, PROGRESS_MIN_BYTES)
            with progress_bar("verifying", work, enabled=show) as advance, \
                    counting_downloads(r.storage, advance) as per_array:
                bad = r.verify_all(per_array)
                files = dict(r.file_damage)
    except (UnickptError, OSError) as e:
        return ExitCode(error(NAME, e, ExitCode.UNREADABLE))
    if bad or files:
        print(f"CORRUPT {args.ckpt}: {len(bad)} of {narrays} arrays damaged (checksum "
              f"mismatch, truncated or missing data), {narrays - len(bad)} intact"
              f"{':' if bad else ''}")
        for leaf in bad:
            print(f"  {leaf}")
        for why in files.values():
            print(f"file damaged: {why}")
        print("restore from another checkpoint (with a manager: resume=<step>)")
        return ExitCode.NO
    if r.file_damage:  # every array checks out, but a file does not load as it is
        print(f"CORRUPT {args.ckpt}: {narrays} arrays intact, but: "
              f"{'; '.join(r.file_damage.values())}")
        return ExitCode.NO
    print(f"OK {args.ckpt}: {narrays} arrays, {human_size(total)} verified")
    return ExitCode.OK
