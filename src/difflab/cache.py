"""Where difflab keeps files it computes or is given once and reuses across runs (reference statistics, weights)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$DIFFLAB_CACHE``, else ``$XDG_CACHE_HOME/difflab``, else ``~/.cache/difflab``."""
    if os.environ.get("DIFFLAB_CACHE"):
        return Path(os.environ["DIFFLAB_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "difflab"
