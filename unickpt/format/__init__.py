"""State tree <-> bytes.  See docs/FORMAT.md for the normative specification."""

from .checksum import available as checksums_available
from .checksum import require as require_checksums
from .manifest import FORMAT_VERSION, MANIFEST_NAME, READABLE_VERSIONS
from .reader import CheckpointReader, is_committed
from .writer import DATA_FILE

__all__ = ["FORMAT_VERSION", "READABLE_VERSIONS", "MANIFEST_NAME", "DATA_FILE",
           "CheckpointReader", "is_committed", "checksums_available", "require_checksums"]
