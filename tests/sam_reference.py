"""Builds pairs of (official segment_anything model, sam_core model) with identical
random weights, the oracle for parity tests. Test-only."""
from __future__ import annotations

import numpy as np
import torch

from sam_core.bench import official_sam
from sam_core.build import ENCODER_SIZES, _build_sam


def reference_sam(arch: str):
    """The official classes wired with the sizes of ``arch`` (random init)."""
    return official_sam(arch)


def randomise_(model: torch.nn.Module, seed: int) -> None:
    """Gives zero-initialised parameters (positional embeddings, relative positions,
    biases) random values so that parity tests exercise them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def model_pair(arch: str = "vit_tiny", seed: int = 0):
    """(official model, sam_core model) with the same random weights, in eval mode."""
    torch.manual_seed(seed)
    ref = reference_sam(arch)
    randomise_(ref, seed)
    ours = _build_sam(**ENCODER_SIZES[arch])
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours.eval()


def scene_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A uint8 RGB image of flat-coloured rectangles and discs over a gradient: enough
    structure for the random-weight model to produce varied masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), np.full_like(xx, 90)], -1)
    img = img.astype(np.uint8)
    for _ in range(8):
        color = rng.integers(0, 256, 3)
        cx, cy = rng.integers(0, width), rng.integers(0, height)
        r = rng.integers(max(2, min(height, width) // 12), max(3, min(height, width) // 4))
        if rng.random() < 0.5:
            img[max(cy - r, 0): cy + r, max(cx - r, 0): cx + r] = color
        else:
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = color
    return img
