"""Prompt encoder: sparse embeddings for points and boxes, dense ones for mask prompts."""
from __future__ import annotations

import math
from typing import Optional, Tuple, Type

import torch
from torch import nn

from .common import LayerNorm2d

# Point labels understood by the encoder. PAD marks a slot that holds no point; the box
# corners are labels too (how SAM 1's ONNX model and SAM 2 take boxes).
LABEL_PAD, LABEL_NEGATIVE, LABEL_POSITIVE, LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT = -1, 0, 1, 2, 3


class PromptEncoder(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: Tuple[int, int],
        input_image_size: Tuple[int, int],
        mask_in_chans: int,
        activation: Type[nn.Module] = nn.GELU,
        boxes_as_points: bool = False,
    ) -> None:
        """boxes_as_points (SAM 2): a box is embedded as two labelled corner points ahead
        of the other points, followed by the padding point (SAM 1 embeds a box after the
        points, without padding); the two give different tokens for the same prompt."""
        super().__init__()
        self.embed_dim = embed_dim
        self.boxes_as_points = boxes_as_points
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # Learned offsets: [negative point, positive point, box top-left, box bottom-right].
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """1 x C x h x w positional encoding of the image-embedding grid."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        points = points + 0.5  # pixel centres
        if pad:
            # Without a box the decoder was trained with one padding token after the points.
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), LABEL_PAD)], dim=1)
        emb = self.pe_layer.forward_with_coords(points, self.input_image_size)
        labels = labels[..., None]
        emb = torch.where(labels == LABEL_PAD, self.not_a_point_embed.weight, emb)
        emb = emb + (labels == LABEL_NEGATIVE) * self.point_embeddings[0].weight
        emb = emb + (labels == LABEL_POSITIVE) * self.point_embeddings[1].weight
        emb = emb + (labels == LABEL_BOX_TOP_LEFT) * self.point_embeddings[2].weight
        emb = emb + (labels == LABEL_BOX_BOTTOM_RIGHT) * self.point_embeddings[3].weight
        return emb

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        emb = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        offsets = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])
        return emb + offsets

    @staticmethod
    def _batch_size(
        points: Optional[Tuple[torch.Tensor, torch.Tensor]],
        boxes: Optional[torch.Tensor],
        masks: Optional[torch.Tensor],
    ) -> int:
        for prompt in (points[0] if points is not None else None, boxes, masks):
            if prompt is not None:
                return prompt.shape[0]
        return 1

    def forward(
        self,
        points: Optional[Tuple[torch.Tensor, torch.Tensor]],
        boxes: Optional[torch.Tensor],
        masks: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns (sparse BxNxC for points and boxes, dense BxCxhxw for masks)."""
        bs = self._batch_size(points, boxes, masks)
        if boxes is not None and self.boxes_as_points:
            corners = boxes.reshape(-1, 2, 2)
            corner_labels = torch.tensor([[LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT]], dtype=torch.int,
                                         device=boxes.device).expand(corners.shape[0], -1)
            if points is not None:
                corners = torch.cat([corners, points[0]], dim=1)
                corner_labels = torch.cat([corner_labels, points[1].to(corner_labels.dtype)], dim=1)
            points, boxes = (corners, corner_labels), None
        device = self.no_mask_embed.weight.device
        sparse = [torch.empty((bs, 0, self.embed_dim), device=device)]
        if points is not None:
            coords, labels = points
            sparse.append(self._embed_points(coords, labels, pad=boxes is None))
        if boxes is not None:
            sparse.append(self._embed_boxes(boxes))
        sparse_embeddings = torch.cat(sparse, dim=1)
        if masks is not None:
            dense_embeddings = self.mask_downscaling(masks)
        else:
            dense_embeddings = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                bs, -1, *self.image_embedding_size
            )
        return sparse_embeddings, dense_embeddings


class PositionEmbeddingRandom(nn.Module):
    """Fourier features of coordinates with fixed random frequencies (stored in the
    checkpoint as ``positional_encoding_gaussian_matrix``)."""

    def __init__(self, num_pos_feats: int = 64, scale: Optional[float] = None) -> None:
        super().__init__()
        scale = 1.0 if scale is None or scale <= 0.0 else scale
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(2, num_pos_feats))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """coords in [0, 1], shape ... x 2 -> ... x 2*num_pos_feats."""
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: Tuple[int, int]) -> torch.Tensor:
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)
        return self._pe_encoding(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
        """Pixel coordinates (x, y) in an image of size (H, W) -> B x N x C."""
        scale = coords.new_tensor([1.0 / image_size[1], 1.0 / image_size[0]])
        return self._pe_encoding((coords * scale).float())
