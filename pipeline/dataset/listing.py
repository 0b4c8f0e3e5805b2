"""A dataset on disk, and the one way every reader lists what is committed in it.

A dataset written by this project::

    <root>/shards/sa_%06d.tar          one shard per unit (pipeline.dataset.shards)
    <root>/manifest/part_%06d.parquet  one per committed unit, written last (pipeline.dataset.manifest)
    <root>/errors/part_%06d.parquet    the unit's failed inputs, when it has any

A shard counts only once its unit's manifest part exists: a shard renamed into place by
a run killed before the manifest part was written is *uncommitted*, ignored by every
reader (and reported), and replaced by the next run. Readers never glob ``shards/``.

Inputs that are not this project's datasets are read as they are: a folder of SA-1B
tars (``sa_000000.tar`` ...), one ``.tar``, a glob of tars, or a list of any of these.
"""
from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from pipeline import storage
from pipeline.dataset import manifest, shards

log = logging.getLogger(__name__)


@dataclass
class Listing:
    """Shards of one or more datasets: ``committed`` (read these) and ``uncommitted``
    (present on disk with no manifest part: a killed run's leftovers, never read)."""

    committed: list[str] = field(default_factory=list)
    uncommitted: list[str] = field(default_factory=list)


def is_dataset(url: str) -> bool:
    """True when ``url`` is a dataset root written by this project (it has a manifest)."""
    fs, root = storage.filesystem(url)
    return fs.isdir(storage.join(root, manifest.MANIFEST_DIR))


def list_shards(spec: str | Sequence[str] | None, *, required: bool = True) -> Listing:
    """The shards named by ``spec``: a dataset root, a folder of tars, a tar, a glob, or a
    list of those. Committed shards come in unit order, as URLs another process can open.

    Uncommitted shards are logged once here. ``required``: raise ``FileNotFoundError``
    when nothing committed is found.
    """
    specs = [spec] if isinstance(spec, str) else list(spec or [])
    listing = Listing()
    for one in specs:
        part = _list_one(str(one))
        listing.committed += part.committed
        listing.uncommitted += part.uncommitted
    if listing.uncommitted:
        log.warning(
            "ignoring %d shard(s) with no manifest part (a run was killed after writing the "
            "shard and before committing it; the next run on that output replaces them): %s",
            len(listing.uncommitted), ", ".join(listing.uncommitted[:5]),
        )
    if required and not listing.committed:
        raise FileNotFoundError(
            f"no committed shards found at {spec!r}: expected a dataset written by this project "
            "(shards/ + manifest/), a folder of SA-1B tars, a .tar, or a glob of tars"
        )
    return listing


def committed_shards(spec: str | Sequence[str] | None, *, required: bool = True) -> list[str]:
    """``list_shards(spec).committed``: what every reader of a dataset reads."""
    return list_shards(spec, required=required).committed


def iter_samples(spec: str | Sequence[str], images: bool = True) -> Iterator[shards.Sample]:
    """Every committed sample of ``spec``, shard after shard (see ``shards.iter_shard``)."""
    for url in committed_shards(spec):
        yield from shards.iter_shard(url, images=images)


def _list_one(url: str) -> Listing:
    fs, path = storage.filesystem(url)
    if any(c in path for c in "*?[") and not fs.exists(path):
        return Listing(committed=[storage.url(fs, p) for p in sorted(fs.glob(path)) if p.endswith(".tar")])
    if path.endswith(".tar"):
        if not fs.isfile(path):
            raise FileNotFoundError(f"shard {url!r} does not exist")
        return Listing(committed=[url])
    if not fs.isdir(path):
        raise FileNotFoundError(f"dataset {url!r} does not exist (expected a dataset folder, a .tar or a glob)")
    if fs.isdir(storage.join(path, manifest.MANIFEST_DIR)):
        return _list_dataset(fs, path)
    # Not ours: an SA-1B download (tars in the folder itself, or in shards/).
    for folder in (path, storage.join(path, shards.SHARDS_DIR)):
        tars = sorted(p for p in _files(fs, folder) if p.endswith(".tar") and not _hidden(p))
        if tars:
            return Listing(committed=[storage.url(fs, p) for p in tars])
    return Listing()


def _list_dataset(fs, root: str) -> Listing:
    committed = manifest.committed_units(storage.url(fs, root))
    shard_dir = storage.join(root, shards.SHARDS_DIR)
    present = {posixpath.basename(p) for p in _files(fs, shard_dir) if not _hidden(p)}
    listing = Listing()
    for unit in sorted(committed):
        name = shards.shard_name(unit)
        if name in present:
            listing.committed.append(storage.url(fs, storage.join(shard_dir, name)))
        else:
            log.warning("%s: unit %d is committed but its shard %s is missing", root, unit, name)
    committed_names = {shards.shard_name(u) for u in committed}
    listing.uncommitted = [
        storage.url(fs, storage.join(shard_dir, name))
        for name in sorted(present) if name.endswith(".tar") and name not in committed_names
    ]
    return listing


def _files(fs, folder: str) -> list[str]:
    return fs.ls(folder, detail=False) if fs.isdir(folder) else []


def _hidden(path: str) -> bool:
    return posixpath.basename(path).startswith(".")


# Categories of a dataset whose masks carry a ``category_id`` (box_prompts, augment):
# ``<root>/categories.json``, a COCO ``categories`` list, written by the stage that made
# the masks. A dataset without one is class-agnostic (every mask an "object").
CATEGORIES_FILE = "categories.json"


def read_categories(root: str) -> list[dict] | None:
    """The dataset's COCO categories, or None for a class-agnostic dataset."""
    fs, path = storage.filesystem(root)
    try:
        return json.loads(fs.cat_file(storage.join(path, CATEGORIES_FILE)))
    except (FileNotFoundError, NotADirectoryError):  # not a dataset root (e.g. a tar)
        return None


def write_categories(root: str, categories: list[dict]) -> None:
    """Commits ``categories`` (COCO entries: id, name, supercategory) as the dataset's."""
    fs, path = storage.filesystem(root)
    with storage.atomic_open(fs, storage.join(path, CATEGORIES_FILE)) as f:
        f.write(json.dumps(categories, indent=1).encode("utf-8"))
