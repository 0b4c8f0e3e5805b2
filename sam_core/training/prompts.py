"""Prompt simulation for interactive training (SAM paper, appendix A).

Coordinates are (x, y) pixel indices in the model's input frame, the convention
of ``SamPredictor``'s transformed coordinates; the prompt encoder adds the half-pixel
shift itself. Every sampler takes a ``torch.Generator`` so a run is reproducible.
"""
from __future__ import annotations

import torch
from torchvision.ops import masks_to_boxes


def _pixels_to_xy(flat_index: torch.Tensor, width: int) -> torch.Tensor:
    return torch.stack([flat_index % width, flat_index // width], dim=-1).float()


def sample_points_in_masks(masks: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One point drawn uniformly inside each mask: MxHxW bool -> Mx2 (x, y).

    Raises ValueError for an empty mask, which has no point to give.
    """
    weights = masks.flatten(1).float()
    if (weights.sum(1) == 0).any():
        raise ValueError("cannot sample a point inside an empty mask")
    index = torch.multinomial(weights, 1, generator=generator)[:, 0]
    return _pixels_to_xy(index, masks.shape[-1])


def noisy_boxes(
    masks: torch.Tensor,
    generator: torch.Generator | None = None,
    noise_fraction: float = 0.1,
    max_noise: float = 20.0,
) -> torch.Tensor:
    """Tight boxes of the masks with Gaussian corner noise: MxHxW -> Mx4 (x0, y0, x1, y1).

    Each coordinate moves by N(0, (noise_fraction * side)^2), clipped to +-max_noise
    pixels, then the box is clipped to the frame and kept ordered (x0 <= x1, y0 <= y1).
    """
    boxes = masks_to_boxes(masks)
    side = torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, dim=1)
    noise = torch.randn(boxes.shape, generator=generator, device=boxes.device)
    noise = (noise * noise_fraction * side).clamp(-max_noise, max_noise)
    noisy = boxes + noise
    h, w = masks.shape[-2:]
    noisy[:, 0::2] = noisy[:, 0::2].clamp(0, w - 1)
    noisy[:, 1::2] = noisy[:, 1::2].clamp(0, h - 1)
    x = torch.sort(noisy[:, 0::2], dim=1).values
    y = torch.sort(noisy[:, 1::2], dim=1).values
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)


def sample_error_points(
    pred: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A corrective click per mask, uniform over the error region.

    Args:
        pred, target: MxHxW bool predictions and ground truth.
        valid: HxW bool, the part of the frame that is image (not padding).

    Returns:
        coords: Mx2 (x, y) pixel indices.
        labels: M long, 1 (positive) on a false negative, 0 (negative) on a false positive.

    When a prediction is already exact, a negative click is drawn from the
    background, as SAM 2 does; if the mask also covers the whole valid frame, a
    positive click inside it.
    """
    error = pred ^ target
    if valid is not None:
        error = error & valid
    weights = error.flatten(1)
    exact = ~weights.any(1)
    if exact.any():
        background = ~target[exact] if valid is None else (~target[exact] & valid)
        fallback = background.flatten(1)
        full = ~fallback.any(1)
        fallback[full] = target[exact][full].flatten(1)
        weights = weights.clone()
        weights[exact] = fallback
    index = torch.multinomial(weights.float(), 1, generator=generator)[:, 0]
    labels = target.flatten(1).gather(1, index[:, None])[:, 0].long()
    return _pixels_to_xy(index, target.shape[-1]), labels


def round_schedule(
    num_rounds: int, num_rounds_without_point: int, generator: torch.Generator | None = None
) -> list[bool]:
    """Whether each round adds a new corrective point; round 0 holds the first prompt.

    Of the rounds without a new point, one is always the last (the model must learn
    to refine from its own mask alone) and the rest fall at random among the others.
    """
    if num_rounds < 1:
        raise ValueError("num_rounds must be at least 1")
    adds = [True] * num_rounds
    later = list(range(1, num_rounds))
    k = min(num_rounds_without_point, len(later))
    if k == 0:
        return adds
    adds[num_rounds - 1] = False
    middle = later[:-1]
    if k > 1 and middle:
        device = generator.device if generator is not None else None
        chosen = torch.randperm(len(middle), generator=generator, device=device)[: k - 1]
        for i in chosen.tolist():
            adds[middle[i]] = False
    return adds
