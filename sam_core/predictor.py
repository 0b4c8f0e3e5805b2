"""SamPredictor: encode an image (or a batch of images) once, then predict masks for
any number of point / box / mask prompts on the cached embedding."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .modeling import Sam
from .utils.inputs import as_rgb_uint8
from .utils.transforms import ResizeLongestSide


class SamPredictor:
    def __init__(self, sam_model: Sam) -> None:
        self.model = sam_model
        self.transform = ResizeLongestSide(sam_model.image_encoder.img_size)
        self.reset_image()

    # --- images ---------------------------------------------------------------------

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Encodes one HxWx3 uint8 image (RGB or BGR) and caches its embedding."""
        self.set_image_batch([image], image_format)

    def set_image_batch(self, images: Sequence[np.ndarray], image_format: str = "RGB", batch_size: int = 8) -> None:
        """Encodes several images (any sizes) in encoder batches of ``batch_size`` and
        caches their embeddings; prompts then choose one with ``image_index``."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if len(images) == 0:
            raise ValueError("set_image_batch needs at least one image")
        tensors, sizes = [], []
        for i, image in enumerate(images):
            image = as_rgb_uint8(image, name=f"image {i}" if len(images) > 1 else "image")
            if image_format != self.model.image_format:
                image = np.ascontiguousarray(image[..., ::-1])
            resized = torch.as_tensor(self.transform.apply_image(image), device=self.device)
            tensors.append(resized.permute(2, 0, 1).contiguous())
            sizes.append(image.shape[:2])
        self._encode(tensors, sizes, batch_size)

    @torch.no_grad()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: Tuple[int, ...]) -> None:
        """Encodes a 1x3xHxW image already resized with ResizeLongestSide."""
        size = self.model.image_encoder.img_size
        if transformed_image.ndim != 4 or transformed_image.shape[1] != 3 or max(transformed_image.shape[2:]) != size:
            raise ValueError(
                f"set_torch_image expects Bx3xHxW with long side {size}; got shape {tuple(transformed_image.shape)}"
            )
        self._encode(list(transformed_image), [tuple(original_image_size)] * transformed_image.shape[0], 8)

    @torch.no_grad()
    def _encode(self, images: List[torch.Tensor], original_sizes: List[Tuple[int, int]], batch_size: int) -> None:
        self.reset_image()
        features = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            batch = torch.stack([self.model.preprocess(x.float()) for x in chunk])
            features.append(self.model.image_encoder(batch))
        self.features = torch.cat(features)
        self.original_sizes = [tuple(int(v) for v in s) for s in original_sizes]
        self.input_sizes = [tuple(int(v) for v in x.shape[-2:]) for x in images]
        self.is_image_set = True

    # Single-image attributes of the official API.
    @property
    def original_size(self) -> Optional[Tuple[int, int]]:
        return self.original_sizes[0] if self.is_image_set else None

    @property
    def input_size(self) -> Optional[Tuple[int, int]]:
        return self.input_sizes[0] if self.is_image_set else None

    # --- prompts --------------------------------------------------------------------

    def predict(
        self,
        point_coords: Optional[np.ndarray] = None,
        point_labels: Optional[np.ndarray] = None,
        box: Optional[np.ndarray] = None,
        mask_input: Optional[np.ndarray] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        image_index: int = 0,
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One prompt in original-image pixels: Nx2 points (x, y) with N labels
        (1 foreground, 0 background), a length-4 XYXY box, a 1x256x256 low-res mask.

        Returns (masks CxHxW bool, or float logits with return_logits; iou predictions C;
        low-res logits Cx256x256), C = 3 with multimask_output else 1.
        """
        self._require_image()
        original_size = self.original_sizes[image_index]
        coords = labels = boxes = masks = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be given with point_coords")
            point_coords = np.asarray(point_coords)
            point_labels = np.asarray(point_labels)
            if point_coords.ndim != 2 or point_coords.shape[1] != 2 or len(point_labels) != len(point_coords):
                raise ValueError(
                    f"point_coords must be Nx2 with N labels; got {point_coords.shape} and {point_labels.shape}"
                )
            coords = torch.as_tensor(self.transform.apply_coords(point_coords, original_size), dtype=torch.float,
                                     device=self.device)[None]
            labels = torch.as_tensor(point_labels, dtype=torch.int, device=self.device)[None]
        if box is not None:
            boxes = torch.as_tensor(self.transform.apply_boxes(np.asarray(box), original_size), dtype=torch.float,
                                    device=self.device)
            boxes = boxes.reshape(1, 4)
        if mask_input is not None:
            masks = torch.as_tensor(mask_input, dtype=torch.float, device=self.device)[None]
        out_masks, iou, low_res = self.predict_torch(
            coords, labels, boxes, masks, multimask_output, return_logits, image_index=image_index
        )
        return out_masks[0].cpu().numpy(), iou[0].cpu().numpy(), low_res[0].cpu().numpy()

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: Optional[torch.Tensor],
        point_labels: Optional[torch.Tensor],
        boxes: Optional[torch.Tensor] = None,
        mask_input: Optional[torch.Tensor] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        image_index: int = 0,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """B prompts at once, already in the model's input frame: BxNx2 points with BxN
        labels, Bx4 boxes, Bx1x256x256 mask inputs.

        Returns (masks BxCxHxW at the original size, iou BxC, low-res logits BxCx256x256).
        """
        low_res, iou = self.predict_low_res(
            point_coords, point_labels, boxes, mask_input, multimask_output, image_index
        )
        masks = self.model.postprocess_masks(low_res, self.input_sizes[image_index], self.original_sizes[image_index])
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, iou, low_res

    @torch.no_grad()
    def predict_low_res(
        self,
        point_coords: Optional[torch.Tensor],
        point_labels: Optional[torch.Tensor],
        boxes: Optional[torch.Tensor] = None,
        mask_input: Optional[torch.Tensor] = None,
        multimask_output: bool = True,
        image_index: int = 0,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Like predict_torch but stops at the low-res logits, so callers can filter on
        the predicted IoU before paying for upsampling. Returns (low-res logits, iou)."""
        self._require_image()
        points = (point_coords, point_labels) if point_coords is not None else None
        sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        return self.model.mask_decoder(
            image_embeddings=self.features[image_index : image_index + 1],
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )

    def get_image_embedding(self, image_index: int = 0) -> torch.Tensor:
        """1xCxhxw embedding of the image set (C=256, h=w=64 for the released models)."""
        self._require_image()
        return self.features[image_index : image_index + 1]

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_image(self) -> None:
        """Drops the cached embeddings."""
        self.is_image_set = False
        self.features: Optional[torch.Tensor] = None
        self.original_sizes: List[Tuple[int, int]] = []
        self.input_sizes: List[Tuple[int, int]] = []

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
