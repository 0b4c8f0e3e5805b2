"""Sam: the image encoder, prompt encoder and mask decoder wired together."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..utils.transforms import ResizeLongestSide
from .base import SegmentAnything
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class Sam(SegmentAnything):
    family = "sam"

    def __init__(
        self,
        image_encoder: ImageEncoderViT,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        pixel_mean: Sequence[float] = PIXEL_MEAN,
        pixel_std: Sequence[float] = PIXEL_STD,
    ) -> None:
        super().__init__(image_encoder, prompt_encoder, mask_decoder, pixel_mean, pixel_std)

    def input_transform(self) -> ResizeLongestSide:
        return ResizeLongestSide(self.img_size)

    def prepare_image(self, image: np.ndarray) -> torch.Tensor:
        """HxWx3 uint8 RGB -> 3xSxS normalised, zero-padded encoder input."""
        resized = torch.as_tensor(self.input_transform().apply_image(image), device=self.device)
        return self.preprocess(resized.permute(2, 0, 1).float())

    def encode(self, images: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Bx3xSxS encoder inputs -> (image embeddings, no high-resolution maps)."""
        return self.image_encoder(images), []

    @torch.no_grad()
    def forward(self, batched_input: List[Dict[str, Any]], multimask_output: bool) -> List[Dict[str, torch.Tensor]]:
        """End-to-end prediction, as in the official API.

        Each input dict has 'image' (3xHxW, already resized so the long side is
        image_encoder.img_size), 'original_size' (H, W) and optionally 'point_coords'
        (BxNx2), 'point_labels' (BxN), 'boxes' (Bx4), 'mask_inputs' (Bx1x256x256), all in
        the resized frame.

        Returns one dict per image:
          'masks': bool BxCxHxW at the original size,
          'iou_predictions': BxC,
          'low_res_logits': BxCx256x256, reusable as 'mask_inputs'.
        """
        images = torch.stack([self.preprocess(x["image"]) for x in batched_input])
        embeddings = self.image_encoder(images)
        outputs = []
        for record, embedding in zip(batched_input, embeddings):
            points = (record["point_coords"], record["point_labels"]) if "point_coords" in record else None
            sparse, dense = self.prompt_encoder(points, record.get("boxes"), record.get("mask_inputs"))
            low_res, iou = self.mask_decoder(
                image_embeddings=embedding[None],
                image_pe=self.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
            masks = self.postprocess_masks(low_res, record["image"].shape[-2:], record["original_size"])
            outputs.append(
                {"masks": masks > self.mask_threshold, "iou_predictions": iou, "low_res_logits": low_res}
            )
        return outputs

    def postprocess_masks(
        self, masks: torch.Tensor, input_size: Tuple[int, ...], original_size: Tuple[int, ...]
    ) -> torch.Tensor:
        """Low-res logits -> logits at the original image size (padding removed)."""
        size = self.image_encoder.img_size
        masks = F.interpolate(masks, (size, size), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise pixels and zero-pad bottom/right to a square encoder input."""
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        size = self.image_encoder.img_size
        return F.pad(x, (0, size - w, 0, size - h))
