"""What SAM 1 (``Sam``) and SAM 2 / 2.1 (``Sam2``) share: three parts, the pixel
normalisation, and the interface the predictor, the generator, the training step and
the ONNX export use, so that none of them branches on the family."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch
from torch import nn


class SegmentAnything(nn.Module):
    family: str = ""              # "sam" or "sam2": what datasets record
    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(self, image_encoder: nn.Module, prompt_encoder: nn.Module, mask_decoder: nn.Module,
                 pixel_mean: Sequence[float], pixel_std: Sequence[float]) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        # Not persistent: the released checkpoints do not contain them.
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def img_size(self) -> int:
        """The side of the square input frame."""
        return self.image_encoder.img_size

    def input_transform(self):
        """How coordinates map into the input frame (``apply_coords``, ``apply_boxes``,
        their ``*_torch`` forms, ``input_size``)."""
        raise NotImplementedError

    def prepare_image(self, image: np.ndarray) -> torch.Tensor:
        """HxWx3 uint8 RGB -> the 3xSxS normalised encoder input."""
        raise NotImplementedError

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """A 3xhxw image in [0, 255] already in the frame (training batches) -> encoder input."""
        raise NotImplementedError

    def encode(self, images: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Bx3xSxS encoder inputs -> (image embeddings, extra maps the decoder takes)."""
        raise NotImplementedError

    def postprocess_masks(self, masks: torch.Tensor, input_size: Tuple[int, ...], original_size: Tuple[int, ...]
                          ) -> torch.Tensor:
        """Low-res logits -> logits at the original image size."""
        raise NotImplementedError
