"""Where depthprune keeps its cache (converted models, rendered lm-eval tasks); a leaf module."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "DEPTHPRUNE_CACHE"


def cache_dir() -> Path:
    """User cache for converted models and task files; ``$DEPTHPRUNE_CACHE`` overrides it."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "depthprune"
