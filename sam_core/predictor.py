"""SamPredictor: encode an image (or a batch of images) once, then predict masks for
any number of point / box / mask prompts on the cached embedding. The same class serves
SAM 1 (``Sam``) and SAM 2 / 2.1 (``Sam2``): the model says how images and prompts enter
its frame and what its features are; SAM 2's official predictor behaviours (low-res
logits clamped to +-32, optional hole and sprinkle removal) apply to SAM 2 models."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .modeling import Sam
from .utils.inputs import as_rgb_uint8
from .utils.regions import fill_small_regions

SAM2_LOW_RES_CLAMP = 32.0  # SAM 2's predictor returns low-res logits clipped to +-32


class SamPredictor:
    def __init__(self, sam_model: Sam, max_hole_area: float = 0.0, max_sprinkle_area: float = 0.0) -> None:
        """max_hole_area / max_sprinkle_area (SAM 2's predictor options, in low-res mask
        pixels): background holes / foreground specks up to that area are filled /
        removed in the low-res logits before upsampling. The official package does this
        only with its CUDA extension and silently skips it otherwise; here it runs
        everywhere (OpenCV, 8-connectivity, as that extension counts)."""
        self.model = sam_model
        self.transform = sam_model.input_transform()
        self.max_hole_area = max_hole_area
        self.max_sprinkle_area = max_sprinkle_area
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
        inputs, sizes, input_sizes = [], [], []
        for i, image in enumerate(images):
            image = as_rgb_uint8(image, name=f"image {i}" if len(images) > 1 else "image")
            if image_format != self.model.image_format:
                image = np.ascontiguousarray(image[..., ::-1])
            inputs.append(self.model.prepare_image(image))
            sizes.append(image.shape[:2])
            input_sizes.append(self.transform.input_size(image.shape[:2]))
        self._encode(inputs, sizes, input_sizes, batch_size)

    @torch.no_grad()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: Tuple[int, ...]) -> None:
        """Encodes a 1x3xHxW image already resized with ResizeLongestSide (SAM 1's API)."""
        if self.model.family != "sam":
            raise ValueError("set_torch_image is SAM 1's API; for SAM 2 call set_image with the image itself")
        size = self.model.img_size
        if transformed_image.ndim != 4 or transformed_image.shape[1] != 3 or max(transformed_image.shape[2:]) != size:
            raise ValueError(
                f"set_torch_image expects Bx3xHxW with long side {size}; got shape {tuple(transformed_image.shape)}"
            )
        inputs = [self.model.preprocess(x.float()) for x in transformed_image]
        input_sizes = [tuple(int(v) for v in transformed_image.shape[-2:])] * len(inputs)
        self._encode(inputs, [tuple(original_image_size)] * len(inputs), input_sizes, 8)

    @torch.no_grad()
    def _encode(self, inputs: List[torch.Tensor], original_sizes: List[Tuple[int, int]],
                input_sizes: List[Tuple[int, int]], batch_size: int) -> None:
        self.reset_image()
        features, high_res = [], []
        for start in range(0, len(inputs), batch_size):
            embedding, maps = self.model.encode(torch.stack(inputs[start : start + batch_size]))
            features.append(embedding)
            high_res.append(maps)
        self.features = torch.cat(features)
        # Per level, all images: [Bx32xS/4xS/4, Bx64xS/8xS/8] for SAM 2, [] for SAM 1.
        self.high_res_features = [torch.cat(level) for level in zip(*high_res)]
        self.original_sizes = [tuple(int(v) for v in s) for s in original_sizes]
        self.input_sizes = [tuple(int(v) for v in s) for s in input_sizes]
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
        (1 foreground, 0 background), a length-4 XYXY box, a 1x256x256 low-res mask
        (for a 1024-px model).

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
        logits = low_res
        if self.max_hole_area > 0 or self.max_sprinkle_area > 0:
            logits = fill_small_regions(low_res, self.model.mask_threshold, self.max_hole_area,
                                        self.max_sprinkle_area)
        masks = self.model.postprocess_masks(logits, self.input_sizes[image_index], self.original_sizes[image_index])
        if not return_logits:
            masks = masks > self.model.mask_threshold
        if self.model.family == "sam2":
            low_res = low_res.clamp(-SAM2_LOW_RES_CLAMP, SAM2_LOW_RES_CLAMP)
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
            high_res_features=self.get_high_res_features(image_index),
        )

    def get_image_embedding(self, image_index: int = 0) -> torch.Tensor:
        """1xCxhxw embedding of the image set (C=256, h=w=64 for the released models)."""
        self._require_image()
        return self.features[image_index : image_index + 1]

    def get_high_res_features(self, image_index: int = 0) -> Optional[List[torch.Tensor]]:
        """SAM 2: the image's two projected high-resolution maps (1x32xS/4xS/4,
        1x64xS/8xS/8), which the decoder needs besides the embedding; SAM 1: None."""
        self._require_image()
        if not self.high_res_features:
            return None
        return [level[image_index : image_index + 1] for level in self.high_res_features]

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_image(self) -> None:
        """Drops the cached embeddings."""
        self.is_image_set = False
        self.features: Optional[torch.Tensor] = None
        self.high_res_features: List[torch.Tensor] = []
        self.original_sizes: List[Tuple[int, int]] = []
        self.input_sizes: List[Tuple[int, int]] = []

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
