"""One function over many shards, in shard order: in this process for a few shards, as
Ray tasks for many (what the reading stages stats, validate and export_coco share)."""
from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterator, TypeVar

from tqdm import tqdm

from pipeline.execution.cluster import connect

T = TypeVar("T")


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
