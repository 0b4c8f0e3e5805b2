"""Mask decoder: output tokens + prompt tokens run through the two-way transformer;
hypernetwork MLPs turn mask tokens into dynamic 1x1 filters over upscaled image features."""
from __future__ import annotations

from typing import Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d


class MaskDecoder(nn.Module):
    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: Type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        # Token 0 is the single-mask output; tokens 1.. are the ambiguity-aware outputs.
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Predicts masks for B prompts.

        image_embeddings is 1xCxhxw (shared by all prompts, as in the official API) or
        BxCxhxw (one image per prompt, for batched training).
        Returns (low-res mask logits Bx{3 or 1}x4hx4w, predicted IoU Bx{3 or 1}).
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        keep = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, keep], iou_pred[:, keep]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """All 1 + num_multimask_outputs masks and IoU predictions."""
        tokens, keys = self.run_transformer(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        return self.masks_from_tokens(tokens, keys), self.iou_from_tokens(tokens)

    def run_transformer(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The two-way transformer alone. Returns (output tokens nxTxC, image features nxCxhxw).

        Splitting here lets a caller read the IoU predictions (iou_from_tokens) and
        build masks (masks_from_tokens) only for the prompts it keeps.
        """
        n = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.expand(n, -1, -1), sparse_prompt_embeddings], dim=1)
        if image_embeddings.shape[0] not in (1, n):
            raise ValueError(
                f"image_embeddings has batch {image_embeddings.shape[0]}; expected 1 or {n} (one per prompt)"
            )
        dense = dense_prompt_embeddings
        if dense.shape[0] > 1 and dense.stride(0) == 0:
            # The prompt encoder's no-mask embedding, expanded over the prompts: the image
            # tokens are then identical for every prompt until the first image->token
            # attention, so the transformer projects them once instead of n times.
            dense = dense[:1]
        src = image_embeddings + dense  # 1xCxhxw when shared by all prompts, else nxCxhxw
        c, h, w = src.shape[1:]
        tokens, keys = self.transformer(src, image_pe, tokens)
        return tokens, keys.transpose(1, 2).reshape(n, c, h, w)

    def iou_from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """n x (1 + num_multimask_outputs) predicted IoUs from run_transformer's tokens."""
        return self.iou_prediction_head(tokens[:, 0, :])

    def masks_from_tokens(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """n x (1 + num_multimask_outputs) x 4h x 4w low-res mask logits from
        run_transformer's outputs."""
        upscaled = self.output_upscaling(features)
        mask_tokens = tokens[:, 1 : 1 + self.num_mask_tokens, :]
        hyper_in = torch.stack([mlp(mask_tokens[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
                               dim=1)
        n, c, h, w = upscaled.shape
        return (hyper_in @ upscaled.view(n, c, h * w)).view(n, -1, h, w)


class MLP(nn.Module):
    """Plain MLP with ReLU between layers."""

    def __init__(
        self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int, sigmoid_output: bool = False
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return torch.sigmoid(x) if self.sigmoid_output else x
