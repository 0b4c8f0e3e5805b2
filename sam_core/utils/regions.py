"""Small connected regions of low-resolution mask logits: SAM 2's hole filling and
sprinkle removal (its predictor's ``max_hole_area`` / ``max_sprinkle_area``), which the
official package runs only through its CUDA extension. OpenCV's connected components
(8-connectivity, as that extension labels them) make it run on any device."""
from __future__ import annotations

import cv2
import numpy as np
import torch


def _small_components(binary: np.ndarray, max_area: float) -> np.ndarray:
    """Pixels of ``binary`` (HxW bool) whose 8-connected component has area <= max_area."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    small = stats[:, cv2.CC_STAT_AREA] <= max_area
    small[0] = False  # label 0 is the rest of the image, not a component
    return small[labels] & binary if count > 1 else np.zeros_like(binary)


def fill_small_regions(logits: torch.Tensor, threshold: float, max_hole_area: float, max_sprinkle_area: float
                       ) -> torch.Tensor:
    """``logits`` (... x h x w) with background holes of area <= max_hole_area set to
    threshold + 10 and foreground specks of area <= max_sprinkle_area set to
    threshold - 10 (SAM 2's values); areas in low-res pixels, 0 turns a step off."""
    if max_hole_area <= 0 and max_sprinkle_area <= 0:
        return logits
    flat = logits.reshape(-1, *logits.shape[-2:]).float()
    out = flat.clone()
    values = flat.detach().cpu().numpy()
    for i, mask in enumerate(values):
        if max_hole_area > 0:
            holes = _small_components(mask <= threshold, max_hole_area)
            if holes.any():
                out[i][torch.from_numpy(holes).to(out.device)] = threshold + 10.0
        if max_sprinkle_area > 0:
            # Components of the mask as it came (before filling), as the official code has it.
            specks = _small_components(mask > threshold, max_sprinkle_area)
            if specks.any():
                out[i][torch.from_numpy(specks).to(out.device)] = threshold - 10.0
    return out.reshape(logits.shape)
