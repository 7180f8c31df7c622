"""Where bytes live: the storage protocol every read and write of unickpt goes through.

The format writer and reader, the manager and the command line never touch the filesystem
themselves: they call a :class:`Storage`.  :class:`LocalStorage` (the default) is the POSIX
filesystem, with the fast paths (``pwrite``/``pwritev``, ``sync_file_range``, ``mmap``);
another backend (an object store, the in-memory one of the tests) implements the same few
methods with the guarantees documented on each.  docs/storage.md is the guide for backend
authors.

A checkpoint is *staged* (written into a fresh temporary location next to its final name)
and then *committed* (published under its final name in one atomic step).  Transient names
carry the prefixes below plus the writer's host and pid, so that leftovers of a crashed save
can be told apart from a save still running.

>>> name = temp_name("/runs/a/step_3").rsplit("/", 1)[1]
>>> parse_temp_name(name)[0], parse_temp_name(name)[1] == host_tag()
('step_3', True)
"""

from .local import LocalStorage
from .protocol import (
    ARCHIVE_PREFIX,
    LOCK_NAME,
    STALE_TEMP_SECONDS,
    TEMP_PREFIX,
    TRASH_PREFIX,
    NotRegularFileError,
    ReadHandle,
    Sharing,
    Storage,
    WriteHandle,
    WriterLock,
    can_share,
    host_tag,
    is_transient_name,
    parse_previous_name,
    parse_temp_name,
    previous_name,
    staged,
    temp_name,
    trash_name,
)
from .urls import is_url, storage_for

__all__ = ["Storage", "Sharing", "can_share", "WriteHandle", "ReadHandle", "WriterLock", "NotRegularFileError",
           "LocalStorage", "staged", "TEMP_PREFIX", "TRASH_PREFIX", "LOCK_NAME",
           "STALE_TEMP_SECONDS", "host_tag", "temp_name", "trash_name", "parse_temp_name",
           "is_transient_name", "ARCHIVE_PREFIX", "previous_name", "parse_previous_name",
           "storage_for", "is_url"]
