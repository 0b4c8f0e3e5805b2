"""Input enumeration: any accepted input -> deterministic keys -> fixed units.

Accepted inputs (local paths or any fsspec URL):
  - a directory, searched recursively for images (and WebDataset / SA-1B ``.tar`` shards);
  - a glob such as ``photos/**/*.jpg`` or ``s3://bucket/sa_0000*.tar``;
  - a text file (``.txt``, ``.lst``) or Parquet file listing one path per line / row;
    relative paths are relative to the list's own directory;
  - one ``.tar`` shard; every image member becomes an item, read back by byte range.

Enumeration is a pure function of the input: files are sorted (lists keep their order),
so the same input always gives the same keys, image ids and units.
"""
from __future__ import annotations

import hashlib
import posixpath
import re
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


@dataclass(frozen=True, slots=True)  # slots: a million items must stay cheap on the driver
class Item:
    """One input image.

    key: unique, deterministic WebDataset ``__key__`` (no dots, no slashes).
    image_id: dataset-unique positive integer, its 1-based position in the enumeration.
    url: the file to read (for a tar member: the tar itself).
    member: name of the member inside ``url`` when it is a tar, else None.
    offset, size: byte range of the member's data inside the tar.
    """

    key: str
    image_id: int
    url: str
    member: str | None = None
    offset: int | None = None
    size: int | None = None

    @property
    def source(self) -> str:
        """Where the image came from, as written to the manifest and error tables."""
        return self.url if self.member is None else f"{self.url}#{self.member}"


@dataclass(frozen=True)
class Unit:
    """A fixed slice of the input that becomes exactly one shard, ``sa_<index>.tar``."""

    index: int
    items: tuple[Item, ...]


def make_key(relative_name: str) -> str:
    """A readable, unique WebDataset key for an input named ``relative_name``.

    The stem keeps keys readable; the hash of the full relative name keeps them unique
    when two folders hold files of the same name. 64 bits make a collision among a
    billion images about a 3% chance, so ``enumerate_input`` still checks.
    """
    stem = posixpath.basename(relative_name).split(".")[0]
    # WebDataset splits a member name at the first dot of its basename: no dots, slashes.
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", stem)[:40] or "image"
    digest = hashlib.sha1(relative_name.encode("utf-8")).hexdigest()[:16]
    return f"{slug}-{digest}"


def split_units(items: list[Item], images_per_unit: int) -> list[Unit]:
    """Cuts the enumeration into consecutive units of ``images_per_unit`` items."""
    if images_per_unit < 1:
        raise ValueError(f"images_per_unit must be >= 1, got {images_per_unit}")
    return [
        Unit(index=i // images_per_unit, items=tuple(items[i : i + images_per_unit]))
        for i in range(0, len(items), images_per_unit)
    ]


def enumerate_input(url: str, exclude: str | None = None) -> list[Item]:
    """Lists every image of ``url`` as an ``Item``, in a deterministic order.

    ``exclude`` is a directory to skip (the run's own output when it lies inside the
    input). Raises ``InputError`` when the input does not exist or holds no image.
    """
    fs, path = filesystem(url)
    names = list(_names(fs, url, path, exclude))
    items: list[Item] = []
    seen: dict[str, str] = {}
    for relative, file_url in names:
        if file_url.lower().endswith(TAR_EXTENSIONS):
            members = _tar_members(fs, file_url)
            entries = [(f"{relative}/{m.name}", file_url, m) for m in members]
        else:
            entries = [(relative, file_url, None)]
        for name, entry_url, member in entries:
            key = make_key(name)
            if key in seen:
                if seen[key] == name:
                    continue  # a list naming the same file twice: annotate it once
                raise InputError(f"key collision: {seen[key]!r} and {name!r} both map to {key}")
            seen[key] = name
            items.append(
                Item(
                    key=key,
                    image_id=len(items) + 1,
                    url=entry_url,
                    member=None if member is None else member.name,
                    offset=None if member is None else member.offset_data,
                    size=None if member is None else member.size,
                )
            )
    if not items:
        raise InputError(f"no images found in {url!r} (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return items


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


def read_item(item: Item) -> bytes:
    """The encoded bytes of ``item``: the whole file, or its member's range in a tar."""
    fs, path = filesystem(item.url)
    with fs.open(path, "rb") as f:
        if item.offset is None:
            return f.read()
        f.seek(item.offset)
        return f.read(item.size)
