"""The simulated click of interactive segmentation (RITM, SimpleClick, SAM protocol).

Each next click goes to the point farthest from the boundary of the largest error
region: positive inside a missed region, negative inside a false one. Shared by the
eval stage and the simulated annotator of the annotate stage.
"""
from __future__ import annotations

import cv2
import numpy as np


def _peak(region: np.ndarray) -> tuple[tuple[int, int], float]:
    """(x, y) of the pixel farthest from the region's boundary (image edges count as
    boundary, as in the RITM/SAM protocol) and that distance."""
    padded = np.pad(region.astype(np.uint8), 1)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return (int(x), int(y)), float(dist[y, x])


def next_click(gt: np.ndarray, pred: np.ndarray | None) -> tuple[tuple[int, int], int]:
    """The next simulated click: ((x, y), label) at the centre of the largest error."""
    if pred is None:
        return _peak(gt)[0], 1
    fn_xy, fn_d = _peak(gt & ~pred)
    fp_xy, fp_d = _peak(pred & ~gt)
    if fn_d == 0 and fp_d == 0:  # already exact: repeat a positive click at the centre
        return _peak(gt)[0], 1
    return (fn_xy, 1) if fn_d >= fp_d else (fp_xy, 0)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
