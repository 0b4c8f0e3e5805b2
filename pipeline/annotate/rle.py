"""Masks between the browser and the dataset: the browser sends and receives
uncompressed column-major RLE counts (zeros first, as COCO's uncompressed RLE); the
dataset stores COCO's compressed RLE strings (pycocotools does the compression)."""
from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from pipeline.dataset.rle import rle_counts, rle_problem


class RleError(ValueError):
    """Counts that do not describe a mask of the image's size."""


def counts_from_mask(mask: np.ndarray) -> list[int]:
    """HxW bool -> uncompressed column-major counts, zeros first."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return [0]
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return ([0] + runs) if flat[0] else runs


def mask_from_counts(counts: list[int], height: int, width: int) -> np.ndarray:
    """Uncompressed column-major counts -> HxW bool."""
    values = np.zeros(len(counts), bool)
    values[1::2] = True
    return np.repeat(values, counts).reshape(width, height).T


def compressed_rle(counts: list[int], height: int, width: int, uid: str = "") -> dict[str, Any]:
    """Uncompressed counts -> ``{"size": [h, w], "counts": str}`` (COCO compressed RLE)."""
    if any(c < 0 for c in counts) or sum(counts) != height * width:
        raise RleError(f"mask {uid}: its RLE counts cover {sum(counts)} pixels, the image has {height}x{width}")
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": list(counts)}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def uncompressed_counts(rle: dict[str, Any]) -> list[int]:
    """COCO compressed RLE (str or bytes counts, checked: ``pipeline.dataset.rle``) ->
    uncompressed column-major counts: the same run lengths, nothing decoded."""
    h, w = rle["size"]
    problem = rle_problem(rle, h, w)
    if problem is not None:
        raise RleError(problem)
    return rle_counts(rle["counts"])
