"""SAM 2's image encoder: the Hiera trunk (a hierarchical ViT: windowed attention whose
queries are max-pooled at each stage change, halving resolution and doubling width) and
a feature-pyramid neck that projects every stage to the decoder's width.

Parameter names match the released SAM 2 / 2.1 checkpoints (``image_encoder.trunk.*``,
``image_encoder.neck.*``). Written from the Hiera and SAM 2 papers and checked against
the official package on random weights (tests/test_sam2_parity.py).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLP
from .image_encoder import PatchEmbed, window_partition, window_unpartition


def _pool(x: torch.Tensor, stride: Optional[Tuple[int, int]]) -> torch.Tensor:
    """Max-pools a BxHxWxC map by ``stride`` (None: unchanged)."""
    if stride is None:
        return x
    return F.max_pool2d(x.permute(0, 3, 1, 2), kernel_size=stride, stride=stride).permute(0, 2, 3, 1)


class MultiScaleAttention(nn.Module):
    """Attention over BxHxWxC tokens whose queries may be pooled (the output then has the
    pooled resolution) and whose width may grow from ``dim`` to ``dim_out``."""

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_stride: Optional[Tuple[int, int]] = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_stride = q_stride
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).unbind(2)
        if self.q_stride is not None:
            q = _pool(q.reshape(b, h, w, -1), self.q_stride)
            h, w = q.shape[1:3]
            q = q.reshape(b, h * w, self.num_heads, -1)
        x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(x.transpose(1, 2).reshape(b, h, w, -1))


class MultiScaleBlock(nn.Module):
    """Pre-norm transformer block: (windowed) multi-scale attention, then an MLP. At a
    stage change the shortcut is projected to the new width and pooled like the queries."""

    def __init__(self, dim: int, dim_out: int, num_heads: int, mlp_ratio: float = 4.0,
                 q_stride: Optional[Tuple[int, int]] = None, window_size: int = 0) -> None:
        super().__init__()
        self.dim, self.dim_out = dim, dim_out
        self.window_size = window_size
        self.q_stride = q_stride
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MultiScaleAttention(dim, dim_out, num_heads, q_stride)
        self.norm2 = nn.LayerNorm(dim_out, eps=1e-6)
        self.mlp = MLP(dim_out, int(dim_out * mlp_ratio), dim_out, num_layers=2, activation=nn.GELU)
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.dim != self.dim_out:
            shortcut = _pool(self.proj(x), self.q_stride)
        window = self.window_size
        h, w = x.shape[1:3]
        if window > 0:
            x, padded = window_partition(x, window)
        x = self.attn(x)
        if self.q_stride is not None:
            # Pooled queries shrank every window: unpartition at the pooled size.
            window = self.window_size // self.q_stride[0]
            h, w = shortcut.shape[1:3]
            padded = (h + (-h) % window, w + (-w) % window) if window > 0 else (h, w)
        if self.window_size > 0:
            x = window_unpartition(x, window, padded, (h, w))
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class Hiera(nn.Module):
    """The trunk: stride-4 patch embedding, ``stages`` blocks per stage, the first block
    of each later stage pooling by ``q_stride``. Returns the output of every stage,
    BxCxHxW, finest first (strides 4, 8, 16, 32)."""

    def __init__(
        self,
        embed_dim: int = 96,
        num_heads: int = 1,
        stages: Sequence[int] = (2, 3, 16, 3),
        global_att_blocks: Sequence[int] = (12, 16, 20),
        window_spec: Sequence[int] = (8, 4, 14, 7),
        window_pos_embed_bkg_spatial_size: Sequence[int] = (14, 14),
        q_pool: int = 3,
        q_stride: Tuple[int, int] = (2, 2),
        dim_mul: float = 2.0,
        head_mul: float = 2.0,
    ) -> None:
        super().__init__()
        if len(stages) != len(window_spec):
            raise ValueError(f"stages {tuple(stages)} and window_spec {tuple(window_spec)} differ in length")
        ends = [sum(stages[: i + 1]) - 1 for i in range(len(stages))]
        self.stage_ends = ends
        pooled = [end + 1 for end in ends[:-1]][:q_pool]
        self.patch_embed = PatchEmbed(patch_size=4, embed_dim=embed_dim, kernel_size=7, padding=3)
        # Windowed absolute position (Bolya et al. 2023): a background table resized to the
        # token grid plus one window's table tiled over it.
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *window_pos_embed_bkg_spatial_size))
        self.pos_embed_window = nn.Parameter(torch.zeros(1, embed_dim, window_spec[0], window_spec[0]))
        self.blocks = nn.ModuleList()
        stage = 0
        for i in range(sum(stages)):
            dim_out = embed_dim
            # The first block of a stage still uses the previous stage's window size.
            window = 0 if i in global_att_blocks else window_spec[stage]
            if i - 1 in ends:
                dim_out = int(embed_dim * dim_mul)
                num_heads = int(num_heads * head_mul)
                stage += 1
            self.blocks.append(MultiScaleBlock(embed_dim, dim_out, num_heads,
                                               q_stride=tuple(q_stride) if i in pooled else None,
                                               window_size=window))
            embed_dim = dim_out
        self.channel_list = [self.blocks[i].dim_out for i in ends[::-1]]  # coarsest first, as the neck takes them

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        pos = F.interpolate(self.pos_embed, size=(h, w), mode="bicubic")
        window = self.pos_embed_window
        pos = pos + window.tile([1, 1, h // window.shape[2], w // window.shape[3]])
        return pos.permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.patch_embed(x)
        x = x + self._pos_embed(*x.shape[1:3])
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.stage_ends:
                outputs.append(x.permute(0, 3, 1, 2))
        return outputs


class FpnNeck(nn.Module):
    """1x1 projections of every stage to ``d_model``, with a nearest-neighbour top-down
    path into the levels in ``top_down_levels`` (SAM 2: the two coarsest)."""

    def __init__(self, d_model: int, backbone_channel_list: Sequence[int], top_down_levels: Sequence[int] = (2, 3)
                 ) -> None:
        super().__init__()
        self.convs = nn.ModuleList()
        for dim in backbone_channel_list:  # coarsest first
            lateral = nn.Sequential()
            lateral.add_module("conv", nn.Conv2d(dim, d_model, kernel_size=1))
            self.convs.append(lateral)
        self.backbone_channel_list = list(backbone_channel_list)
        self.top_down_levels = tuple(top_down_levels)

    def forward(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        """Stage outputs, finest first -> projected maps, finest first."""
        last = len(xs) - 1
        out: List[torch.Tensor] = [None] * len(xs)  # type: ignore[list-item]
        previous = None
        for i in range(last, -1, -1):
            lateral = self.convs[last - i](xs[i])
            if i in self.top_down_levels and previous is not None:
                top_down = F.interpolate(previous.to(torch.float32), scale_factor=2.0, mode="nearest")
                previous = lateral + top_down
            else:
                previous = lateral
            out[i] = previous
        return out


class HieraImageEncoder(nn.Module):
    """Trunk + neck, dropping the ``scalp`` coarsest levels (SAM 2: 1). Returns the maps
    finest first: for a 1024-px input, 256x256, 128x128 and 64x64, all ``d_model`` wide;
    the last is the image embedding, the others feed the decoder's upscaling."""

    def __init__(self, trunk: Hiera, neck: FpnNeck, img_size: int = 1024, scalp: int = 1) -> None:
        super().__init__()
        if trunk.channel_list != neck.backbone_channel_list:
            raise ValueError(f"trunk widths {trunk.channel_list} differ from the neck's {neck.backbone_channel_list}")
        self.trunk = trunk
        self.neck = neck
        self.img_size = img_size
        self.scalp = scalp

    @property
    def blocks(self) -> nn.ModuleList:
        """The trunk's transformer blocks (where adapters and LoRA go)."""
        return self.trunk.blocks

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        features = self.neck(self.trunk(x))
        return features[: len(features) - self.scalp]
