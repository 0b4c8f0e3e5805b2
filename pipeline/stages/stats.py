"""``+stage=stats``: per-mask and per-image tables, the HTML report and the dataset card.

Output (``output=null`` means the dataset directory, see conf/stage/stats.yaml):
``<output>/stats/masks.parquet``, ``images.parquet``, ``shards.parquet``,
``report.html`` and ``<output>/README.md``.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from pipeline import card, report
from pipeline.dataset import committed_shards
from pipeline.stats import (IMAGE_SCHEMA, MASK_SCHEMA, SHARD_SCHEMA, map_shards,
                            shard_stats, summarize)

log = logging.getLogger(__name__)


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


def dataset_paths(cfg: DictConfig) -> tuple[str, Path]:
    """(input dataset, output directory) of a stage that writes beside the dataset: the
    output is ``output=`` when given, else the dataset directory itself."""
    if not cfg.get("input"):
        raise ValueError("input= must name a dataset directory (or an SA-1B tar)")
    dataset = str(cfg.input)
    if output_given(cfg):
        return dataset, Path(cfg.output)
    return dataset, Path(str(Path(dataset).parent) if dataset.endswith(".tar") else dataset)


def run(cfg: DictConfig) -> dict:
    """Returns {"images", "masks", "shards", "skipped", "masks_per_s_per_core",
    "wall_s", "report", "card"}; the last two are paths (card None when not written)."""
    dataset, output = dataset_paths(cfg)
    shards = committed_shards(dataset)
    stats_dir = output / "stats"
    stats_dir.mkdir(parents=True, exist_ok=True)
    stage = cfg.stage
    start = time.perf_counter()
    # Results arrive in shard order and go straight to Parquet row groups, so memory
    # holds a window of shards whatever the size of the dataset.
    with pq.ParquetWriter(stats_dir / "masks.parquet", MASK_SCHEMA) as masks_out, \
            pq.ParquetWriter(stats_dir / "images.parquet", IMAGE_SCHEMA) as images_out, \
            pq.ParquetWriter(stats_dir / "shards.parquet", SHARD_SCHEMA) as shards_out:
        for result in map_shards(shard_stats, shards, parallel=stage.parallel,
                                 min_shards_for_ray=stage.min_shards_for_ray,
                                 cluster=cfg.get("cluster"), desc="stats",
                                 concavity_per_bin=stage.concavity_per_bin, seed=stage.seed):
            masks_out.write_table(result.masks)
            images_out.write_table(result.images)
            shards_out.write_table(result.shard)
            for key, reason in result.skipped:
                log.warning("skipped %s %s: %s", result.shard["shard"][0].as_py(), key, reason)
    wall = time.perf_counter() - start

    summary = summarize(stats_dir)
    summary["concavity_per_bin"] = int(stage.concavity_per_bin)
    report_path = stats_dir / "report.html"
    report_path.write_text(report.render(summary, title=Path(dataset).name))
    card_path = card.write(output, dataset, summary) if stage.card else None
    # Printed, not only logged: the throughput is a figure people quote.
    print(f"stats: {summary['masks']} masks in {summary['table_cpu_s']:.2f} CPU s from JSON "
          f"bytes to the per-mask table = {summary['masks_per_s_per_core']:,.0f} masks/s per core "
          f"({wall:.1f} s wall for the shards, Ray start-up and concavity sample included)")
    return {
        "images": summary["images"],
        "masks": summary["masks"],
        "shards": summary["shards"],
        "skipped": summary["skipped"],
        "masks_per_s_per_core": summary["masks_per_s_per_core"],
        "wall_s": wall,
        "report": str(report_path),
        "card": str(card_path) if card_path else None,
    }
