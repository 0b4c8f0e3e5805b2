"""A Parquet table committed whole: what the reading stages (stats, validate) write.

Every output goes through fsspec (``pipeline.storage``), so ``output=s3://...`` writes
objects, not a local folder named ``s3:``.
"""
from __future__ import annotations

import contextlib
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage


class TableSink:
    """A Parquet table written in row groups and committed atomically on success.

    Empty row groups are not written and a table that ends with no rows is not
    committed at all (a stale one under the same name is removed): Hugging Face
    ``datasets`` fails on a Parquet file whose only row group is empty.

    >>> with TableSink(fs, "out/stats/masks.parquet", MASK_SCHEMA) as sink:
    ...     sink.write(table)
    """

    def __init__(self, fs: Any, path: str, schema: pa.Schema) -> None:
        self.fs, self.path, self.schema = fs, path, schema
        self.rows = 0
        self._opener = storage.atomic_open(fs, path)
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> "TableSink":
        self._writer = pq.ParquetWriter(self._opener.__enter__(), self.schema)
        return self

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self._writer.write_table(table)
            self.rows += table.num_rows

    def __exit__(self, kind, error, traceback) -> bool | None:
        self._writer.close()
        if kind is None and not self.rows:
            # Nothing to commit: the opener discards its temporary file when handed an
            # exception (and does not re-raise it), then a previous run's table goes.
            self._opener.__exit__(_Empty, _Empty(), None)
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.path)
            return None
        return self._opener.__exit__(kind, error, traceback)


class _Empty(Exception):
    """Handed to ``atomic_open`` to discard a table with no rows."""
