"""SA-1B records as a YOLO segmentation dataset (the format ultralytics trains on): one
``images/<key>.jpg`` and one ``labels/<key>.txt`` per image, a line per mask ``<class> x1
y1 x2 y2 ...`` with the polygon's vertices normalised to [0, 1], and ``data.yaml`` naming
the classes; what ``+stage=export_yolo`` writes.

A polygon cannot hold what a mask can, and the converter says what it changed:
  * holes are filled: the polygon is the mask's outer boundary (``holes_filled``);
  * a mask in several pieces becomes one polygon visiting each piece's boundary, joined
    by zero-width bridges at their nearest vertices (ultralytics joins COCO's multi-part
    segmentations the same way) (``multi_part``);
  * a mask too small for a polygon (no boundary of 3 vertices) is left out and counted
    (``too_small``).
Classes: the dataset's categories (``categories.json``) in id order, and "object" last
for masks without one of them (``unlabeled``); a class-free dataset has "object" only.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

import cv2
import numpy as np
import pycocotools.mask as mask_utils

from pipeline import storage
from pipeline.dataset.shards import iter_shard


@dataclass
class ShardYolo:
    """What one shard's conversion wrote and changed; ``skipped``: (key, reason) of the
    records that were not converted."""

    shard: str
    images: int = 0
    masks: int = 0
    too_small: int = 0
    holes_filled: int = 0
    multi_part: int = 0
    unlabeled: int = 0  # masks of a labelled dataset without one of its categories: class "object"
    skipped: list[tuple[str, str]] = field(default_factory=list)


UNLABELED = "object"


def class_indices(categories: list[dict] | None) -> tuple[dict[int, int], list[str]]:
    """(category_id -> YOLO class index, class names) of a dataset's categories; the class
    after the last (``len(ids)``) is UNLABELED, for masks without one of them."""
    ordered = sorted(categories or [], key=lambda c: int(c["id"]))
    return {int(c["id"]): i for i, c in enumerate(ordered)}, [str(c["name"]) for c in ordered] + [UNLABELED]


def mask_polygon(mask: np.ndarray) -> tuple[np.ndarray | None, bool, bool]:
    """(N x 2 float vertices in pixels or None when too small, holes were filled,
    several pieces were joined) of a boolean mask."""
    image = mask.astype(np.uint8)
    contours, _ = cv2.findContours(image, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None, False, False
    # Holes: any contour inside another (an island in a hole is a piece of its own above).
    holes = len(cv2.findContours(image, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)[0]) > len(contours)
    outer = [c[:, 0, :].astype(np.float64) for c in contours if len(c) >= 3]
    if not outer:
        return None, holes, False
    outer.sort(key=lambda c: -cv2.contourArea(c.astype(np.float32)))
    polygon = outer[0]
    for piece in outer[1:]:
        # Bridge from the polygon's vertex nearest to the piece, round the piece, and back.
        i, j = _nearest_pair(polygon, piece)
        around = np.concatenate([piece[j:], piece[: j + 1]])
        polygon = np.concatenate([polygon[: i + 1], around, polygon[i:]])
    return polygon, holes, len(outer) > 1


def _nearest_pair(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """(index in ``a``, index in ``b``) of the closest pair of vertices, in blocks of ``a``
    so that memory stays ~64 MB however long the outlines."""
    best, pair = np.inf, (0, 0)
    step = max(1, (1 << 22) // len(b))
    for start in range(0, len(a), step):
        d = ((a[start : start + step, None, :] - b[None, :, :]) ** 2).sum(-1)
        k = int(np.argmin(d))
        if d.flat[k] < best:
            best, pair = d.flat[k], (start + k // len(b), k % len(b))
    return pair


def record_lines(record: dict, classes: dict[int, int], result: ShardYolo) -> list[str]:
    """The label file's lines of one SA-1B record (counting what changed in ``result``)."""
    width, height = int(record["image"]["width"]), int(record["image"]["height"])
    lines = []
    for ann in record["annotations"]:
        mask = mask_utils.decode(ann["segmentation"]).astype(bool)
        polygon, holes, parts = mask_polygon(mask)
        result.holes_filled += holes
        result.multi_part += parts
        if polygon is None:
            result.too_small += 1
            continue
        category = ann.get("category_id")
        index = classes.get(int(category), len(classes)) if category is not None else len(classes)
        result.unlabeled += bool(classes) and index == len(classes)
        xy = polygon / [width, height]
        lines.append(f"{index} " + " ".join(f"{v:.6f}" for v in np.clip(xy, 0, 1).ravel()))
        result.masks += 1
    return lines


def shard_yolo(path: str, out_dir: str, classes: dict[int, int]) -> ShardYolo:
    """Converts one shard into ``out_dir``/images and /labels (a folder or URL), each file
    committed atomically."""
    fs, root = storage.filesystem(out_dir)
    result = ShardYolo(posixpath.basename(path))
    for sample in iter_shard(path, images=True, problems=True):
        if sample.problem is None:
            try:
                lines = record_lines(sample.record, classes, result)
            except Exception as exc:  # one broken record must not fail the export
                sample.problem = f"{type(exc).__name__}: {exc}"
        if sample.problem is not None or sample.jpg is None:
            result.skipped.append((sample.key, sample.problem or "no image"))
            continue
        name = posixpath.basename(sample.key)
        with storage.atomic_open(fs, storage.join(root, "images", f"{name}.jpg")) as f:
            f.write(sample.jpg)
        with storage.atomic_open(fs, storage.join(root, "labels", f"{name}.txt")) as f:
            f.write("".join(line + "\n" for line in lines).encode())
        result.images += 1
    return result
