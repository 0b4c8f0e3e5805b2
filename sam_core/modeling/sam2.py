"""Sam2: SAM 2 / 2.1 for images (the Hiera encoder, SAM's prompt encoder and the mask
decoder with SAM 2's options), behind the same interface as ``Sam``.

What differs from SAM 1, and where it lives:
  * input frame: the image is stretched to a square (no padding), bilinear with
    antialiasing on [0, 1] pixels, then ImageNet-normalised (``prepare_image``);
    points scale by S/W and S/H (``ResizeSquare``);
  * features: the image embedding plus two higher-resolution maps that the decoder adds
    while upscaling (``encode``); masks are upsampled straight to the image size
    (``postprocess_masks``);
  * boxes enter the prompt encoder as two labelled corner points;
  * the video tensors of an official checkpoint (memory attention and encoder, object
    pointers) are not used for images; they are kept aside, untouched, so that a model
    fine-tuned here saves back into a file the official package loads
    (``sam_core.checkpoint``).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..utils.transforms import ResizeSquare
from .base import SegmentAnything
from .hiera import HieraImageEncoder
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder

# ImageNet statistics on [0, 1] pixels (SAM 1's are the same times 255).
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)


class Sam2(SegmentAnything):
    family = "sam2"

    def __init__(self, image_encoder: HieraImageEncoder, prompt_encoder: PromptEncoder,
                 mask_decoder: MaskDecoder) -> None:
        super().__init__(image_encoder, prompt_encoder, mask_decoder, PIXEL_MEAN, PIXEL_STD)
        # Added to the image embedding: what SAM 2 sees for a frame with no memory yet.
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, prompt_encoder.embed_dim))
        # An official checkpoint's video tensors, by their official names (see module doc).
        self.video_state: Dict[str, torch.Tensor] = {}

    def input_transform(self) -> ResizeSquare:
        return ResizeSquare(self.img_size)

    def prepare_image(self, image: np.ndarray) -> torch.Tensor:
        """HxWx3 uint8 RGB -> 3xSxS normalised input, as the official transforms do it
        (to [0, 1], resize with antialiasing, normalise; in that order, for parity)."""
        pixels = np.require(image, requirements=["W"])  # torch wants a writable array (a copy only if not)
        x = torch.as_tensor(pixels, device=self.device).permute(2, 0, 1).float().div(255)
        size = self.img_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x[None], (size, size), mode="bilinear", align_corners=False, antialias=True)[0]
        return (x - self.pixel_mean) / self.pixel_std

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """A 3xSxS image in [0, 255], already resized to the square (training batches) ->
        the normalised encoder input."""
        return (x / 255 - self.pixel_mean) / self.pixel_std

    def encode(self, images: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Bx3xSxS prepared images -> (image embeddings BxCxS/16xS/16, [the S/4 and S/8 maps
        already projected by the decoder's conv_s0/conv_s1, once per image])."""
        fine, middle, embedding = self.image_encoder(images)
        decoder = self.mask_decoder
        embedding = embedding + self.no_mem_embed.view(1, -1, 1, 1)
        return embedding, [decoder.conv_s0(fine), decoder.conv_s1(middle)]

    def postprocess_masks(self, masks: torch.Tensor, input_size: Tuple[int, ...], original_size: Tuple[int, ...]
                          ) -> torch.Tensor:
        """Low-res logits -> logits at the original image size (``input_size`` is unused:
        the square input frame has no padding to cut)."""
        return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)
