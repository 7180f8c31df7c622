"""``python -m unickpt``: the unickpt command line (same as the ``unickpt`` script)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
