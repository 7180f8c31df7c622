"""Former name of :mod:`unickpt.format.checksum` (kept while modules still import it)."""

from .checksum import available, digest, hasher, require, warn_unverified

__all__ = ["available", "digest", "hasher", "require", "warn_unverified"]
