"""What made a dataset: the code version recorded with every output."""
from __future__ import annotations

import subprocess
from functools import cache

from pipeline.paths import PROJECT_ROOT


@cache
def code_version() -> str:
    """The commit the code runs from (``-dirty`` with local edits), else the package
    version: recorded with every output so a dataset names the code that made it."""
    try:
        out = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True, text=True, timeout=10, check=True,
        )
        return "git:" + out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return "sam-data-engine " + version("sam-data-engine")
        except PackageNotFoundError:
            return "unknown"
