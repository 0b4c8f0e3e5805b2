"""What the stages that read a dataset share (stats, validate, export_coco): where they
write, how they map a function over shards, how they read records that may not be
SA-1B's, and how they commit a Parquet table.

Every output goes through fsspec (``pipeline.storage``), so ``output=s3://...`` writes
objects, not a local folder named ``s3:``.
"""
from __future__ import annotations

import contextlib
import posixpath
from collections import deque
from typing import Any, Callable, Iterator, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from pipeline import storage
from pipeline.paths import user_path

T = TypeVar("T")


# --- where a reading stage writes ------------------------------------------------------
def output_given(cfg: DictConfig) -> bool:
    """Whether the user chose ``output=``: on the command line, or by composing a config
    with a non-null output. Hydra's default (its run directory) does not count."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = HydraConfig.get().overrides.task
    except ValueError:  # composed, not launched: the config is what the caller chose
        return OmegaConf.select(cfg, "output", throw_on_resolution_failure=False) is not None
    return any(o.split("=", 1)[0].lstrip("+~") == "output" and not o.endswith("=null")
               for o in overrides)


def dataset_paths(cfg: DictConfig) -> tuple[str, str]:
    """(input dataset, output directory) of a stage that writes beside the dataset, both
    resolved once here (``user_path``): the output is ``output=`` when given, else the
    dataset directory itself (the folder of the tar when the input is one SA-1B tar)."""
    if not cfg.get("input"):
        raise ValueError("input= must name a dataset directory (or an SA-1B tar)")
    dataset = user_path(str(cfg.input)).rstrip("/")
    if output_given(cfg):
        return dataset, user_path(str(cfg.output)).rstrip("/")
    return dataset, posixpath.dirname(dataset) if dataset.endswith(".tar") else dataset


def output_or_none(cfg: DictConfig) -> str | None:
    """``cfg.output`` resolved, or None when it is null or cannot resolve (a config
    composed outside a Hydra run has no ``${hydra:runtime.output_dir}``)."""
    output = OmegaConf.select(cfg, "output", throw_on_resolution_failure=False)
    return user_path(str(output)).rstrip("/") if output else None


# --- committing a table ----------------------------------------------------------------
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


# --- mapping over shards ---------------------------------------------------------------
def map_shards(
    fn: Callable[..., T],
    shards: list[str],
    *,
    parallel: str = "auto",
    min_shards_for_ray: int = 4,
    cluster: Any = None,
    desc: str = "shards",
    **kwargs: Any,
) -> Iterator[T]:
    """Yields ``fn(shard, **kwargs)`` for each shard, in shard order.

    ``parallel``: "local" runs in this process; "ray" runs one Ray task per shard (a
    bounded window of tasks in flight, so results stream to the writer instead of
    piling up in the object store); "auto" picks Ray from ``min_shards_for_ray`` shards,
    below which starting Ray costs more than it saves. ``cluster`` is ``cfg.cluster``
    (address, num_cpus, runtime_env), used when Ray is not already connected.
    """
    if parallel not in ("auto", "local", "ray"):
        raise ValueError(f"parallel must be auto, local or ray, not {parallel!r}")
    use_ray = parallel == "ray" or (parallel == "auto" and len(shards) >= min_shards_for_ray)
    if not use_ray:
        for shard in tqdm(shards, desc=desc, unit="shard"):
            yield fn(shard, **kwargs)
        return
    yield from _map_shards_ray(fn, shards, cluster=cluster, desc=desc, **kwargs)


def _map_shards_ray(fn: Callable[..., T], shards: list[str], *, cluster: Any, desc: str,
                    **kwargs: Any) -> Iterator[T]:
    import ray

    from pipeline.execution.cluster import connect

    started_here = connect(cluster if cluster is not None else {})
    try:
        task = ray.remote(num_cpus=1, max_retries=2)(fn)
        window = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
        pending: deque = deque()
        with tqdm(total=len(shards), desc=f"{desc} (ray)", unit="shard") as bar:
            for shard in shards:
                pending.append(task.remote(shard, **kwargs))
                if len(pending) >= window:
                    yield ray.get(pending.popleft())
                    bar.update()
            while pending:
                yield ray.get(pending.popleft())
                bar.update()
    finally:
        if started_here:
            ray.shutdown()
