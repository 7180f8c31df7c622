"""State tree <-> bytes.  See docs/FORMAT.md for the normative specification."""

from .manifest import FORMAT_VERSION, MANIFEST_NAME
from .reader import CheckpointReader, is_committed
from .writer import DATA_FILE

__all__ = ["FORMAT_VERSION", "MANIFEST_NAME", "DATA_FILE", "CheckpointReader", "is_committed"]
