"""Progress bars on stderr (tqdm), the one factory every command uses."""

from __future__ import annotations

import sys


def progress_bar(quiet: bool):
    """A tqdm factory for progress bars on stderr, or None when quiet."""
    if quiet:
        return None
    from tqdm import tqdm

    return lambda **kw: tqdm(file=sys.stderr, **kw)
