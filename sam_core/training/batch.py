"""Training batches: images resized to the model frame with their instance masks.

Kept free of any dataset format: callers hand in arrays (from synthetic scenes,
SA-1B shards or COCO), and get tensors in the frame the model is trained in.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Batch:
    """A batch in the model's input frame (S = ``image_encoder.img_size``).

    Attributes:
        images: Bx3xSxS float in [0, 255]; the longest side resized to S, the rest
            zero-padded at the bottom and right (``Sam.preprocess`` redoes the padding
            after normalisation, so its value here does not matter); for SAM 2, the
            image stretched to the square (``prepare_sample(square=True)``).
        input_sizes: B (h, w) sizes of the resized images inside the frame.
        masks: B tensors of MixSxS bool, instance masks in the same frame.
        supervise_iou: per image, whether its masks train the IoU head (None: all do).
            Masks a model produced itself are no evidence of how good its masks are:
            trained on them, the IoU head learns that its own masks are right.
        embeddings: the images' embeddings when the image encoder is frozen (computed
            once per image by the caller, e.g. from a cache), else None: the encoder runs.
        high_res: with ``embeddings``, SAM 2's high-resolution maps of the same images
            (``Sam2.encode``'s second output); None for SAM 1.
    """

    images: torch.Tensor
    input_sizes: list[tuple[int, int]]
    masks: list[torch.Tensor]
    supervise_iou: list[bool] | None = None
    embeddings: torch.Tensor | None = None
    high_res: list[torch.Tensor] | None = None

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.images.to(device), self.input_sizes, [m.to(device) for m in self.masks], self.supervise_iou,
                     None if self.embeddings is None else self.embeddings.to(device),
                     None if self.high_res is None else [h.to(device) for h in self.high_res])

    @property
    def num_masks(self) -> int:
        return sum(len(m) for m in self.masks)


def resized_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """(h, w) with the longest side scaled to ``size``, as ResizeLongestSide rounds it."""
    scale = size / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def select_masks(
    masks: np.ndarray,
    max_masks: int,
    max_area_fraction: float = 0.9,
    min_area: int = 1,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Indices of at most ``max_masks`` trainable masks, drawn at random.

    Masks covering more than ``max_area_fraction`` of the image are dropped, as in
    the paper: they are mostly the background and teach nothing about objects.
    """
    n = len(masks)
    if n == 0:
        return np.zeros(0, np.int64)
    areas = masks.reshape(n, -1).sum(1)
    ok = np.nonzero((areas >= min_area) & (areas <= max_area_fraction * masks[0].size))[0]
    if len(ok) > max_masks:
        ok = np.sort((rng or np.random.default_rng()).choice(ok, max_masks, replace=False))
    return ok


def prepare_sample(
    image: np.ndarray, masks: np.ndarray, size: int, square: bool = False
) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor]:
    """Resizes an HxWx3 uint8 image and its NxHxW bool masks into the SxS frame: the
    longest side to S (SAM 1), or, with ``square``, stretched to S x S (SAM 2).

    Returns (image 3xSxS float, (h, w) inside the frame, masks NxSxS bool). Masks that
    vanish in the resize (thinner than a pixel of the frame) come back empty; drop
    them with ``select_masks`` afterwards.
    """
    h, w = image.shape[:2]
    nh, nw = (size, size) if square else resized_shape(h, w, size)
    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    m = torch.from_numpy(np.ascontiguousarray(masks))
    if (nh, nw) != (h, w):
        img = F.interpolate(img[None], (nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
        if len(m):
            m = F.interpolate(m[None].float(), (nh, nw), mode="bilinear", antialias=True, align_corners=False)[0] >= 0.5
    frame = torch.zeros(3, size, size)
    frame[:, :nh, :nw] = img
    mask_frame = torch.zeros(len(m), size, size, dtype=torch.bool)
    if len(m):  # (an image without masks keeps its original size: nothing to place)
        mask_frame[:, :nh, :nw] = m
    return frame, (nh, nw), mask_frame


def collate(
    samples: list[tuple[torch.Tensor, tuple[int, int], torch.Tensor]], supervise_iou: list[bool] | None = None
) -> Batch:
    """Stacks ``prepare_sample`` outputs into a Batch."""
    if supervise_iou is not None and len(supervise_iou) != len(samples):
        raise ValueError(f"supervise_iou has {len(supervise_iou)} entries for {len(samples)} samples")
    return Batch(
        images=torch.stack([s[0] for s in samples]),
        input_sizes=[s[1] for s in samples],
        masks=[s[2] for s in samples],
        supervise_iou=supervise_iou,
    )
