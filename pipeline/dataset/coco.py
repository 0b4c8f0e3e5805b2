"""SA-1B records as COCO instances: the conversion of one record (``coco_entries``) and of
one shard into part files ready to be concatenated (``shard_coco``), what
``+stage=export_coco`` streams into one JSON.

Class-agnostic (one category, "object", id 1) unless the dataset has categories
(``categories.json``, written by box_prompts, augment and the annotation tool): then
those, and each mask's ``category_id``; masks without one get "object" under an id of
its own (``unlabeled_category``), never a labelled category's. ``iscrowd`` 0,
segmentations kept as compressed RLE (what pycocotools' COCO and COCOeval read), area
recomputed from the RLE, bbox too in COCO's convention, except for masks whose record
names the object's box (``box``: a detector's box, or a refined or pasted one), which is
kept; a record's ``score`` is kept too.
"""
from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import IO

import pycocotools.mask as mask_utils

from pipeline import storage
from pipeline.dataset.shards import iter_shard

CATEGORY = {"id": 1, "name": "object", "supercategory": "object"}
PARTS_PREFIX = ".parts-"


@dataclass
class ShardCoco:
    """One converted shard: two part files (URLs) holding the JSON texts of its image
    and annotation entries, comma-separated without brackets, ready to be concatenated;
    the counts; and ``skipped``, (key, reason) of the records that were not converted."""

    shard: str
    images_path: str
    annotations_path: str
    num_images: int = 0
    num_annotations: int = 0
    num_unlabeled: int = 0  # annotations without a category_id (given the unlabeled id)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def unlabeled_category(categories: list[dict] | None) -> dict:
    """The category of masks without a ``category_id``: "object", id 1, in a
    class-agnostic dataset; in one with categories, "object" under the id after the
    largest, so that an unlabelled mask never passes for the category that has id 1."""
    if not categories:
        return CATEGORY
    return {**CATEGORY, "id": max(int(c["id"]) for c in categories) + 1}


def coco_entries(record: dict, key: str, unlabeled_id: int = CATEGORY["id"]) -> tuple[dict, list[dict]]:
    """COCO image entry and annotation entries of one SA-1B record (masks without a
    ``category_id`` get ``unlabeled_id``)."""
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
        "category_id": int(unlabeled_id if a.get("category_id") is None else a["category_id"]),
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


def shard_coco(path: str, parts_dir: str, images_dir: str | None = None,
               unlabeled_id: int = CATEGORY["id"]) -> ShardCoco:
    """Converts one shard into part files under ``parts_dir`` (a shard's annotations
    run to gigabytes: they go to storage, not through Ray's object store); with
    ``images_dir`` also commits its JPEGs there. Both are folders or URLs. Masks without
    a category get ``unlabeled_id`` (counted in ``num_unlabeled``)."""
    fs, parts = storage.filesystem(parts_dir)
    stem = storage.join(parts, posixpath.basename(path))
    result = ShardCoco(posixpath.basename(path), storage.url(fs, f"{stem}.images"),
                       storage.url(fs, f"{stem}.annotations"))
    images_fs, images_root = storage.filesystem(images_dir) if images_dir else (None, None)
    with fs.open(f"{stem}.images", "w") as images, fs.open(f"{stem}.annotations", "w") as annotations:
        for sample in iter_shard(path, images=bool(images_dir), problems=True):
            if sample.problem is None:
                try:
                    entry, anns = coco_entries(sample.record, sample.key, unlabeled_id)
                except Exception as exc:  # one broken record must not fail the export
                    sample.problem = f"{type(exc).__name__}: {exc}"
            if sample.problem is not None:
                result.skipped.append((sample.key, sample.problem))
                continue
            if images_dir and sample.jpg is not None:
                name = f"{posixpath.basename(sample.key)}.jpg"
                with storage.atomic_open(images_fs, storage.join(images_root, name)) as f:
                    f.write(sample.jpg)
            images.write((",\n" if result.num_images else "") + json.dumps(entry))
            for ann, source in zip(anns, sample.record["annotations"]):
                annotations.write((",\n" if result.num_annotations else "") + json.dumps(ann))
                result.num_annotations += 1
                result.num_unlabeled += source.get("category_id") is None
            result.num_images += 1
    return result


def append_part(out: IO[bytes], part_url: str) -> None:
    fs, part = storage.filesystem(part_url)
    with fs.open(part, "rb") as f:
        while chunk := f.read(1 << 24):
            out.write(chunk)
    fs.rm(part)


def remove_stale_parts(fs, directory: str) -> None:
    """Parts folders and temporary JSONs of killed runs (nobody reads them)."""
    for stale in fs.glob(storage.join(directory, f"{PARTS_PREFIX}*")):
        fs.rm(stale, recursive=True)
    storage.remove_temps(fs, directory)


