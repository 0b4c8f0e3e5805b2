"""Two-way transformer: prompt tokens and image tokens attend to each other."""
from __future__ import annotations

from typing import Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import MLPBlock

# Where one side of a cross-attention has this many times the other's tokens, inference
# folds the small side into the projections (Attention._few_keys / _few_queries).
_FOLD_MIN_RATIO = 8


class TwoWayTransformer(nn.Module):
    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: Type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim=embedding_dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                activation=activation,
                attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image_embedding: Tensor, image_pe: Tensor, point_embedding: Tensor) -> Tuple[Tensor, Tensor]:
        """point_embedding: BxNxC; image_embedding: BxCxhxw, or 1xCxhxw shared by all B
        prompts; image_pe: 1xCxhxw. Returns (queries BxNxC, keys Bx(h*w)xC).

        A shared image is projected once in the first layer and only becomes per-prompt
        after the first image->token attention (broadcasting, never copying it B times).
        """
        # Tokens-major in memory: the channel-major views were added to per-prompt tensors
        # 4.5x slower than contiguous ones (a strided walk over 4096x256 floats).
        keys = image_embedding.flatten(2).transpose(1, 2).contiguous()
        key_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        attn = self.final_attn_token_to_image(q=queries + point_embedding, k=keys + key_pe, v=keys)
        queries = self.norm_final_attn(queries + attn)
        return queries, keys


class TwoWayAttentionBlock(nn.Module):
    """Self-attention of tokens, tokens->image cross-attention, token MLP,
    image->tokens cross-attention; each followed by a residual and LayerNorm."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: Type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> Tuple[Tensor, Tensor]:
        if self.skip_first_layer_pe:
            # The first layer replaces the tokens (which already are their own PE).
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)

        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q=q, k=k, v=keys))
        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(q=k, k=q, v=queries))
        return queries, keys


class Attention(nn.Module):
    """Multi-head attention whose projections may shrink the width by downsample_rate."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the internal width {self.internal_dim}")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q: BqxNxC, k and v: BkxMxC, where a batch of 1 broadcasts against the other.

        Inference takes a folded form where one side is a handful of prompt tokens and the
        other the image's thousands (see ``_few_keys``); training and ONNX export keep this
        reference form, the checkpoint's definition.
        """
        if not torch.is_grad_enabled() and not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export():
            few, many = min(q.shape[1], k.shape[1]), max(q.shape[1], k.shape[1])
            if many >= _FOLD_MIN_RATIO * few:
                if q.shape[1] == many:
                    return self._few_keys(q, k, v)
                if k.shape[0] > 1:  # a shared image is projected once by the reference form: cheaper
                    return self._few_queries(q, k, v)
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        b = max(q.shape[0], k.shape[0])
        out = F.scaled_dot_product_attention(q.expand(b, -1, -1, -1), k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1))
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.internal_dim))

    def _split(self, linear: nn.Linear) -> Tuple[Tensor, Tensor]:
        """A projection's weight as heads x head-width x C and its bias as heads x head-width."""
        h = self.num_heads
        return linear.weight.view(h, -1, linear.weight.shape[1]), linear.bias.view(h, -1)

    def _few_keys(self, x: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Image tokens x (BqxNxC) attending to a few prompt tokens k, v (BkxMxC).

        The reference form projects every image token to queries, attends with heads of 8
        or 16 channels over M ~ 7 keys (SDPA's slowest shape on a CPU) and projects back.
        Folding the small side into the projections gives the same result with two plain
        matrix products per prompt: scores = x @ (Wq_h^T k_h) + bq_h.k_h, and
        out = softmax(scores) @ (v_h Wo_h^T) + bo, one column per (head, key).
        """
        h, m = self.num_heads, k.shape[1]
        wq, bq = self._split(self.q_proj)
        scale = (self.internal_dim // h) ** -0.5
        kh = self._heads(self.k_proj(k)) * scale  # Bk x h x M x d
        a = torch.einsum("hdc,bhmd->bchm", wq, kh).flatten(2)  # Bk x C x hM
        c = torch.einsum("hd,bhmd->bhm", bq, kh).flatten(1)  # Bk x hM
        if x.shape[0] == 1 and a.shape[0] > 1:  # one image for all prompts: one product for all
            n, b = x.shape[1], a.shape[0]
            scores = (x[0] @ a.permute(1, 0, 2).reshape(x.shape[2], -1)).view(n, b, -1).transpose(0, 1) + c[:, None]
        else:
            scores = torch.matmul(x, a).add_(c[:, None])  # batches of 1 broadcast
        # Softmax over each head's M keys, written out in place: torch's softmax over a
        # last dimension of 7 is ~6x slower than these passes on a CPU.
        s = scores.view(*scores.shape[:2], h, m)
        p = s.sub_(s.amax(-1, keepdim=True)).exp_()
        p = p.div_(p.sum(-1, keepdim=True)).flatten(2)  # B x N x hM
        # out_proj's bias rides on the product: each row of p sums to h (1 per head).
        wo = self.out_proj.weight.view(self.embedding_dim, h, -1)  # C x h x d
        vo = torch.einsum("bhmd,chd->bhmc", self._heads(self.v_proj(v)), wo).flatten(1, 2) + self.out_proj.bias / h
        return torch.matmul(p, vo)  # B x N x C

    def _few_queries(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """A few prompt tokens q (BxnxC) attending to per-prompt image tokens k, v (BxNxC).

        Folded the other way: each (head, query) row is taken back to C channels, so the
        image tokens are never projected: scores = (q_h Wk_h) @ k^T (the key bias adds the
        same to every score of a row, which softmax ignores), out_h = (P_h @ v) Wv_h^T + bv_h
        (P's rows sum to 1).
        """
        h, n = self.num_heads, q.shape[1]
        wk, _ = self._split(self.k_proj)
        wv, bv = self._split(self.v_proj)
        scale = (self.internal_dim // h) ** -0.5
        qf = torch.einsum("bhnd,hdc->bhnc", self._heads(self.q_proj(q)) * scale, wk).flatten(1, 2)  # B x hn x C
        p = torch.matmul(qf, k.transpose(1, 2)).softmax(-1)  # B x hn x N
        pv = torch.matmul(p, v).view(-1, h, n, v.shape[2])  # B x h x n x C
        out = torch.einsum("bhnc,hdc->bnhd", pv, wv) + bv  # B x n x h x d
        return self.out_proj(out.flatten(2))
