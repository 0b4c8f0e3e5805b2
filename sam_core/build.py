"""Model builders: one per variant, each only choosing sizes; _build_sam wires the
parts; weights are loaded last, strictly and safely."""
from __future__ import annotations

from functools import partial
from typing import Callable, Dict, Optional, Sequence

import torch

from .checkpoint import load_checkpoint
from .modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from .sizes import ENCODER_SIZES


def _build_sam(
    encoder_embed_dim: int,
    encoder_depth: int,
    encoder_num_heads: int,
    encoder_global_attn_indexes: Sequence[int],
    image_size: int = 1024,
    window_size: int = 14,
    prompt_embed_dim: int = 256,
    decoder_mlp_dim: int = 2048,
    iou_head_hidden_dim: int = 256,
    vit_patch_size: int = 16,
    checkpoint: Optional[str] = None,
    arch: str = "sam",
    expected_sha256: Optional[str] = None,
) -> Sam:
    embedding_size = image_size // vit_patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=encoder_depth,
            embed_dim=encoder_embed_dim,
            img_size=image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=encoder_num_heads,
            patch_size=vit_patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(encoder_global_attn_indexes),
            window_size=window_size,
            out_chans=prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_embed_dim,
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_embed_dim, mlp_dim=decoder_mlp_dim,
                                          num_heads=8),
            transformer_dim=prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=iou_head_hidden_dim,
        ),
    )
    sam.eval()
    if checkpoint is not None:
        load_checkpoint(sam, checkpoint, arch=arch, expected_sha256=expected_sha256)
    return sam


def _builder(arch: str) -> Callable[..., Sam]:
    def build(checkpoint: Optional[str] = None, expected_sha256: Optional[str] = None) -> Sam:
        return _build_sam(**ENCODER_SIZES[arch], checkpoint=checkpoint, arch=arch, expected_sha256=expected_sha256)

    build.__name__ = f"build_sam_{arch}"
    build.__doc__ = f"SAM with the {arch} image encoder; weights from ``checkpoint`` if given."
    return build


build_sam_vit_h = _builder("vit_h")
build_sam_vit_l = _builder("vit_l")
build_sam_vit_b = _builder("vit_b")
build_sam_vit_tiny = _builder("vit_tiny")
build_sam_vit_tiny_512 = _builder("vit_tiny_512")
build_sam = build_sam_vit_h  # official alias

sam_model_registry: Dict[str, Callable[..., Sam]] = {
    "default": build_sam_vit_h,  # as in the official package
    "vit_h": build_sam_vit_h,
    "vit_l": build_sam_vit_l,
    "vit_b": build_sam_vit_b,
    "vit_tiny": build_sam_vit_tiny,
    "vit_tiny_512": build_sam_vit_tiny_512,
}
