"""Where things are: the checkout, and user paths resolved once, on the driver.

Stages hand paths to Ray workers whose working directory is not the user's (Ray Train
workers run in a session directory), so every path a user gives is made absolute here,
against the directory the command was run from, before any worker sees it.
"""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def is_url(path: str) -> bool:
    """True for ``scheme://...`` (fsspec URLs); ``file://`` counts as a URL too."""
    return "://" in path


def user_path(path: str | os.PathLike | None) -> str | None:
    """``path`` made absolute against the working directory; URLs and None unchanged.

    Hydra (version_base 1.3) leaves the working directory alone, so ``os.getcwd()`` is
    where the user ran the command.
    """
    if path is None:
        return None
    path = str(path)
    if is_url(path):
        return path
    return os.path.abspath(os.path.expanduser(path))
