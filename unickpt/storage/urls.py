"""Which storage a path lives on: local paths on :class:`LocalStorage`, URLs on fsspec.

>>> type(storage_for("/tmp/run")).__name__, type(storage_for("memory://run")).__name__
('LocalStorage', 'FsspecStorage')
>>> is_url("s3://bucket/run"), is_url("/tmp/run"), is_url("C:/x")
(True, False, False)
"""

from __future__ import annotations

import os
import re

from ..errors import MissingDependencyError
from .local import LocalStorage
from .protocol import Storage

__all__ = ["storage_for", "is_url"]

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]+://")
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


def is_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a URL (``scheme://...``) rather than a local path."""
    return isinstance(path, str) and bool(_URL.match(path))


def storage_for(path: str | os.PathLike, storage_options: dict | None = None) -> Storage:
    """The storage holding ``path``: :class:`LocalStorage` for local paths, an
    :class:`~unickpt.storage.objstore.FsspecStorage` for URLs (``s3://``, ``gs://``,
    ``memory://``, ``file://``...), given ``storage_options`` (endpoint, credentials; by
    default the usual fsspec/boto environment)."""
    if not is_url(path):
        return LocalStorage()
    scheme = str(path).split("://", 1)[0].lower()
    try:
        import fsspec  # noqa: F401

        from .objstore import FsspecStorage
        return FsspecStorage(str(path), storage_options)
    except ImportError as e:
        extra = _EXTRAS.get(scheme, "s3")
        raise MissingDependencyError(
            f"{path}: reading or writing {scheme}:// URLs needs fsspec and its {scheme} "
            f"backend ({e.name or e}); install unickpt[{extra}]") from None
