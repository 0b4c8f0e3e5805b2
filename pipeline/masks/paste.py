"""Pasting one image (fill-in augmentation): objects cut by their masks from other
images, scaled, rotated and flipped, blended onto a background, and the masks under
them updated.

The paste plan (``pipeline.masks.paste_plan``) says which objects go onto which background;
where each one lands and how it is transformed is drawn here from a generator seeded by
``(stage.seed, the output's name)``, so an output image is the same on every run.

- Transform: scale log-uniform in ``scale`` (of the object's own size; capped so that its
  box fits in ``max_side_fraction`` of the background's short side), rotation uniform in
  +-``rotation`` degrees, a horizontal flip with probability one half when ``flip``.
- Place: the first of ``placement_tries`` random positions (the object fully inside the
  image) that overlaps no object pasted before, else the one that overlaps least.
- Blend: ``gaussian`` (the mask's edge softened by a Gaussian of ``blend_sigma`` pixels)
  or ``poisson`` (OpenCV's seamlessClone: the object takes on the background's light).
- Occlusion: every mask under a pasted object loses the pixels it covers; a mask left
  with fewer than ``min_visible_area`` pixels (fully hidden, by default almost) is
  dropped. Boxes of pasted objects and of masks that lost pixels are their masks'
  extents, exactly (``box``, XYWH in COCO's convention; ``bbox`` in SA-1B's).
"""
from __future__ import annotations

import io
import json
import logging
import math
import zlib
from collections import OrderedDict
from typing import Any, Mapping

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.dataset import shards
from pipeline.dataset.rle import usable
from pipeline.inputs.entries import Item
from pipeline.inputs.images import PreparedImage
from pipeline.masks import paste_plan
from pipeline.masks.records import Rewritten, mask_record

log = logging.getLogger(__name__)

SOURCE_CACHE = 16  # decoded source images kept per worker (objects often share one)


class Paster:
    """The augment stage's mask source: ``Paster(spec)(item, background)`` returns the
    pasted image and all its masks (``pipeline.masks.records.Rewritten``).

    spec keys: ``output`` (holding the recorded paste plan), ``paste`` (the transform,
    blend and occlusion settings of conf/stage/augment.yaml), ``seed``, ``jpeg_quality``.
    """

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.pastes = paste_plan.pastes_by_output(spec["output"])
        self.records = paste_plan.records_by_output(spec["output"])
        self.settings = dict(spec["paste"])
        self.seed = int(spec["seed"])
        self.jpeg_quality = int(spec.get("jpeg_quality", 95))
        self._sources: OrderedDict[tuple[str, str], tuple[np.ndarray, dict]] = OrderedDict()

    def __call__(self, item: Item, background: PreparedImage):
        s = self.settings
        rng = np.random.default_rng([self.seed, zlib.crc32(item.name.encode("utf-8"))])
        canvas = np.array(background.rgb)
        h, w = canvas.shape[:2]
        annotations, changed = self._background_masks(item, (w, h))
        pasted_union = np.zeros((h, w), bool)
        for row in self.pastes.get(item.name, []):
            rgb, record = self._source(row)
            source = record["annotations"][row["annotation"]]
            patch, mask = _transformed(rgb, _decode(source["segmentation"]), rng, s, (w, h))
            if mask.sum() < s["min_visible_area"]:
                continue  # scaled down to nothing
            x, y = _place(mask, pasted_union, rng, int(s["placement_tries"]), (w, h))
            _blend(canvas, patch, mask, x, y, s["blend"], float(s["blend_sigma"]))
            full = np.zeros((h, w), np.uint8)
            full[y : y + mask.shape[0], x : x + mask.shape[1]] = mask
            uncovered = mask_utils.encode(np.asfortranarray(1 - full))
            for i, a in enumerate(annotations):  # what lies under the new object loses it
                kept = mask_utils.merge([a["segmentation"], uncovered], intersect=True)
                if mask_utils.area(kept) != mask_utils.area(a["segmentation"]):
                    a["segmentation"], changed[i] = kept, True
            pasted_union |= full.astype(bool)
            annotations.append(_pasted(source, row, mask_utils.encode(np.asfortranarray(full)), (w, h)))
            changed.append(True)
        records = []
        for a, was_changed in zip(annotations, changed):
            area = int(mask_utils.area(a["segmentation"]))
            if area < s["min_visible_area"]:
                continue  # hidden under pasted objects
            if was_changed:
                x0, y0, bw, bh = (float(v) for v in mask_utils.toBbox(a["segmentation"]))
                a.update(area=area, bbox=[x0, y0, bw - 1, bh - 1], box=[x0, y0, bw, bh])
                if a.get("box_source") != "pasted":
                    a["box_source"] = "mask"
                    a.pop("gt_iou", None), a.pop("gt_area", None)  # no longer that mask
            records.append(a)
        buffer = io.BytesIO()
        Image.fromarray(canvas).save(buffer, format="JPEG", quality=self.jpeg_quality)
        image = PreparedImage(rgb=canvas, jpeg=buffer.getvalue(), original_size=background.original_size,
                              source_sha256=background.source_sha256)
        return Rewritten(records, image)

    def _background_masks(self, item: Item, size: tuple[int, int]) -> tuple[list[dict[str, Any]], list[bool]]:
        """The background's own masks (dataset backgrounds) in the stored image's size,
        and whether each was changed (resized: the background was resized by stage.image)."""
        where = self.records.get(item.name)
        if where is None:
            return [], []
        record = json.loads(shards.read_range(*where))
        w, h = size
        fit, problems = usable(record["annotations"], int(record["image"]["height"]), int(record["image"]["width"]))
        if problems:
            log.warning("%s: background masks left out: %s", item.name, "; ".join(problems[:3]))
        annotations, changed = [], []
        for a in fit:
            a = {k: v for k, v in a.items() if k != "id"}  # ids are the output's
            rle = _rle(a["segmentation"])
            resized = tuple(rle["size"]) != (h, w)
            if resized:
                mask = cv2.resize(mask_utils.decode(rle), (w, h), interpolation=cv2.INTER_NEAREST)
                rle = mask_utils.encode(np.asfortranarray(mask))
            a["segmentation"] = rle
            annotations.append(a)
            changed.append(resized)
        return annotations, changed

    def _source(self, row: dict[str, Any]) -> tuple[np.ndarray, dict]:
        key = (row["shard"], row["key"])
        if key not in self._sources:
            jpg = shards.read_range(row["shard"], row["jpg_offset"], row["jpg_size"])
            record = json.loads(shards.read_range(row["shard"], row["json_offset"], row["json_size"]))
            with Image.open(io.BytesIO(jpg)) as im:
                self._sources[key] = (np.asarray(im.convert("RGB")), record)
            while len(self._sources) > SOURCE_CACHE:
                self._sources.popitem(last=False)
        self._sources.move_to_end(key)
        return self._sources[key]


def _rle(segmentation: dict) -> dict:
    counts = segmentation["counts"]
    return {"size": list(segmentation["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def _decode(segmentation: dict) -> np.ndarray:
    return mask_utils.decode(_rle(segmentation))


def _pasted(source: dict, row: dict, rle: dict, size: tuple[int, int]) -> dict[str, Any]:
    extra = {"category_id": int(row["category_id"]), "box_source": "pasted",
             "pasted_from": {"key": row["key"], "id": int(source["id"])}}
    if "score" in source:
        extra["score"] = source["score"]
    return mask_record(rle, source.get("predicted_iou", 1.0), source.get("stability_score", 1.0), size, **extra)


def _transformed(rgb: np.ndarray, mask: np.ndarray, rng: np.random.Generator, s: Mapping[str, Any],
                 size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The object cut from ``rgb`` by ``mask``, transformed: (patch HxWx3, mask HxW uint8)."""
    ys, xs = np.nonzero(mask)
    pad = 1 + math.ceil(2 * float(s["blend_sigma"]))  # room to soften the edge outside the mask
    x0, y0 = max(0, xs.min() - pad), max(0, ys.min() - pad)
    x1, y1 = min(mask.shape[1], xs.max() + 1 + pad), min(mask.shape[0], ys.max() + 1 + pad)
    patch, cut = rgb[y0:y1, x0:x1], mask[y0:y1, x0:x1]
    low, high = (float(v) for v in s["scale"])
    scale = math.exp(rng.uniform(math.log(low), math.log(high)))
    angle = rng.uniform(-float(s["rotation"]), float(s["rotation"]))
    flip = bool(s["flip"]) and rng.random() < 0.5
    ph, pw = cut.shape
    # The box of the rotated object, to cap the scale before warping.
    c, si = abs(math.cos(math.radians(angle))), abs(math.sin(math.radians(angle)))
    bw, bh = pw * c + ph * si, pw * si + ph * c
    limit = float(s["max_side_fraction"]) * min(size)
    scale = min(scale, limit / max(bw, bh), (size[0] - 2) / bw, (size[1] - 2) / bh)
    out_w, out_h = max(1, math.ceil(bw * scale)), max(1, math.ceil(bh * scale))
    matrix = cv2.getRotationMatrix2D((pw / 2, ph / 2), angle, scale)
    if flip:  # mirror the source first: x -> pw - x
        matrix = matrix @ np.array([[-1, 0, pw], [0, 1, 0], [0, 0, 1]], np.float64)
    matrix[:, 2] += (out_w / 2 - pw / 2, out_h / 2 - ph / 2)
    warped = cv2.warpAffine(np.ascontiguousarray(patch), matrix, (out_w, out_h), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_REFLECT)
    warped_mask = cv2.warpAffine(cut.astype(np.float32), matrix, (out_w, out_h), flags=cv2.INTER_LINEAR) > 0.5
    return warped, warped_mask.astype(np.uint8)


def _place(mask: np.ndarray, pasted: np.ndarray, rng: np.random.Generator, tries: int,
           size: tuple[int, int]) -> tuple[int, int]:
    """Top-left (x, y) for ``mask``: the first try free of earlier pastes, else the least covered."""
    mh, mw = mask.shape
    w, h = size
    best, best_overlap = (0, 0), None
    on = mask.astype(bool)
    for _ in range(max(1, tries)):
        x, y = int(rng.integers(0, w - mw + 1)), int(rng.integers(0, h - mh + 1))
        overlap = int((pasted[y : y + mh, x : x + mw] & on).sum())
        if best_overlap is None or overlap < best_overlap:
            best, best_overlap = (x, y), overlap
        if overlap == 0:
            break
    return best


def _blend(canvas: np.ndarray, patch: np.ndarray, mask: np.ndarray, x: int, y: int, mode: str, sigma: float) -> None:
    """Blends ``patch`` (where ``mask``) into ``canvas`` at (x, y), in place."""
    mh, mw = mask.shape
    region = canvas[y : y + mh, x : x + mw]
    if mode == "poisson":
        h, w = canvas.shape[:2]
        # The Poisson domain reaches a few pixels past the object, so that its edge (the
        # jump from the object to what surrounded it) is among the gradients kept: with the
        # object's own outline as the domain's border, a flat object would vanish.
        grow = 1 + math.ceil(2 * sigma)
        domain = cv2.dilate(mask, np.ones((2 * grow + 1, 2 * grow + 1), np.uint8))
        ys, xs = np.nonzero(domain)
        bx, by = xs.min(), ys.min()
        bw, bh = xs.max() - bx + 1, ys.max() - by + 1
        # seamlessClone centres the mask's bounding rect at p, and needs it strictly inside.
        if x + bx >= 1 and y + by >= 1 and x + bx + bw <= w - 1 and y + by + bh <= h - 1:
            centre = (int(x + bx + bw // 2), int(y + by + bh // 2))
            canvas[:] = cv2.seamlessClone(np.ascontiguousarray(patch), canvas, domain * 255, centre, cv2.NORMAL_CLONE)
            return
        mode = "gaussian"  # touching the image's edge: Poisson has no border to solve from
    if mode != "gaussian":
        raise ValueError(f"stage.paste.blend must be gaussian or poisson, not {mode!r}")
    alpha = mask.astype(np.float32)
    if sigma > 0:  # the edge softened across the mask's boundary (Dwibedi et al.'s blending)
        alpha = cv2.GaussianBlur(alpha, (0, 0), sigma)
    region[:] = (alpha[..., None] * patch + (1 - alpha[..., None]) * region).round().astype(np.uint8)


def preview_grid(samples: list, tile: int = 256) -> bytes:
    """A JPEG grid of ``samples`` (``shards.Sample`` with images): each image with its
    masks outlined, pasted objects in yellow, the background's own in cyan."""
    tiles = []
    for sample in samples:
        with Image.open(io.BytesIO(sample.jpg)) as im:
            rgb = np.array(im.convert("RGB"))
        for a in sample.record["annotations"]:
            mask = _decode(a["segmentation"])
            contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            colour = (255, 220, 0) if a.get("box_source") == "pasted" else (0, 220, 255)
            cv2.drawContours(rgb, contours, -1, colour, max(1, round(max(rgb.shape[:2]) / 300)))
        scale = tile / max(rgb.shape[:2])
        small = cv2.resize(rgb, (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale))),
                           interpolation=cv2.INTER_AREA)
        canvas = np.full((tile, tile, 3), 32, np.uint8)
        canvas[: small.shape[0], : small.shape[1]] = small
        tiles.append(canvas)
    cols = max(1, math.ceil(math.sqrt(len(tiles))))
    rows = math.ceil(len(tiles) / cols)
    grid = np.full((rows * tile, cols * tile, 3), 32, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        grid[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = t
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()
