"""``+stage=stats``: per-mask and per-image tables, the HTML report and the dataset card.

Output (``output=null`` means the dataset directory, see conf/stage/stats.yaml), a
folder or an fsspec URL: ``<output>/stats/masks.parquet``, ``images.parquet``,
``shards.parquet``, ``report.html``, ``figures/*.png`` and ``<output>/README.md``.

Every file is written under a temporary name and committed whole, so a killed run
leaves nothing truncated under a final name; the next run removes its temporary files.
"""
from __future__ import annotations

import contextlib
import logging
import posixpath
import time

import yaml
from omegaconf import DictConfig

from pipeline import storage
from pipeline.config.paths import dataset_paths
from pipeline.dataset.listing import committed_shards
from pipeline.dataset.tables import TableSink
from pipeline.execution.shard_map import map_shards
from pipeline.stats import card, report
from pipeline.stats.tables import IMAGE_SCHEMA, MASK_SCHEMA, SHARD_SCHEMA, shard_stats, summarize

log = logging.getLogger(__name__)

TABLES = {"masks": MASK_SCHEMA, "images": IMAGE_SCHEMA, "shards": SHARD_SCHEMA}


def _commit(fs, path: str, data: bytes) -> None:
    with storage.atomic_open(fs, path) as f:
        f.write(data)


def run(cfg: DictConfig) -> dict:
    """Returns {"images", "masks", "shards", "skipped", "masks_per_s_per_core",
    "wall_s", "report", "card"}; the last two are URLs (card None when not written)."""
    dataset, output = dataset_paths(cfg)
    shards = committed_shards(dataset)
    fs, root = storage.filesystem(output)
    stats_dir = storage.join(root, "stats")
    figures_dir = storage.join(root, card.FIGURES_DIR)
    # A killed run's temporary files, never read by anyone. In the dataset root only the
    # card's: other writers (a fully_auto run) may be committing files there right now.
    for directory in (stats_dir, figures_dir):
        storage.remove_temps(fs, directory)
    for stale in fs.glob(storage.join(root, f".README.md{storage.TEMP_MARKER}*")):
        fs.rm(stale)
    stage = cfg.stage
    reference = _reference(stage.get("reference"))  # before any work: a wrong path fails now
    start = time.perf_counter()
    # Results arrive in shard order and go straight to Parquet row groups, so memory
    # holds a window of shards whatever the size of the dataset.
    with contextlib.ExitStack() as stack:
        sinks = {name: stack.enter_context(TableSink(fs, storage.join(stats_dir, f"{name}.parquet"), schema))
                 for name, schema in TABLES.items()}
        for result in map_shards(shard_stats, shards, parallel=stage.parallel,
                                 min_shards_for_ray=stage.min_shards_for_ray,
                                 cluster=cfg.get("cluster"), desc="stats",
                                 concavity_per_bin=stage.concavity_per_bin, seed=stage.seed):
            sinks["masks"].write(result.masks)
            sinks["images"].write(result.images)
            sinks["shards"].write(result.shard)
            for key, reason in result.skipped:
                log.warning("skipped shard %s key %s: %s", result.shard["shard"][0].as_py(), key, reason)
    wall = time.perf_counter() - start

    summary = summarize(storage.url(fs, stats_dir))
    summary["concavity_per_bin"] = int(stage.concavity_per_bin)
    pngs = report.figure_pngs(summary, reference)
    for caption, png in pngs.items():
        _commit(fs, storage.join(figures_dir, f"{report.FIGURE_STEMS[caption]}.png"), png)
    report_path = storage.join(stats_dir, "report.html")
    title = posixpath.basename(dataset.rstrip("/"))
    notes = report.settings_notes(_recorded_config(dataset))
    for note in notes:
        log.warning("%s", note)
    _commit(fs, report_path, report.render(summary, title=title, pngs=pngs, notes=notes).encode("utf-8"))
    card_url = (card.write(output, dataset, summary, license=str(stage.license), shards=shards)
                if stage.card else None)
    # Printed, not only logged: the throughput is a figure people quote.
    print(f"stats: {summary['masks']} masks in {summary['table_cpu_s']:.2f} CPU s from JSON "
          f"bytes to the per-mask table = {summary['masks_per_s_per_core']:,.0f} masks/s per core "
          f"({wall:.1f} s wall for the shards, Ray start-up and concavity sample included)")
    if summary["skipped"]:
        print(f"stats: {summary['skipped']} records skipped (not SA-1B records; each is logged "
              "with its shard and key)")
    return {
        "images": summary["images"],
        "masks": summary["masks"],
        "shards": summary["shards"],
        "skipped": summary["skipped"],
        "masks_per_s_per_core": summary["masks_per_s_per_core"],
        "wall_s": wall,
        "report": storage.url(fs, report_path),
        "card": card_url,
    }


def _reference(spec: str | None) -> report.Reference:
    """(name, summary) of a reference stats run (``stage.reference``: its output folder,
    or its stats/ folder), or None."""
    if not spec:
        return None
    spec = str(spec).rstrip("/")
    fs, root = storage.filesystem(spec)
    stats_dir = root if posixpath.basename(root) == "stats" else storage.join(root, "stats")
    if not fs.isfile(storage.join(stats_dir, "masks.parquet")):
        raise FileNotFoundError(f"stage.reference={spec}: no stats/masks.parquet there; make one with "
                                "+stage=stats input=<reference dataset, e.g. SA-1B tars> output=<folder>")
    name = posixpath.basename(posixpath.dirname(stats_dir) if posixpath.basename(root) == "stats" else root)
    return name, summarize(storage.url(fs, stats_dir))


def _recorded_config(dataset: str) -> dict | None:
    """The dataset's config.yaml (what made it), read without resolvers; None if absent."""
    fs, root = storage.filesystem(dataset)
    path = storage.join(root, "config.yaml")
    if not fs.isfile(path):
        return None
    loaded = yaml.safe_load(fs.cat_file(path))
    return loaded if isinstance(loaded, dict) else None
