"""Mask decoder: output tokens + prompt tokens run through the two-way transformer;
hypernetwork MLPs turn mask tokens into dynamic 1x1 filters over upscaled image features.

SAM 2's decoder is this one with four options switched on (``sam_core.build``): an
object-score token ahead of the others, two high-resolution feature maps added while
upscaling, a sigmoid on the IoU head, and, for a single-mask answer, falling back to the
best multimask output when the single mask is unstable.
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Type

import torch
from torch import nn

from .common import MLP, LayerNorm2d


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
        use_high_res_features: bool = False,
        iou_prediction_use_sigmoid: bool = False,
        pred_obj_scores: bool = False,
        pred_obj_scores_mlp: bool = False,
        dynamic_multimask_via_stability: bool = False,
        dynamic_multimask_stability_delta: float = 0.05,
        dynamic_multimask_stability_thresh: float = 0.98,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        # SAM 2 puts its object-score token first; the IoU and mask tokens follow it.
        self.first = 1 if pred_obj_scores else 0
        if pred_obj_scores:
            self.obj_score_token = nn.Embedding(1, transformer_dim)
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
        self.use_high_res_features = use_high_res_features
        if use_high_res_features:
            # Applied once per image (``Sam2.encode``), not per prompt.
            self.conv_s0 = nn.Conv2d(transformer_dim, transformer_dim // 8, kernel_size=1)
            self.conv_s1 = nn.Conv2d(transformer_dim, transformer_dim // 4, kernel_size=1)
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth,
                                       sigmoid_output=iou_prediction_use_sigmoid)
        if pred_obj_scores:
            # Read by SAM 2's video tracking only; kept so that its checkpoints load whole.
            self.pred_obj_score_head = (MLP(transformer_dim, transformer_dim, 1, 3) if pred_obj_scores_mlp
                                        else nn.Linear(transformer_dim, 1))
        self.dynamic_multimask_via_stability = dynamic_multimask_via_stability
        self.dynamic_multimask_stability_delta = dynamic_multimask_stability_delta
        self.dynamic_multimask_stability_thresh = dynamic_multimask_stability_thresh

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        high_res_features: Optional[List[torch.Tensor]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Predicts masks for B prompts.

        image_embeddings is 1xCxhxw (shared by all prompts, as in the official API) or
        BxCxhxw (one image per prompt, for batched training); high_res_features (SAM 2)
        the image's two projected high-resolution maps, batched the same way.
        Returns (low-res mask logits Bx{3 or 1}x4hx4w, predicted IoU Bx{3 or 1}).
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, high_res_features
        )
        return self.select(masks, iou_pred, multimask_output)

    def select(self, masks: torch.Tensor, iou_pred: torch.Tensor, multimask_output: bool
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The answer among all outputs: the three multimask ones, or the single one
        (SAM 2 in eval mode: the best multimask output where the single is unstable)."""
        if multimask_output:
            return masks[:, 1:], iou_pred[:, 1:]
        if self.dynamic_multimask_via_stability and not self.training:
            return self._stable_single(masks, iou_pred)
        return masks[:, :1], iou_pred[:, :1]

    def _stable_single(self, masks: torch.Tensor, iou_pred: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(masks.shape[0], device=masks.device)
        best = iou_pred[:, 1:].argmax(dim=-1) + 1
        logits = masks[:, 0].flatten(-2)
        delta = self.dynamic_multimask_stability_delta
        inner = (logits > delta).sum(-1).float()
        outer = (logits > -delta).sum(-1).float()
        stability = torch.where(outer > 0, inner / outer, 1.0)
        stable = stability >= self.dynamic_multimask_stability_thresh
        chosen = torch.where(stable, torch.zeros_like(best), best)
        return masks[rows, chosen][:, None], iou_pred[rows, chosen][:, None]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        high_res_features: Optional[List[torch.Tensor]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """All 1 + num_multimask_outputs masks and IoU predictions."""
        tokens, keys = self.run_transformer(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        return self.masks_from_tokens(tokens, keys, high_res_features), self.iou_from_tokens(tokens)

    def run_transformer(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The two-way transformer alone. Returns (output tokens nxTxC, image features
        nxCxhxw: a view of the transformer's tokens-major output, so the prompts whose
        masks are never built cost no copy).

        Splitting here lets a caller read the IoU predictions (iou_from_tokens) and
        build masks (masks_from_tokens) only for the prompts it keeps.
        """
        n = sparse_prompt_embeddings.shape[0]
        firsts = [self.obj_score_token.weight] if self.first else []
        output_tokens = torch.cat([*firsts, self.iou_token.weight, self.mask_tokens.weight], dim=0)
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
        tokens, keys = self.transformer(src, image_pe, tokens)
        return tokens, keys.transpose(1, 2).unflatten(2, src.shape[2:])

    def iou_from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """n x (1 + num_multimask_outputs) predicted IoUs from run_transformer's tokens."""
        return self.iou_prediction_head(tokens[:, self.first, :])

    def masks_from_tokens(self, tokens: torch.Tensor, features: torch.Tensor,
                          high_res_features: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """n x (1 + num_multimask_outputs) x 4h x 4w low-res mask logits from
        run_transformer's outputs (and, for SAM 2, the image's high-resolution maps)."""
        if self.use_high_res_features:
            if high_res_features is None:
                raise ValueError("this decoder (SAM 2) needs the image's high_res_features")
            up1, norm, act1, up2, act2 = self.output_upscaling
            s0, s1 = high_res_features
            upscaled = act2(up2(act1(norm(up1(features) + s1))) + s0)
        else:
            upscaled = self.output_upscaling(features)
        start = self.first + 1
        mask_tokens = tokens[:, start : start + self.num_mask_tokens, :]
        hyper_in = torch.stack([mlp(mask_tokens[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
                               dim=1)
        n, c, h, w = upscaled.shape
        return (hyper_in @ upscaled.view(n, c, h * w)).view(n, -1, h, w)

