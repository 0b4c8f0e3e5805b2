"""Box prompts: a detector's boxes as SAM prompts, and boxes refined by SAM's masks.

``predict_boxes`` answers every box of an image from the one image embedding the
predictor holds, all boxes in one decoder batch (or batches of ``boxes_per_batch``),
optionally with points per box (e.g. keypoints; label -1 pads a box's list), and
picks among the three outputs by predicted IoU when asked for several.

``refine_boxes`` is the rule of "Segmenting anything also detect anything": a box is
replaced by its mask's extent only where the mask is trusted (predicted IoU and
stability above thresholds, and the mask lies within a margin of the box: a mask that
spills far out of its box has segmented something else); every other box is kept.

Boxes are XYXY in image pixels, as continuous edges: a box around pixels x0..x1
(inclusive) is [x0, y0, x1 + 1, y1 + 1], which is what COCO's [x, y, w, h] gives as
[x, y, x + w, y + h].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torchvision.ops import boxes as box_ops

from .predictor import SamPredictor
from .utils.amg import batched_mask_to_box, calculate_stability_score, encode_rle


@dataclass
class BoxMasks:
    """One answer per box prompt, in the order of the prompts.

    rles: COCO compressed RLEs (``counts`` bytes) of the chosen masks at the image size.
    mask_boxes: Nx4 float XYXY edges of each mask's extent (all zero for an empty mask).
    areas: N mask pixel counts. predicted_iou, stability_score: N floats of the chosen
    outputs. chosen: N index of the chosen output (0..2 with multimask, else 0).
    """

    rles: List[Dict[str, Any]]
    mask_boxes: np.ndarray
    areas: np.ndarray
    predicted_iou: np.ndarray
    stability_score: np.ndarray
    chosen: np.ndarray

    def __len__(self) -> int:
        return len(self.rles)


@torch.no_grad()
def predict_boxes(
    predictor: SamPredictor,
    boxes: np.ndarray,
    points: Optional[np.ndarray] = None,
    point_labels: Optional[np.ndarray] = None,
    multimask_output: bool = False,
    boxes_per_batch: Optional[int] = None,
    upsample_batch: int = 16,
    stability_score_offset: float = 1.0,
    image_index: int = 0,
) -> BoxMasks:
    """Masks for N boxes on the predictor's current image.

    boxes: Nx4 XYXY in image pixels. points: NxKx2 (x, y) in image pixels, with NxK
    ``point_labels`` (1 foreground, 0 background, -1 no point: pads boxes with fewer
    points). multimask_output: ask for three masks per prompt and keep the one with the
    highest predicted IoU (else SAM's single output, best for unambiguous boxes).
    boxes_per_batch: decoder batch size (None: all boxes at once). Masks are upsampled
    ``upsample_batch`` at a time, so memory stays bounded by that many full-size masks.
    """
    predictor._require_image()
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    n = len(boxes)
    if points is not None:
        points = np.asarray(points, dtype=np.float32)
        point_labels = np.asarray(point_labels, dtype=np.int64) if point_labels is not None else None
        shapes_fit = point_labels is not None and points.shape[:2] == point_labels.shape
        if not shapes_fit or points.ndim != 3 or points.shape[0] != n or points.shape[-1] != 2:
            raise ValueError(
                f"points must be NxKx2 with NxK labels for N={n} boxes; got {points.shape} and "
                f"{None if point_labels is None else point_labels.shape}"
            )
    if n == 0:
        return BoxMasks([], np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32),
                        np.zeros(0, np.float32), np.zeros(0, np.int64))
    model, device = predictor.model, predictor.device
    size = predictor.original_sizes[image_index]
    step = boxes_per_batch or n
    rles: List[Dict[str, Any]] = []
    parts: Dict[str, List[torch.Tensor]] = {"box": [], "area": [], "iou": [], "stability": [], "chosen": []}
    for start in range(0, n, step):
        stop = min(n, start + step)
        in_boxes = predictor.transform.apply_boxes_torch(torch.as_tensor(boxes[start:stop], device=device), size)
        in_points = in_labels = None
        if points is not None:
            in_points = predictor.transform.apply_coords_torch(torch.as_tensor(points[start:stop], device=device), size)
            in_labels = torch.as_tensor(point_labels[start:stop], device=device)
        low_res, iou = predictor.predict_low_res(in_points, in_labels, in_boxes, None, multimask_output, image_index)
        chosen = iou.argmax(1)
        rows = torch.arange(len(chosen), device=device)
        low_res, iou = low_res[rows, chosen], iou[rows, chosen]
        for lo in range(0, len(low_res), upsample_batch):
            logits = model.postprocess_masks(
                low_res[lo : lo + upsample_batch, None], predictor.input_sizes[image_index], size
            )[:, 0]
            parts["stability"].append(
                calculate_stability_score(logits, model.mask_threshold, stability_score_offset).float().cpu()
            )
            masks = logits > model.mask_threshold
            del logits
            parts["box"].append(_edges(batched_mask_to_box(masks), masks).cpu())
            parts["area"].append(masks.sum((-1, -2)).cpu())
            rles += encode_rle(masks.cpu() if masks.device.type == "cpu" else masks)
        parts["iou"].append(iou.float().cpu())
        parts["chosen"].append(chosen.cpu())
    return BoxMasks(
        rles=rles,
        mask_boxes=torch.cat(parts["box"]).numpy().astype(np.float32),
        areas=torch.cat(parts["area"]).numpy().astype(np.int64),
        predicted_iou=torch.cat(parts["iou"]).numpy(),
        stability_score=torch.nan_to_num(torch.cat(parts["stability"])).numpy(),
        chosen=torch.cat(parts["chosen"]).numpy() if multimask_output else np.zeros(n, np.int64),
    )


def _edges(inclusive: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Inclusive XYXY pixel boxes -> XYXY edges; empty masks keep all-zero boxes."""
    edges = inclusive.float() + torch.tensor([0.0, 0.0, 1.0, 1.0], device=inclusive.device)
    return edges * masks.flatten(1).any(1, keepdim=True)


def refine_boxes(
    prompt_boxes: np.ndarray,
    mask_boxes: np.ndarray,
    predicted_iou: np.ndarray,
    stability_score: np.ndarray,
    pred_iou_thresh: float,
    stability_score_thresh: float,
    margin: float,
    min_margin_px: float = 2.0,
) -> Tuple[np.ndarray, np.ndarray]:
    """(boxes, trusted): each prompt box replaced by its mask's extent where trusted.

    A mask is trusted when its predicted IoU >= ``pred_iou_thresh``, its stability
    >= ``stability_score_thresh``, it is not empty, and its extent lies inside the prompt box
    grown on each side by ``margin`` times the box's width (left, right) or height (top,
    bottom), at least ``min_margin_px``. Untrusted boxes are returned unchanged.
    All boxes are Nx4 XYXY edges; returns a new Nx4 float array and an N bool array.
    """
    prompt = np.asarray(prompt_boxes, dtype=np.float64).reshape(-1, 4)
    extent = np.asarray(mask_boxes, dtype=np.float64).reshape(-1, 4)
    if prompt.shape != extent.shape:
        raise ValueError(f"prompt boxes {prompt.shape} and mask boxes {extent.shape} differ in shape")
    w, h = prompt[:, 2] - prompt[:, 0], prompt[:, 3] - prompt[:, 1]
    pad_x = np.maximum(margin * w, min_margin_px)
    pad_y = np.maximum(margin * h, min_margin_px)
    inside = (
        (extent[:, 0] >= prompt[:, 0] - pad_x) & (extent[:, 2] <= prompt[:, 2] + pad_x)
        & (extent[:, 1] >= prompt[:, 1] - pad_y) & (extent[:, 3] <= prompt[:, 3] + pad_y)
    )
    nonempty = (extent[:, 2] > extent[:, 0]) & (extent[:, 3] > extent[:, 1])
    trusted = (
        (np.asarray(predicted_iou) >= pred_iou_thresh)
        & (np.asarray(stability_score) >= stability_score_thresh)
        & nonempty & inside
    )
    return np.where(trusted[:, None], extent, prompt), trusted


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of matching rows of two Nx4 XYXY box arrays (N values, not a matrix)."""
    a = torch.as_tensor(np.asarray(a, np.float64)).reshape(-1, 4)
    b = torch.as_tensor(np.asarray(b, np.float64)).reshape(-1, 4)
    return torch.nan_to_num(box_ops.box_iou(a, b).diagonal()).numpy()  # N is an image's boxes: small
