"""What a mask source returns: mask records in the generator's ``coco_rle`` shape, built
in one place (``mask_record``), and ``Rewritten`` for a source that makes a new image.

A record has the keys of the automatic mask generator's output (segmentation, area,
bbox, predicted_iou, stability_score, crop_box, point_coords); any further keys (a
category, a detector score, a provenance) are stored with the mask in the SA-1B record
as they are (``pipeline.dataset.shards.sa1b_record``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from pipeline.inputs.entries import Item
from pipeline.inputs.images import PreparedImage


@dataclass
class Rewritten:
    """A source's answer that replaces the image: ``image`` is stored, ``masks`` refer to it."""

    masks: list[dict[str, Any]]
    image: PreparedImage


class MaskSource(Protocol):
    def __call__(self, item: Item, image: PreparedImage) -> list[dict[str, Any]] | Rewritten: ...


def mask_record(segmentation: dict[str, Any], predicted_iou: float, stability_score: float,
                size: tuple[int, int], point_coords: Sequence[Sequence[float]] = (), **extra: Any) -> dict[str, Any]:
    """A mask record for a compressed RLE made with one whole-image prompt: area and bbox
    from the RLE (bbox in the generator's convention: the last pixel's coordinate minus
    the first; all zero for an empty mask), crop_box the whole image of ``size`` (W, H),
    ``extra`` keys after SA-1B's."""
    x, y, w, h = (float(v) for v in mask_utils.toBbox(segmentation))
    return {
        "segmentation": segmentation,
        "area": int(mask_utils.area(segmentation)),
        "bbox": [x, y, max(w - 1, 0.0), max(h - 1, 0.0)],
        "predicted_iou": float(predicted_iou),
        "stability_score": float(stability_score),
        "crop_box": [0.0, 0.0, float(size[0]), float(size[1])],
        "point_coords": [[float(px), float(py)] for px, py in point_coords],
        **extra,
    }


def xywh(box: np.ndarray) -> list[float]:
    """An XYXY box as XYWH (COCO's convention: edges, not pixel indices)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]
