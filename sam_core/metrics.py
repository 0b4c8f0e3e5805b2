"""How good a model's masks are: the interactive protocol of the SAM paper and matching
of automatically generated masks against ground truth.

Pure functions of masks and a predictor; nothing here reads files or knows where the
ground truth came from (``pipeline.models.evaluation`` composes them into a report).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from .predictor import SamPredictor
from .training import binary_mask_iou


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two HxW bool masks; two empty masks agree perfectly (1.0)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _peak(region: np.ndarray) -> Tuple[Tuple[int, int], float]:
    """(x, y) of the pixel farthest from the region's boundary (image edges count as
    boundary, as in the RITM/SAM protocol) and that distance."""
    padded = np.pad(region.astype(np.uint8), 1)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return (int(x), int(y)), float(dist[y, x])


def next_click(gt: np.ndarray, pred: Optional[np.ndarray]) -> Tuple[Tuple[int, int], int]:
    """The next simulated click: ((x, y), label) at the centre of the largest error.

    The first click (``pred`` None) is positive at the centre of the object; each next
    one is positive inside the largest miss or negative inside the largest spill.
    """
    if pred is None:
        return _peak(gt)[0], 1
    fn_xy, fn_d = _peak(gt & ~pred)
    fp_xy, fp_d = _peak(pred & ~gt)
    if fn_d == 0 and fp_d == 0:  # already exact: repeat a positive click at the centre
        return _peak(gt)[0], 1
    return (fn_xy, 1) if fn_d >= fp_d else (fp_xy, 0)


@torch.no_grad()
def prompt_ious(predictor: SamPredictor, masks: np.ndarray, clicks: int) -> Dict[str, np.ndarray]:
    """Per-mask IoUs of interactive prompting on the predictor's current image.

    With one click the answer is the candidate with the highest predicted IoU; each next
    click adds a point and feeds the previous low-res logits back as mask prompt.

    Returns: clicks (M x clicks, IoU after each click), oracle1 (M, best of the three
    1-click candidates), box (M, IoU of the single-mask answer to the tight box).
    """
    device = predictor.device
    size = masks.shape[1:]
    m = len(masks)
    coords: List[List[Tuple[int, int]]] = [[] for _ in range(m)]
    labels: List[List[int]] = [[] for _ in range(m)]
    preds: List[Optional[np.ndarray]] = [None] * m
    click_iou = np.zeros((m, clicks))
    oracle = np.zeros(m)
    logits = None
    for k in range(clicks):
        for i in range(m):
            xy, lbl = next_click(masks[i], preds[i])
            coords[i].append(xy)
            labels[i].append(lbl)
        pts = predictor.transform.apply_coords_torch(torch.tensor(coords, dtype=torch.float, device=device), size)
        lbls = torch.tensor(labels, device=device)
        out, iou_pred, low = predictor.predict_torch(pts, lbls, mask_input=logits, multimask_output=(k == 0))
        best = iou_pred.argmax(1)
        rows = torch.arange(m, device=device)
        chosen = out[rows, best].cpu().numpy()
        logits = low[rows, best][:, None]
        for i in range(m):
            preds[i] = chosen[i]
            click_iou[i, k] = mask_iou(chosen[i], masks[i])
            if k == 0:
                oracle[i] = max(mask_iou(c, masks[i]) for c in out[i].cpu().numpy())
    boxes = []
    for mk in masks:
        ys, xs = np.nonzero(mk.any(1))[0], np.nonzero(mk.any(0))[0]
        boxes.append([xs[0], ys[0], xs[-1], ys[-1]])
    b = predictor.transform.apply_boxes_torch(torch.tensor(boxes, dtype=torch.float, device=device), size)
    out, _, _ = predictor.predict_torch(None, None, boxes=b, multimask_output=False)
    box_iou = np.array([mask_iou(o[0], mk) for o, mk in zip(out.cpu().numpy(), masks)])
    return {"clicks": click_iou, "oracle1": oracle, "box": box_iou}


def resolution_ceiling(masks: np.ndarray, low_res: int, square: bool = False) -> np.ndarray:
    """IoU each of the masks (MxHxW bool) would get from a perfect answer at ``low_res``.

    SAM's decoder answers with ``low_res`` x ``low_res`` logits over its square input
    frame (the image's longest side; ``square``: SAM 2's, the image stretched to it),
    which are upsampled bilinearly and thresholded.
    A mask's best answer at that size is about its own area average, upsampled the same
    way and thresholded at one half: small and thin objects lose most (a 256-px model
    answers at 64x64, i.e. 8x8 pixels of a 512-px image per logit).
    """
    h, w = masks.shape[1:]
    scale = low_res / max(h, w)
    m = torch.from_numpy(masks).float()[:, None]
    frame = (low_res, low_res) if square else (max(1, round(h * scale)), max(1, round(w * scale)))
    low = F.interpolate(m, frame, mode="area")
    best = F.interpolate(low, (h, w), mode="bilinear", align_corners=False)[:, 0] > 0.5
    return binary_mask_iou(best, m[:, 0] > 0).numpy()


def amg_matches(records: List[Dict[str, Any]], masks: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(best IoU of each ground-truth mask, best IoU of each generated mask).

    ``records``: the generator's output in ``coco_rle`` mode; ``masks``: MxHxW bool.
    Recall at t is the share of the first >= t, precision at t the share of the second.
    """
    n_pred, n_gt = len(records), len(masks)
    if n_pred == 0 or n_gt == 0:
        return np.zeros(n_gt), np.zeros(n_pred)
    pred = [r["segmentation"] for r in records]
    gt = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    ious = np.asarray(mask_utils.iou(gt, pred, [0] * n_pred)).reshape(n_gt, n_pred)
    return ious.max(1), ious.max(0)
