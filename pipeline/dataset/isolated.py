"""Inputs isolated as poison (they killed their worker), persisted in the output.

``<out>/isolated/<key>.json`` per isolated image: a rerun starts with them excluded
instead of repeating the crashes that found them. ``stage.retry_isolated=true`` gives
them another chance (e.g. when the crashes were a node's OOM killer, not the image).
"""
from __future__ import annotations

import json
import posixpath

from pipeline import storage

ISOLATED_DIR = "isolated"


def load(output: str) -> dict[str, str]:
    """key -> reason for every image isolated in ``output`` so far."""
    fs, root = storage.filesystem(output)
    directory = storage.join(root, ISOLATED_DIR)
    if not fs.isdir(directory):
        return {}
    found = {}
    for path in fs.ls(directory, detail=False):
        name = posixpath.basename(path)
        if name.endswith(".json") and not name.startswith("."):
            found[name[: -len(".json")]] = json.loads(fs.cat_file(path))["reason"]
    return found


def record(output: str, key: str, source: str, unit: int, reason: str) -> None:
    fs, root = storage.filesystem(output)
    entry = {"key": key, "source": source, "unit": unit, "reason": reason}
    with storage.atomic_open(fs, storage.join(root, ISOLATED_DIR, f"{key}.json")) as f:
        f.write(json.dumps(entry).encode("utf-8"))
