"""Resizing of images, points and boxes to a model's input frame: SAM 1's (long side =
img_size, padded to a square) and SAM 2's (stretched to the square)."""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class ResizeLongestSide:
    """Resizes so that the longest side equals ``target_length``, keeping aspect ratio,
    and maps coordinates into that frame. numpy (``apply_*``) and torch (``*_torch``)."""

    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> Tuple[int, int]:
        scale = long_side_length / max(oldh, oldw)
        return int(oldh * scale + 0.5), int(oldw * scale + 0.5)

    def input_size(self, original_size: Tuple[int, ...]) -> Tuple[int, int]:
        """(h, w) of an image of ``original_size`` in the input frame (before padding)."""
        return self.get_preprocess_shape(original_size[0], original_size[1], self.target_length)

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """HxWxC uint8 -> resized uint8. PIL's bilinear filter (antialiased when
        shrinking) is what the released models were evaluated with."""
        h, w = self.get_preprocess_shape(image.shape[0], image.shape[1], self.target_length)
        return np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))

    def apply_coords(self, coords: np.ndarray, original_size: Tuple[int, ...]) -> np.ndarray:
        """... x 2 (x, y) in the original image -> the resized frame, as float64."""
        old_h, old_w = original_size
        new_h, new_w = self.get_preprocess_shape(old_h, old_w, self.target_length)
        coords = np.array(coords, dtype=float, copy=True)
        coords[..., 0] *= new_w / old_w
        coords[..., 1] *= new_h / old_h
        return coords

    def apply_boxes(self, boxes: np.ndarray, original_size: Tuple[int, ...]) -> np.ndarray:
        """Bx4 XYXY boxes -> the resized frame."""
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_image_torch(self, image: torch.Tensor) -> torch.Tensor:
        """BxCxHxW float -> resized with antialiased bilinear interpolation (close to,
        not bit-identical with, apply_image)."""
        size = self.get_preprocess_shape(image.shape[-2], image.shape[-1], self.target_length)
        return F.interpolate(image, size, mode="bilinear", align_corners=False, antialias=True)

    def apply_coords_torch(self, coords: torch.Tensor, original_size: Tuple[int, ...]) -> torch.Tensor:
        old_h, old_w = original_size
        new_h, new_w = self.get_preprocess_shape(old_h, old_w, self.target_length)
        scale = torch.tensor([new_w / old_w, new_h / old_h], device=coords.device)
        return coords.to(torch.float) * scale

    def apply_boxes_torch(self, boxes: torch.Tensor, original_size: Tuple[int, ...]) -> torch.Tensor:
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)


class ResizeSquare:
    """SAM 2's input frame: the image stretched to ``target_length`` x ``target_length``;
    coordinates scale by S/W and S/H. Computed in float32 in the official order
    (divide by the side, then multiply by S), so that prompts match it bit for bit."""

    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    def input_size(self, original_size: Tuple[int, ...]) -> Tuple[int, int]:
        return self.target_length, self.target_length

    def apply_coords(self, coords: np.ndarray, original_size: Tuple[int, ...]) -> np.ndarray:
        h, w = original_size
        coords = np.array(coords, dtype=np.float32, copy=True)
        coords[..., 0] = coords[..., 0] / np.float32(w)
        coords[..., 1] = coords[..., 1] / np.float32(h)
        return coords * np.float32(self.target_length)

    def apply_boxes(self, boxes: np.ndarray, original_size: Tuple[int, ...]) -> np.ndarray:
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_coords_torch(self, coords: torch.Tensor, original_size: Tuple[int, ...]) -> torch.Tensor:
        h, w = original_size
        sides = torch.tensor([float(w), float(h)], device=coords.device)
        return coords.to(torch.float) / sides * self.target_length

    def apply_boxes_torch(self, boxes: torch.Tensor, original_size: Tuple[int, ...]) -> torch.Tensor:
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)
