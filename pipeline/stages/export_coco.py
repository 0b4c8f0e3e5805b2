"""``+stage=export_coco``: a COCO instances JSON of an SA-1B-format dataset.

Class-agnostic (one category, "object", id 1) unless the dataset has categories
(``categories.json``, written by box_prompts and augment): then those, and each mask's
``category_id``. ``iscrowd`` 0, segmentations kept as compressed RLE (what pycocotools'
COCO and COCOeval read), area recomputed from the RLE, bbox too in COCO's convention,
except for masks whose record names the object's box (``box``: a detector's box, or a
refined or pasted one), which is kept; a record's ``score`` is kept too. The JSON is
streamed: images and annotations are serialised per shard into part files and
concatenated in shard order, so the export never holds the dataset in memory.
Ids are the dataset's own; run +stage=validate first to be sure they are unique.
"""
from __future__ import annotations

import json
import posixpath
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pycocotools.mask as mask_utils
from omegaconf import DictConfig

from pipeline.stages.stats import dataset_paths
from pipeline.dataset import committed_shards, read_categories
from pipeline.shards import iter_shard
from pipeline.stats import map_shards

log = logging.getLogger(__name__)

CATEGORY = {"id": 1, "name": "object", "supercategory": "object"}


@dataclass
class ShardCoco:
    """One converted shard: two part files holding the JSON texts of its image and
    annotation entries, comma-separated without brackets, ready to be concatenated."""

    images_path: str
    annotations_path: str
    num_images: int
    num_annotations: int


def coco_entries(record: dict, key: str) -> tuple[dict, list[dict]]:
    """COCO image entry and annotation entries of one SA-1B record."""
    image = record["image"]
    annotations = record["annotations"]
    entry = {"id": int(image["image_id"]), "width": int(image["width"]),
             "height": int(image["height"]), "file_name": f"{key}.jpg"}
    rles = [a["segmentation"] for a in annotations]
    areas = mask_utils.area(rles) if rles else []
    boxes = mask_utils.toBbox(rles) if rles else []
    anns = [{
        "id": int(a["id"]),
        "image_id": entry["id"],
        "category_id": int(a.get("category_id", CATEGORY["id"])),
        "segmentation": {"size": list(a["segmentation"]["size"]),
                         "counts": a["segmentation"]["counts"]},
        "area": int(area),
        "bbox": [float(v) for v in a.get("box", box)],
        "iscrowd": 0,
        "predicted_iou": a.get("predicted_iou"),
        "stability_score": a.get("stability_score"),
        **({"score": a["score"]} if "score" in a else {}),
    } for a, area, box in zip(annotations, areas, boxes)]
    return entry, anns


def shard_coco(path: str, parts_dir: str, images_dir: str | None = None) -> ShardCoco:
    """Converts one shard into part files under ``parts_dir`` (a shard's annotations
    run to gigabytes: they go to disk, not through Ray's object store); with
    ``images_dir`` also writes its JPEGs there."""
    stem = Path(parts_dir) / Path(path).name
    images_path, annotations_path = f"{stem}.images", f"{stem}.annotations"
    n_images = n_annotations = 0
    with open(images_path, "w") as images, open(annotations_path, "w") as annotations:
        for sample in iter_shard(path, images=bool(images_dir)):
            if images_dir and sample.jpg is not None:
                Path(images_dir, f"{posixpath.basename(sample.key)}.jpg").write_bytes(sample.jpg)
            entry, anns = coco_entries(sample.record, sample.key)
            images.write((",\n" if n_images else "") + json.dumps(entry))
            for ann in anns:
                annotations.write((",\n" if n_annotations else "") + json.dumps(ann))
                n_annotations += 1
            n_images += 1
    return ShardCoco(images_path, annotations_path, n_images, n_annotations)


def _append(out: IO[str], part_path: str) -> None:
    with open(part_path) as part:
        shutil.copyfileobj(part, out)
    Path(part_path).unlink()


def run(cfg: DictConfig) -> dict:
    """Returns {"path", "images", "annotations"}."""
    dataset, output = dataset_paths(cfg)
    stage = cfg.stage
    shards = committed_shards(dataset)
    path = output / stage.file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    images_dir = None
    if stage.extract_images:
        images_dir = path.parent / "images"
        images_dir.mkdir(exist_ok=True)
    n_images = n_annotations = 0
    parts_dir = Path(tempfile.mkdtemp(prefix=".parts-", dir=path.parent))
    # Images and annotations are two arrays of one object: annotation parts wait on disk
    # while image parts stream into the output, then follow them.
    annotation_parts: list[str] = []
    try:
        with open(path.with_suffix(".part"), "w") as out:
            out.write('{"info": {"description": "class-agnostic export of %s", "version": "1.0"},\n'
                      % json.dumps(Path(dataset).name)[1:-1])
            categories = read_categories(str(dataset)) or [CATEGORY]
            out.write('"licenses": [],\n"categories": %s,\n"images": [\n' % json.dumps(categories))
            for part in map_shards(shard_coco, shards, parallel=stage.parallel,
                                   min_shards_for_ray=stage.min_shards_for_ray,
                                   cluster=cfg.get("cluster"), desc="export_coco",
                                   parts_dir=str(parts_dir),
                                   images_dir=str(images_dir) if images_dir else None):
                if part.num_images:
                    out.write(",\n" if n_images else "")
                    _append(out, part.images_path)
                if part.num_annotations:
                    annotation_parts.append(part.annotations_path)
                n_images += part.num_images
                n_annotations += part.num_annotations
            out.write('\n],\n"annotations": [\n')
            for i, annotations_path in enumerate(annotation_parts):
                out.write(",\n" if i else "")
                _append(out, annotations_path)
            out.write("\n]}\n")
    finally:
        shutil.rmtree(parts_dir, ignore_errors=True)
    # Renamed only when complete, so a reader never sees a truncated JSON.
    path.with_suffix(".part").replace(path)
    print(f"export_coco: {n_images} images, {n_annotations} annotations -> {path}")
    return {"path": str(path), "images": n_images, "annotations": n_annotations}
