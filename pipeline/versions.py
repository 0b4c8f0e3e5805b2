"""Registered models other than SAM: ``<output>/models/<kind>_<version>/`` (kind
``detector`` or ``verifier``; version v001, v002, ...), next to retrain's SAM versions.

A folder counts as registered once its ``REGISTERED_FILE`` exists: it is written last.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import re
from typing import Any, Sequence

from pipeline import storage

MODELS_DIR = "models"
REGISTERED_FILE = "train_summary.json"


def version_dir(output: str, kind: str, version: str) -> str:
    """``<output>/models/<kind>_<version>``."""
    return storage.join(output, MODELS_DIR, f"{kind}_{version}")


def next_version(output: str, kind: str) -> str:
    """The first free name of v001, v002, ... for ``kind`` under ``<output>/models/``."""
    fs, root = storage.filesystem(storage.join(output, MODELS_DIR))
    names = {posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)} if fs.isdir(root) else set()
    taken = {int(m.group(1)) for n in names if (m := re.fullmatch(rf"{re.escape(kind)}_v(\d{{3,}})", n))}
    n = 1
    while n in taken:
        n += 1
    return f"v{n:03d}"


def write(directory: str, name: str, data: bytes | str) -> None:
    """Writes ``directory/name`` atomically."""
    fs, root = storage.filesystem(directory)
    with storage.atomic_open(fs, storage.join(root, name)) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def mark_registered(directory: str, summary: dict[str, Any]) -> None:
    """Writes the folder's ``REGISTERED_FILE``: call it last."""
    write(directory, REGISTERED_FILE, json.dumps(summary, indent=2, default=str))


def read_summary(directory: str) -> dict[str, Any] | None:
    """The ``REGISTERED_FILE`` of a registered folder, or None when it is not registered."""
    fs, root = storage.filesystem(directory)
    try:
        return json.loads(fs.cat_file(storage.join(root, REGISTERED_FILE)))
    except FileNotFoundError:
        return None


def read_files(path: str, names: Sequence[str], what: str) -> dict[str, bytes]:
    """The bytes of the files ``names`` of the registered folder at ``path`` (the
    folder, or one of those files in it), read once: check and load the same bytes."""
    fs, inner = storage.filesystem(path)
    folder = posixpath.dirname(inner) if posixpath.basename(inner) in names else inner
    try:
        return {name: fs.cat_file(storage.join(folder, name)) for name in names}
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{what} {path!r}: expected a folder with {', '.join(names)} (train one with +stage={what}; "
            f"it registers <output>/models/{what}_<version>/)"
        ) from None


def identity(files: dict[str, bytes]) -> str:
    """The sha256 that identifies a registered model made of several files."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}:{hashlib.sha256(files[name]).hexdigest()}\n".encode())
    return digest.hexdigest()


def check_identity(files: dict[str, bytes], expected_sha256: str | None, path: str) -> None:
    """Refuses files that are not the ones a run recorded (``expected_sha256``)."""
    if expected_sha256 is not None and identity(files) != expected_sha256:
        raise ValueError(f"{path}: its files changed after the run recorded them (sha256 {identity(files)}, "
                         f"expected {expected_sha256}); the dataset would mix two models")
