"""Input enumeration: any accepted input -> named entries, in a deterministic order.

Accepted inputs (local paths or any fsspec URL):
  - a directory, searched recursively for images (and WebDataset / SA-1B ``.tar`` shards);
  - a glob such as ``photos/**/*.jpg`` or ``s3://bucket/sa_0000*.tar``;
  - a text file (``.txt``, ``.lst``) or Parquet file listing one path per line / row;
    relative paths are relative to the list's own directory;
  - one ``.tar`` shard; every image member becomes an item, read back by byte range.

Enumeration is a pure function of the input: files are sorted (lists keep their order).
An entry's ``name`` (its path relative to the input) is its identity; which image id,
key and unit it gets is decided once, by the run's recorded plan (``pipeline.plan``).
"""
from __future__ import annotations

import posixpath
import tarfile
from dataclasses import dataclass
from typing import Iterable, Iterator

import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from pipeline import storage
from pipeline.storage import filesystem

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp")
TAR_EXTENSIONS = (".tar",)
LIST_EXTENSIONS = (".txt", ".lst")
PARQUET_EXTENSIONS = (".parquet",)
PARQUET_PATH_COLUMNS = ("path", "source", "file", "filename")


class InputError(ValueError):
    """The input cannot be used at all; raised before any work starts."""


@dataclass(frozen=True, slots=True)  # slots: a million entries must stay cheap on the driver
class Entry:
    """One input image as enumerated.

    name: its identity, the path relative to the input (for a tar member:
        ``<tar>/<member>``; for a list line: the line as written).
    url: the file to read (for a tar member: the tar itself).
    member: name of the member inside ``url`` when it is a tar, else None.
    offset, size: byte range of the member's data inside the tar.
    problem: why the entry cannot be read, found before opening it (None: readable).
    """

    name: str
    url: str
    member: str | None = None
    offset: int | None = None
    size: int | None = None
    problem: str | None = None

    @property
    def source(self) -> str:
        """Where the image came from, as written to the manifest and error tables."""
        return self.url if self.member is None else f"{self.url}#{self.member}"


@dataclass(frozen=True, slots=True)
class Item(Entry):
    """An entry placed by the plan: ``image_id`` (dataset-unique, stable across resumes)
    and ``key``, its name in the shard (``sa_<image_id>``)."""

    key: str = ""
    image_id: int = 0


@dataclass(frozen=True)
class Unit:
    """A fixed slice of the plan that becomes exactly one shard, ``sa_<index>.tar``."""

    index: int
    items: tuple[Item, ...]


def enumerate_input(url: str, exclude: str | None = None) -> list[Entry]:
    """Lists every image of ``url`` as an ``Entry``, in a deterministic order.

    ``exclude`` is a directory to skip (the run's own output when it lies inside the
    input). A name listed twice is listed once. Raises ``InputError`` when the input does
    not exist or holds no image.
    """
    fs, path = filesystem(url)
    entries: list[Entry] = []
    seen: set[str] = set()
    for relative, file_url in _names(fs, url, path, exclude):
        if file_url.lower().endswith(TAR_EXTENSIONS):
            found = [
                Entry(f"{relative}/{m.name}", file_url, m.name, m.offset_data, m.size)
                for m in _tar_members(fs, file_url)
            ]
        else:
            found = [Entry(relative, file_url)]
        for entry in found:
            if entry.name not in seen:  # a list naming the same file twice: annotate it once
                seen.add(entry.name)
                entries.append(entry)
    if not entries:
        raise InputError(f"no images found in {url!r} (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return entries


def _names(
    fs: AbstractFileSystem, url: str, path: str, exclude: str | None
) -> Iterator[tuple[str, str]]:
    """Yields ``(relative name, file url)`` for each file the input names."""
    if _has_magic(path):
        matches = sorted(p for p in fs.glob(path) if fs.isfile(p) and _wanted(p))
        if not matches:
            raise InputError(f"glob {url!r} matches no image or .tar file")
        root = _glob_root(path)
        for p in matches:
            yield posixpath.relpath(p, root), storage.url(fs, p)
        return
    if not fs.exists(path):
        raise InputError(f"input {url!r} does not exist")
    if fs.isdir(path):
        skip = None if exclude is None else filesystem(exclude)[1].rstrip("/") + "/"
        for p in sorted(fs.find(path)):
            if _wanted(p) and not (skip and p.startswith(skip)):
                yield posixpath.relpath(p, path), storage.url(fs, p)
        return
    lower = path.lower()
    if lower.endswith(LIST_EXTENSIONS + PARQUET_EXTENSIONS):
        base = posixpath.dirname(path)
        for listed in _listed(fs, path):
            # The name as listed (not resolved) keeps keys stable if the list moves.
            yield listed, _resolve(fs, base, listed)
        return
    if lower.endswith(IMAGE_EXTENSIONS + TAR_EXTENSIONS):
        yield posixpath.basename(path), storage.url(fs, path)
        return
    raise InputError(
        f"cannot tell what {url!r} is: expected a directory, a glob, a list "
        f"({', '.join(LIST_EXTENSIONS + PARQUET_EXTENSIONS)}), an image or a .tar shard"
    )


def _listed(fs: AbstractFileSystem, path: str) -> Iterable[str]:
    if path.lower().endswith(PARQUET_EXTENSIONS):
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        column = next((c for c in PARQUET_PATH_COLUMNS if c in table.column_names), None)
        if column is None:
            raise InputError(
                f"{path}: Parquet list needs a column named one of {PARQUET_PATH_COLUMNS}; "
                f"it has {table.column_names}"
            )
        return [p for p in table.column(column).to_pylist() if p]
    with fs.open(path, "rt", encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    return [line for line in lines if line and not line.startswith("#")]


def _resolve(fs: AbstractFileSystem, base: str, listed: str) -> str:
    if "://" in listed:
        return listed
    if posixpath.isabs(listed):
        return storage.url(fs, listed)
    return storage.url(fs, posixpath.join(base, listed))


def _tar_members(fs: AbstractFileSystem, url: str) -> list[tarfile.TarInfo]:
    """The image members of a WebDataset tar: one per key, the first image extension."""
    with fs.open(url, "rb") as f:
        # Mode "r:" seeks over member data, so listing reads only the headers.
        with tarfile.open(fileobj=f, mode="r:") as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
    by_key: dict[str, tarfile.TarInfo] = {}
    for m in members:
        if m.name.lower().endswith(IMAGE_EXTENSIONS):
            by_key.setdefault(_wds_key(m.name), m)
    return list(by_key.values())


def _wds_key(name: str) -> str:
    directory, base = posixpath.split(name)
    return posixpath.join(directory, base.split(".")[0])


def _wanted(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS + TAR_EXTENSIONS)


def _has_magic(path: str) -> bool:
    return any(c in path for c in "*?[")


def _glob_root(pattern: str) -> str:
    parts = pattern.split("/")
    fixed = []
    for part in parts:
        if _has_magic(part):
            break
        fixed.append(part)
    return "/".join(fixed) or "/"


def read_item(item: Entry) -> bytes:
    """The encoded bytes of ``item``: the whole file, or its member's range in a tar."""
    fs, path = filesystem(item.url)
    with fs.open(path, "rb") as f:
        if item.offset is None:
            return f.read()
        f.seek(item.offset)
        return f.read(item.size)
