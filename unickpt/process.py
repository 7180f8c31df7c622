"""Is a process on this host still running?  The one answer every stale-entry rule asks.

Two rules use it, with different stakes (docs/manager.md, docs/storage.md):

* a temporary entry ``.unickpt-tmp.<name>.<host>.<pid>.<rand>`` whose pid runs no process
  here is a leftover of a crashed save (see ``unickpt.manager.run_root.temp_is_stale``): a
  pid of 0 or less names no process, so such a name is garbage, never written by a live save;
* the lease of an object-store run root (``unickpt.storage.objstore.LeaseLock``) is taken
  over early only when its holder is *known* dead: named on this host with a pid that runs no
  process (:func:`holder_known_dead`).  A lease whose pid is missing or unusable names no
  holder we can check, so it is respected until it expires, as is any lease of another host.

>>> import os
>>> pid_alive(os.getpid()), pid_alive(0), pid_alive(-1)
(True, False, False)
>>> holder_known_dead("h", 0, this_host="h"), holder_known_dead("h", None, this_host="h")
(False, False)
"""

from __future__ import annotations

import os

__all__ = ["pid_alive", "holder_known_dead"]


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process on this host.

    A pid of 0 or less is never alive: it names no process (``os.kill`` would signal a whole
    process group, or every process, and report success).  A permission error means the
    process exists (another user's).
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:  # larger than any pid the system can hold
        return False
    return True


def holder_known_dead(host: object, pid: object, *, this_host: str) -> bool:
    """Whether a lock holder recorded as ``(host, pid)`` is certainly gone.

    True only for a holder on ``this_host`` with a positive integer pid that runs no process.
    An unknown holder (another host, a missing, non-integer or non-positive pid) is not
    known dead: the caller must wait for its lease to expire instead.
    """
    if host != this_host or isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    return not pid_alive(pid)
