"""Parquet manifest and error tables, one part per unit.

``manifest/part_%06d.parquet`` is written last for a unit: its presence is the commit
marker. It has one row per input image of the unit, annotated or not, so a complete
dataset lists every enumerated key exactly once. ``errors/part_%06d.parquet`` holds the
reason for each image whose status is "error".

Columns are documented beside each schema; ``key`` is ``sa_<image_id>`` and ``source``
is the input the image came from.
"""
from __future__ import annotations

import re
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline import storage

MANIFEST_DIR = "manifest"
ERRORS_DIR = "errors"
PART_PATTERN = "part_{:06d}.parquet"
_PART_RE = re.compile(r"^part_(\d{6})\.parquet$")

STATUS_OK = "ok"
STATUS_ERROR = "error"

MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # sa_<image_id>: the sample's name in its shard
        ("image_id", pa.int64()),
        ("shard", pa.string()),  # shard file name, "" when the image failed
        ("source", pa.string()),  # the input it came from (a path or URL, url#member in a tar)
        ("source_sha256", pa.string()),  # of the input's bytes; "" when they could not be read
        ("width", pa.int32()),  # of the stored image; 0 when the image failed
        ("height", pa.int32()),
        ("num_masks", pa.int32()),
        ("model_sha256", pa.string()),
        ("status", pa.string()),  # "ok" or "error"
        ("blurred_regions", pa.int32()),  # faces/plates blurred (stage.privacy); null when off
    ]
)
ERRORS_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("phase", pa.string()),  # where it failed: enumerate, read, decode, annotate, isolated
        ("reason", pa.string()),
    ]
)


def write_part(url: str, directory: str, unit_index: int, rows: Iterable[dict[str, Any]]) -> None:
    """Atomically writes ``<url>/<directory>/part_<unit>.parquet`` from ``rows``.

    The schema is chosen by ``directory`` (MANIFEST_DIR or ERRORS_DIR). An errors part
    with no rows is not written (and a previous run's part for the unit is removed):
    Hugging Face ``datasets`` fails on a Parquet file whose only row group is empty, and
    ``read_table`` reads an absent part as no rows. A manifest part is always written:
    it is the unit's commit marker.
    """
    schema = MANIFEST_SCHEMA if directory == MANIFEST_DIR else ERRORS_SCHEMA
    table = pa.Table.from_pylist(list(rows), schema=schema)
    fs, root = storage.filesystem(url)
    path = storage.join(root, directory, PART_PATTERN.format(unit_index))
    if directory == ERRORS_DIR and not table.num_rows:
        if fs.exists(path):
            fs.rm(path)
        return
    with storage.atomic_open(fs, path) as f:
        pq.write_table(table, f)


def committed_units(url: str) -> set[int]:
    """Indices of the units whose manifest part exists under the output ``url``."""
    fs, root = storage.filesystem(url)
    directory = storage.join(root, MANIFEST_DIR)
    if not fs.exists(directory):
        return set()
    names = (p.rsplit("/", 1)[-1] for p in fs.ls(directory, detail=False))
    return {int(m.group(1)) for m in map(_PART_RE.match, names) if m}


def read_table(url: str, directory: str = MANIFEST_DIR) -> pa.Table:
    """All committed parts of the manifest (or of the errors table) as one table."""
    schema = MANIFEST_SCHEMA if directory == MANIFEST_DIR else ERRORS_SCHEMA
    fs, root = storage.filesystem(url)
    path = storage.join(root, directory)
    if not fs.exists(path):
        return schema.empty_table()
    # Dataset discovery skips hidden names, so temporary files are never read.
    return ds.dataset(path, format="parquet", filesystem=fs, schema=schema).to_table()
