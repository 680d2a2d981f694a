"""Where flopmatch keeps things computed once (fitted codebooks, cached encodings, trained evaluators)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: $FLOPMATCH_CACHE if set, else ~/.cache/flopmatch (created on demand)."""
    root = Path(os.environ.get("FLOPMATCH_CACHE") or Path.home() / ".cache" / "flopmatch")
    root.mkdir(parents=True, exist_ok=True)
    return root
