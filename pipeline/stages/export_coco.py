"""``+stage=export_coco``: a COCO instances JSON of an SA-1B-format dataset.

The conversion is ``pipeline.dataset.coco``'s. The JSON is streamed: images and
annotations are serialised per shard into part files (in a hidden ``.parts-*`` folder
beside the JSON) and concatenated in shard order, so the export never holds the dataset
in memory. The JSON appears under its name only when complete; the parts folder is
removed at the end and, after a killed run, by the next one. Output may be a folder or an fsspec URL (``s3://...``).

A JSON member that is not an SA-1B record is skipped and reported with its shard and key.
Ids are the dataset's own; run +stage=validate first to be sure they are unique.
"""
from __future__ import annotations

import contextlib
import json
import logging
import posixpath
import uuid

from omegaconf import DictConfig

from pipeline import storage
from pipeline.config.paths import dataset_paths
from pipeline.dataset.coco import PARTS_PREFIX, append_part, remove_stale_parts, shard_coco, unlabeled_category
from pipeline.dataset.listing import committed_shards, read_categories
from pipeline.execution.shard_map import map_shards

log = logging.getLogger(__name__)

def run(cfg: DictConfig) -> dict:
    """Returns {"path", "images", "annotations", "skipped"}; ``path`` is a URL."""
    dataset, output = dataset_paths(cfg)
    stage = cfg.stage
    shards = committed_shards(dataset)
    fs, root = storage.filesystem(output)
    path = storage.join(root, stage.file_name)
    directory = posixpath.dirname(path)
    fs.makedirs(directory, exist_ok=True)
    remove_stale_parts(fs, directory)
    images_dir = storage.url(fs, storage.join(directory, "images")) if stage.extract_images else None
    parts_dir = storage.join(directory, f"{PARTS_PREFIX}{uuid.uuid4().hex}")
    fs.makedirs(parts_dir, exist_ok=True)
    n_images = n_annotations = n_skipped = n_unlabeled = 0
    # Images and annotations are two arrays of one object: annotation parts wait in
    # storage while image parts stream into the output, then follow them.
    annotation_parts: list[str] = []
    try:
        with storage.atomic_open(fs, path) as out:
            name = json.dumps(posixpath.basename(dataset))[1:-1]
            categories = read_categories(str(dataset)) or []
            unlabeled = unlabeled_category(categories)
            out.write(('{"info": {"description": "export of %s", "version": "1.0"},\n'
                       '"licenses": [],\n"images": [\n' % name).encode())
            for part in map_shards(shard_coco, shards, parallel=stage.parallel,
                                   min_shards_for_ray=stage.min_shards_for_ray,
                                   cluster=cfg.get("cluster"), desc="export_coco",
                                   parts_dir=storage.url(fs, parts_dir), images_dir=images_dir,
                                   unlabeled_id=unlabeled["id"]):
                if part.num_images:
                    out.write(b",\n" if n_images else b"")
                    append_part(out, part.images_path)
                if part.num_annotations:
                    annotation_parts.append(part.annotations_path)
                for key, reason in part.skipped:
                    log.warning("skipped shard %s key %s: %s", part.shard, key, reason)
                n_images += part.num_images
                n_annotations += part.num_annotations
                n_unlabeled += part.num_unlabeled
                n_skipped += len(part.skipped)
            out.write(b'\n],\n"annotations": [\n')
            for i, annotations_path in enumerate(annotation_parts):
                out.write(b",\n" if i else b"")
                append_part(out, annotations_path)
            # Categories go last: only then is it known whether any mask needs "object".
            if n_unlabeled or not categories:
                categories = [*categories, unlabeled]
            out.write(('\n],\n"categories": %s}\n' % json.dumps(categories)).encode())
    finally:
        with contextlib.suppress(FileNotFoundError):  # an object store has no empty folders
            fs.rm(parts_dir, recursive=True)
    url = storage.url(fs, path)
    print(f"export_coco: {n_images} images, {n_annotations} annotations -> {url}"
          + (f"; {n_skipped} records skipped (not SA-1B records, each logged with its shard "
             "and key)" if n_skipped else ""))
    return {"path": url, "images": n_images, "annotations": n_annotations, "skipped": n_skipped}
