"""``+stage=export_yolo``: an SA-1B-format dataset as a YOLO segmentation dataset, the
format ultralytics trains on (``yolo segment train data=<output>/yolo/data.yaml``).

The conversion is ``pipeline.dataset.yolo``'s; shards convert in parallel (Ray from
``stage.min_shards_for_ray`` shards), every file is committed atomically, and
``data.yaml`` is written last: a folder with it is complete. What a polygon cannot hold
(holes, masks in pieces, masks too small) is counted and printed, never changed silently.
"""
from __future__ import annotations

import logging

import yaml
from omegaconf import DictConfig

from pipeline import storage
from pipeline.config.paths import dataset_paths
from pipeline.dataset.listing import committed_shards, read_categories
from pipeline.dataset.yolo import class_indices, shard_yolo
from pipeline.execution.shard_map import map_shards

log = logging.getLogger(__name__)

COUNTS = ("images", "masks", "too_small", "holes_filled", "multi_part", "unlabeled")


def run(cfg: DictConfig) -> dict:
    """Returns {"path" (data.yaml's URL), "images", "masks", "too_small", "holes_filled",
    "multi_part", "skipped"}."""
    dataset, output = dataset_paths(cfg)
    stage = cfg.stage
    fs, root = storage.filesystem(output)
    directory = storage.join(root, stage.folder)
    fs.makedirs(directory, exist_ok=True)
    classes, names = class_indices(read_categories(str(dataset)))
    totals = dict.fromkeys(COUNTS, 0)
    skipped = 0
    for part in map_shards(shard_yolo, committed_shards(dataset), parallel=stage.parallel,
                           min_shards_for_ray=stage.min_shards_for_ray, cluster=cfg.get("cluster"),
                           desc="export_yolo", out_dir=storage.url(fs, directory), classes=classes):
        for key in COUNTS:
            totals[key] += getattr(part, key)
        for key, reason in part.skipped:
            log.warning("skipped shard %s key %s: %s", part.shard, key, reason)
        skipped += len(part.skipped)
    data_yaml = storage.join(directory, "data.yaml")
    # No "path": ultralytics then resolves train/val against this file's folder, wherever
    # it is run from. Both name every image (no split here). "object" (the last class) is
    # left out when no mask needs it.
    if classes and not totals["unlabeled"]:
        names = names[:-1]
    spec = {"train": "images", "val": "images", "names": dict(enumerate(names))}
    with storage.atomic_open(fs, data_yaml) as f:
        f.write(yaml.safe_dump(spec, sort_keys=False).encode())
    url = storage.url(fs, data_yaml)
    changed = [f"{totals[k]} {k.replace('_', ' ')}" for k in ("too_small", "holes_filled", "multi_part", "unlabeled")
               if totals[k]]
    print(f"export_yolo: {totals['images']} images, {totals['masks']} masks -> {url}"
          + (f"; polygons: {', '.join(changed)} (pipeline/dataset/yolo.py)" if changed else "")
          + (f"; {skipped} records skipped (each logged with its shard and key)" if skipped else ""))
    return {"path": url, **totals, "skipped": skipped}
