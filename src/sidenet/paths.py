"""Where sidenet keeps what it downloads or trains: the user's cache directory, never the repo."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """Return sidenet's cache folder: ``$SIDENET_CACHE``, else ``$XDG_CACHE_HOME/sidenet``, else
    ``~/.cache/sidenet``. The folder is created on first use."""
    root = os.environ.get("SIDENET_CACHE")
    if root:
        path = Path(root)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        path = (Path(xdg) if xdg else Path.home() / ".cache") / "sidenet"
    path.mkdir(parents=True, exist_ok=True)
    return path
