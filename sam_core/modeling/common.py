"""Small building blocks shared by the encoder and the decoder."""
from __future__ import annotations

from typing import Type

import torch
from torch import nn


class MLPBlock(nn.Module):
    """Two linear layers with an activation between them (transformer feed-forward)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: Type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a BxCxHxW tensor (ConvNeXt style)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalising in channels-last order lets layer_norm use its fused kernel.
        x = torch.nn.functional.layer_norm(
            x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps
        )
        return x.permute(0, 3, 1, 2)
