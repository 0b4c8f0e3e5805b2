"""Pure helpers of the automatic mask generator: grids, crops, stability, boxes,
run-length encoding and small-region clean-up. Each is independently testable."""
from __future__ import annotations

import math
from itertools import product
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_utils


class MaskData:
    """Column store of per-mask fields (tensors, arrays or lists of equal length)
    with row filtering and concatenation."""

    def __init__(self, **fields: Any) -> None:
        self._fields: Dict[str, Any] = {}
        for key, value in fields.items():
            self[key] = value

    def __setitem__(self, key: str, value: Any) -> None:
        if not isinstance(value, (list, np.ndarray, torch.Tensor)):
            raise TypeError(f"MaskData field {key!r} must be a list, array or tensor, not {type(value).__name__}")
        self._fields[key] = value

    def __getitem__(self, key: str) -> Any:
        return self._fields[key]

    def __delitem__(self, key: str) -> None:
        del self._fields[key]

    def __contains__(self, key: str) -> bool:
        return key in self._fields

    def __len__(self) -> int:
        return len(next(iter(self._fields.values()))) if self._fields else 0

    def items(self):
        return self._fields.items()

    def filter(self, keep: torch.Tensor) -> None:
        """Keeps the rows selected by a bool mask or an index tensor."""
        keep = torch.as_tensor(keep)
        keep_cpu = keep.cpu()
        indices = keep_cpu.nonzero().flatten().tolist() if keep.dtype == torch.bool else keep_cpu.tolist()
        for key, value in self._fields.items():
            if isinstance(value, torch.Tensor):
                self._fields[key] = value[keep.to(value.device)]
            elif isinstance(value, np.ndarray):
                self._fields[key] = value[keep_cpu.numpy()]
            else:
                self._fields[key] = [value[i] for i in indices]

    def cat(self, other: "MaskData") -> None:
        """Appends the rows of ``other``."""
        for key, value in other.items():
            if key not in self._fields:
                self._fields[key] = value
            elif isinstance(value, torch.Tensor):
                self._fields[key] = torch.cat([self._fields[key], value.to(self._fields[key].device)])
            elif isinstance(value, np.ndarray):
                self._fields[key] = np.concatenate([self._fields[key], value])
            else:
                self._fields[key] = self._fields[key] + list(value)


def batch_iterator(batch_size: int, *args: Sequence) -> Iterator[List[Any]]:
    """Yields aligned slices of ``batch_size`` rows from each argument."""
    if not args or any(len(a) != len(args[0]) for a in args):
        raise ValueError("batch_iterator needs inputs of equal length")
    for start in range(0, len(args[0]), batch_size):
        yield [a[start : start + batch_size] for a in args]


def build_point_grid(n_per_side: int) -> np.ndarray:
    """n*n points (x, y) at the centres of an n x n grid over [0, 1]^2, row-major."""
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> List[np.ndarray]:
    """One normalised grid per crop layer, each layer's side divided by scale_per_layer."""
    return [build_point_grid(int(n_per_side / scale_per_layer**i)) for i in range(n_layers + 1)]


def generate_crop_boxes(
    im_size: Tuple[int, int], n_layers: int, overlap_ratio: float
) -> Tuple[List[List[int]], List[int]]:
    """XYXY crop boxes: the whole image, then (2^(i+1))^2 overlapping crops for layer i.
    Returns (boxes, layer index of each box)."""
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    boxes, layers = [[0, 0, im_w, im_h]], [0]
    for layer in range(n_layers):
        n = 2 ** (layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n))
        crop_w = int(math.ceil((overlap * (n - 1) + im_w) / n))
        crop_h = int(math.ceil((overlap * (n - 1) + im_h) / n))
        xs = [int((crop_w - overlap) * i) for i in range(n)]
        ys = [int((crop_h - overlap) * i) for i in range(n)]
        for x0, y0 in product(xs, ys):
            boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layers.append(layer + 1)
    return boxes, layers


def calculate_stability_score(masks: torch.Tensor, mask_threshold: float, threshold_offset: float) -> torch.Tensor:
    """IoU of the masks thresholded at +offset and -offset around mask_threshold.
    The +offset mask is a subset of the -offset one, so IoU = |high| / |low|."""
    high = (masks > mask_threshold + threshold_offset).sum((-1, -2), dtype=torch.int32)
    low = (masks > mask_threshold - threshold_offset).sum((-1, -2), dtype=torch.int32)
    return high / low


def batched_mask_to_box(masks: torch.Tensor) -> torch.Tensor:
    """XYXY boxes (inclusive max pixel index) around ...xHxW bool masks; 0,0,0,0 if empty."""
    if masks.numel() == 0:
        return torch.zeros(*masks.shape[:-2], 4, device=masks.device, dtype=torch.long)
    h, w = masks.shape[-2:]
    rows = masks.any(dim=-1)  # ... x H
    cols = masks.any(dim=-2)  # ... x W
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    bottom = (rows * ar_h).amax(-1)
    top = torch.where(rows, ar_h, h).amin(-1)
    right = (cols * ar_w).amax(-1)
    left = torch.where(cols, ar_w, w).amin(-1)
    boxes = torch.stack([left, top, right, bottom], dim=-1)
    empty = ~rows.any(-1)
    return boxes * (~empty).unsqueeze(-1)


def box_xyxy_to_xywh(box: Sequence[float]) -> List[float]:
    x0, y0, x1, y1 = (float(v) if isinstance(v, float) else int(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


def is_box_near_crop_edge(
    boxes: torch.Tensor, crop_box: List[int], orig_box: List[int], atol: float = 20.0
) -> torch.Tensor:
    """True for boxes (in crop coordinates) touching an inner edge of the crop, i.e. a crop
    edge that is not also an edge of the original image: such masks are likely cut off."""
    crop = torch.as_tensor(crop_box, dtype=torch.float, device=boxes.device)
    orig = torch.as_tensor(orig_box, dtype=torch.float, device=boxes.device)
    boxes = uncrop_boxes_xyxy(boxes, crop_box).float()
    near_crop = torch.isclose(boxes, crop[None], atol=atol, rtol=0)
    near_image = torch.isclose(boxes, orig[None], atol=atol, rtol=0)
    return (near_crop & ~near_image).any(dim=1)


def uncrop_boxes_xyxy(boxes: torch.Tensor, crop_box: List[int]) -> torch.Tensor:
    x0, y0 = crop_box[:2]
    return boxes + torch.tensor([x0, y0, x0, y0], device=boxes.device)


def uncrop_points(points: torch.Tensor, crop_box: List[int]) -> torch.Tensor:
    x0, y0 = crop_box[:2]
    return points + torch.tensor([x0, y0], device=points.device, dtype=points.dtype)


def uncrop_masks(masks: torch.Tensor, crop_box: List[int], orig_h: int, orig_w: int) -> torch.Tensor:
    """Zero-pads NxhxW crop masks back into the original image frame."""
    x0, y0, x1, y1 = crop_box
    if (x0, y0, x1, y1) == (0, 0, orig_w, orig_h):
        return masks
    return torch.nn.functional.pad(masks, (x0, orig_w - x1, y0, orig_h - y1), value=0)


# --- run-length encoding -------------------------------------------------------------

def encode_rle(masks: torch.Tensor) -> List[Dict[str, Any]]:
    """NxHxW bool masks -> COCO compressed RLEs ({'size': [h, w], 'counts': bytes}),
    byte-identical to pycocotools (which does the final compression).

    On the CPU pycocotools encodes the masks directly. On an accelerator the run
    boundaries are found there and only they cross to the host (one transfer), instead
    of every mask pixel.
    """
    if masks.shape[0] == 0:
        return []
    if masks.device.type == "cpu":
        arr = masks.to(torch.uint8).permute(1, 2, 0).numpy()
        return mask_utils.encode(np.asfortranarray(arr))
    return [mask_utils.frPyObjects(rle, *rle["size"]) for rle in run_lengths(masks)]


def run_lengths(masks: torch.Tensor) -> List[Dict[str, Any]]:
    """NxHxW bool masks (any device) -> uncompressed COCO RLEs, column-major, each
    starting with a run of zeros (possibly empty)."""
    n, h, w = masks.shape
    flat = masks.transpose(1, 2).reshape(n, h * w)
    # Boundaries: the first pixel, every change of value, one past the last pixel.
    change = torch.ones(n, h * w + 1, dtype=torch.bool, device=masks.device)
    change[:, 1:-1] = flat[:, 1:] != flat[:, :-1]
    rows, cols = change.nonzero(as_tuple=True)
    starts_with_one = flat[:, 0].cpu().numpy()
    rows, cols = rows.cpu().numpy(), cols.cpu().numpy()  # the only other transfer
    bounds = np.split(cols, np.searchsorted(rows, np.arange(1, n)))
    out = []
    for i, b in enumerate(bounds):
        counts = np.diff(b).tolist()
        out.append({"size": [h, w], "counts": ([0] + counts) if starts_with_one[i] else counts})
    return out


def decode_rle(rle: Dict[str, Any]) -> np.ndarray:
    """COCO RLE (compressed or uncompressed) -> HxW bool mask."""
    h, w = rle["size"]
    if isinstance(rle["counts"], list):
        rle = mask_utils.frPyObjects(rle, h, w)
    return mask_utils.decode(rle).astype(bool)


def coco_rle_to_json(rle: Dict[str, Any]) -> Dict[str, Any]:
    """Compressed RLE with bytes counts -> JSON-serialisable dict with str counts."""
    counts = rle["counts"]
    return {"size": list(rle["size"]), "counts": counts.decode("utf-8") if isinstance(counts, bytes) else counts}


def uncompressed_rle(mask: np.ndarray) -> Dict[str, Any]:
    """HxW bool mask -> {'size': [h, w], 'counts': [run lengths]} in column-major order,
    starting with a (possibly empty) run of zeros, as in the official 'uncompressed_rle'."""
    return run_lengths(torch.as_tensor(np.asarray(mask, dtype=bool))[None])[0]


def area_from_rle(rle: Dict[str, Any]) -> int:
    """Pixel count of a COCO RLE without decoding it."""
    if isinstance(rle["counts"], list):
        return int(sum(rle["counts"][1::2]))
    return int(mask_utils.area(rle))


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> Tuple[np.ndarray, bool]:
    """Fills holes (mode='holes') or removes islands (mode='islands') smaller than
    area_thresh pixels (8-connectivity). Returns (mask, whether it changed). When every
    island is small, the largest one is kept rather than emptying the mask."""
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    holes = mode == "holes"
    working = (holes ^ mask).astype(np.uint8)
    n_labels, regions, stats, _ = cv2.connectedComponentsWithStats(working, 8)
    sizes = stats[1:, cv2.CC_STAT_AREA]
    small = [i + 1 for i, s in enumerate(sizes) if s < area_thresh]
    if not small:
        return mask, False
    fill = [0] + small
    if not holes:
        fill = [i for i in range(n_labels) if i not in fill] or [int(np.argmax(sizes)) + 1]
    return np.isin(regions, fill), True
