"""Files through fsspec: atomic commits of whole files, and clean-up of abandoned temps.

A file that others may read (a shard, a manifest part) is always written under a hidden
temporary name in its final directory and renamed into place once complete. On a local
disk the rename is atomic, and the file and then its directory are fsynced around it, so
a commit survives a power cut (the rename of an unsynced file can reach the disk before
its data); on object stores the final object only appears once the copy is complete.
Readers (webdataset, pyarrow.dataset) skip hidden names, so nothing half-written is ever
visible under its final name.
"""
from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from typing import BinaryIO, Iterator

import fsspec
from fsspec import AbstractFileSystem

TEMP_MARKER = ".tmp-"


def filesystem(url: str) -> tuple[AbstractFileSystem, str]:
    """Returns ``(filesystem, path)`` for a local path or any fsspec URL.

    Directory listings are never cached: other processes commit units all the time, and
    a cached listing (s3fs, gcsfs keep one per process) would hide their manifest parts
    or claim that a file listed a moment ago does not exist.
    """
    return fsspec.core.url_to_fs(url, use_listings_cache=False)


def url(fs: AbstractFileSystem, path: str) -> str:
    """The URL to hand to another process for ``path``: plain paths stay plain."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def join(root: str, *parts: str) -> str:
    # fsspec paths are always '/'-separated, whatever the operating system.
    return posixpath.join(root, *parts)


@contextlib.contextmanager
def atomic_open(fs: AbstractFileSystem, path: str) -> Iterator[BinaryIO]:
    """Opens ``path`` for binary writing; the file appears under its name only on success.

    If the body raises, the temporary file is removed and ``path`` is left untouched.
    """
    directory, name = posixpath.split(path)
    fs.makedirs(directory, exist_ok=True)
    temp = posixpath.join(directory, f".{name}{TEMP_MARKER}{uuid.uuid4().hex}")
    try:
        if is_local(fs):
            with open(temp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, path)
            fsync_directory(directory)
        else:
            with fs.open(temp, "wb") as f:
                yield f
            fs.mv(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            fs.rm(temp)
        raise


def is_local(fs: AbstractFileSystem) -> bool:
    return "file" in fs.protocol


def fsync_directory(directory: str) -> None:
    """Makes a rename into ``directory`` durable (POSIX: the entry lives in the directory)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_temps(fs: AbstractFileSystem, directory: str) -> int:
    """Deletes temporary files left by killed writers in ``directory``; returns how many."""
    if not fs.exists(directory):
        return 0
    stale = [p for p in fs.ls(directory, detail=False) if TEMP_MARKER in posixpath.basename(p)]
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path)
    return len(stale)
