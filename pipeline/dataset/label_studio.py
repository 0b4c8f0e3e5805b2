"""SA-1B records as Label Studio tasks with the masks as predictions, for a team that
reviews in Label Studio: import ``tasks.json`` into a project set up with
``labeling_config.xml`` and every mask opens as an editable brush region (its predicted IoU
as the region's score); what ``+stage=export_label_studio`` writes.

Masks are Label Studio's own brush RLE (``value.format: "rle"``): the mask as an RGBA
image (255 where the mask is, in all four channels), flattened row by row, run-length
coded in Label Studio's bit layout: a 32-bit value count, a 5-bit word size - 1 (8), four
4-bit run-length field sizes - 1 (3, 4, 8, 16 bits), then per run a 1 (a run), the 2-bit
index of its length field, the length - 1, and the 8-bit value; padded with zeros to
whole bytes. Exact: no pixel changes (label_studio_converter's ``brush.decode_rle`` reads
it back in the tests).
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np
import pycocotools.mask as mask_utils

from pipeline import storage
from pipeline.dataset.shards import iter_shard

RUN_FIELD_BITS = (3, 4, 8, 16)  # the length field sizes this encoder declares
UNLABELED = "object"  # the brush label of a mask without a known category
FROM_NAME, TO_NAME = "label", "image"  # the control and object tag names of labeling_config.xml


@dataclass
class ShardTasks:
    """One shard's tasks (JSON-able) and ``skipped``: (key, reason) of records not converted."""

    shard: str
    tasks: list[dict[str, Any]] = field(default_factory=list)
    masks: int = 0
    unlabeled: int = 0  # masks without a category the dataset names: labelled UNLABELED
    skipped: list[tuple[str, str]] = field(default_factory=list)


def brush_rle(mask: np.ndarray) -> list[int]:
    """Label Studio's brush RLE of a boolean H x W mask (the module's docstring)."""
    flat = np.repeat(mask.ravel().astype(np.uint8) * np.uint8(255), 4)
    n = flat.size
    starts = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1])
    lengths = np.diff(np.concatenate([starts, [n]]))
    bits = [f"{n:032b}", f"{8 - 1:05b}", "".join(f"{b - 1:04b}" for b in RUN_FIELD_BITS)]
    for start, length in zip(starts.tolist(), lengths.tolist()):
        value = f"{int(flat[start]):08b}"
        while length > 0:
            take = min(length, 1 << RUN_FIELD_BITS[-1])
            index = next(i for i, b in enumerate(RUN_FIELD_BITS) if take <= 1 << b)
            bits.append(f"1{index:02b}{take - 1:0{RUN_FIELD_BITS[index]}b}{value}")
            length -= take
    text = "".join(bits)
    text += "0" * (-len(text) % 8)
    return np.packbits(np.frombuffer(text.encode(), np.uint8) - ord("0")).tolist()


def labeling_config(names: list[str]) -> str:
    """The project's labeling config: the image and a brush label per class."""
    labels = "\n".join(f"    <Label value={quoteattr(name)}/>" for name in names)
    return (f'<View>\n  <Image name="{TO_NAME}" value="${TO_NAME}" zoom="true"/>\n'
            f'  <BrushLabels name="{FROM_NAME}" toName="{TO_NAME}">\n{labels}\n  </BrushLabels>\n</View>\n')


def record_task(record: dict, key: str, image_url: str, names: dict[int, str], model_version: str,
                ) -> dict[str, Any]:
    """The task of one SA-1B record: the image's URL and one prediction holding its masks
    (a mask without a category of ``names`` is labelled UNLABELED)."""
    width, height = int(record["image"]["width"]), int(record["image"]["height"])
    results, scores = [], []
    for ann in record["annotations"]:
        mask = mask_utils.decode(ann["segmentation"]).astype(bool)
        category = ann.get("category_id")
        name = names.get(int(category)) if category is not None else None
        score = ann.get("predicted_iou")
        results.append({
            "id": f"m{ann['id']}", "from_name": FROM_NAME, "to_name": TO_NAME, "type": "brushlabels",
            "original_width": width, "original_height": height, "image_rotation": 0,
            "value": {"format": "rle", "rle": brush_rle(mask), "brushlabels": [name or UNLABELED]},
            **({"score": float(score)} if score is not None else {}),
        })
        if score is not None:
            scores.append(float(score))
    prediction = {"model_version": model_version, "result": results,
                  **({"score": float(np.mean(scores))} if scores else {})}
    return {"data": {TO_NAME: image_url, "key": key, "image_id": int(record["image"]["image_id"])},
            "predictions": [prediction]}


def shard_tasks(path: str, out_dir: str, url_prefix: str, names: dict[int, str]) -> ShardTasks:
    """The tasks of one shard; its JPEGs committed under ``out_dir``/images."""
    fs, root = storage.filesystem(out_dir)
    result = ShardTasks(posixpath.basename(path))
    for sample in iter_shard(path, images=True, problems=True):
        name = posixpath.basename(sample.key)
        if sample.problem is None:
            try:
                model = str(sample.record["image"].get("model_sha256") or "sam-data-engine")[:12]
                task = record_task(sample.record, sample.key, f"{url_prefix}{name}.jpg", names, model)
            except Exception as exc:  # one broken record must not fail the export
                sample.problem = f"{type(exc).__name__}: {exc}"
        if sample.problem is not None or sample.jpg is None:
            result.skipped.append((sample.key, sample.problem or "no image"))
            continue
        with storage.atomic_open(fs, storage.join(root, "images", f"{name}.jpg")) as f:
            f.write(sample.jpg)
        result.tasks.append(task)
        regions = task["predictions"][0]["result"]
        result.masks += len(regions)
        result.unlabeled += sum(r["value"]["brushlabels"] == [UNLABELED] for r in regions)
    return result
