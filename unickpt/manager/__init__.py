"""The checkpoint manager: where a run starts, when it saves, what it keeps.

* :mod:`.core`: :class:`CheckpointManager`, the decisions and the schedule;
* :mod:`.start`: where a run starts (``resolve_start``) and the restore of its checkpoint;
* :mod:`.run_root`: :class:`RunRoot`, the root on its storage (scan, describe, lock,
  cleanup, archive, delete), also used by ``unickpt ls``;
* :mod:`.records`: what the manager reports and records;
* :mod:`.background`: the writer of async saves;
* :mod:`.factory`: :class:`ManagerProtocol` and :func:`create_manager`.
"""

from ..policy.options import ManagerConfig
from .core import CheckpointManager
from .factory import ManagerProtocol, create_manager
from .records import CheckpointInfo, Restored, StartDecision
from .run_root import RunRoot

__all__ = ["CheckpointManager", "ManagerConfig", "RunRoot", "ManagerProtocol",
           "create_manager", "CheckpointInfo", "Restored", "StartDecision"]
