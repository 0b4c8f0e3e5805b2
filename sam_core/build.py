"""Model builders: one per variant, each only choosing sizes; _build_sam (SAM 1) and
_build_sam2 (SAM 2 / 2.1) wire the parts; weights are loaded last, strictly and safely."""
from __future__ import annotations

from functools import partial
from typing import Callable, Dict, Optional, Sequence, Union

import torch

from .checkpoint import load_checkpoint
from .modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from .modeling.hiera import FpnNeck, Hiera, HieraImageEncoder
from .modeling.sam2 import Sam2
from .sizes import ENCODER_SIZES, HIERA_SIZES, SAM2_ARCHS


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


def _build_sam2(
    trunk: dict,
    image_size: int = 1024,
    checkpoint: Optional[str] = None,
    arch: str = "sam2.1",
    expected_sha256: Optional[str] = None,
) -> Sam2:
    """SAM 2 / 2.1 for images with the Hiera sizes ``trunk``; the heads are the same for
    every size. ``image_size`` other than 1024 is for tests (both sides at one size)."""
    hiera = Hiera(**trunk)
    width = 256
    grid = image_size // 16
    model = Sam2(
        image_encoder=HieraImageEncoder(hiera, FpnNeck(width, hiera.channel_list, top_down_levels=(2, 3)),
                                        img_size=image_size, scalp=1),
        prompt_encoder=PromptEncoder(embed_dim=width, image_embedding_size=(grid, grid),
                                     input_image_size=(image_size, image_size), mask_in_chans=16,
                                     boxes_as_points=True),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=width, mlp_dim=2048, num_heads=8),
            transformer_dim=width,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
            use_high_res_features=True,
            iou_prediction_use_sigmoid=True,
            pred_obj_scores=True,
            pred_obj_scores_mlp=True,
            # What the official builder switches on for inference (build_sam2's
            # apply_postprocessing): an unstable single mask falls back to the best of three.
            dynamic_multimask_via_stability=True,
            dynamic_multimask_stability_delta=0.05,
            dynamic_multimask_stability_thresh=0.98,
        ),
    )
    model.eval()
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, arch=arch, expected_sha256=expected_sha256)
    return model


def _sam2_builder(arch: str) -> Callable[..., Sam2]:
    version, size = SAM2_ARCHS[arch]

    def build(checkpoint: Optional[str] = None, expected_sha256: Optional[str] = None,
              image_size: int = 1024) -> Sam2:
        return _build_sam2(HIERA_SIZES[size], image_size=image_size, checkpoint=checkpoint, arch=arch,
                           expected_sha256=expected_sha256)

    build.__name__ = f"build_{arch.replace('.', '_').replace('+', '_plus')}"
    build.__doc__ = (f"{'SAM 2.1' if version == 'sam2.1' else 'SAM 2'} with the {size} image encoder "
                     f"(official checkpoint {arch}.pt); weights from ``checkpoint``.")
    return build


build_sam_vit_h = _builder("vit_h")
build_sam_vit_l = _builder("vit_l")
build_sam_vit_b = _builder("vit_b")
build_sam_vit_tiny = _builder("vit_tiny")
build_sam_vit_tiny_512 = _builder("vit_tiny_512")
build_sam = build_sam_vit_h  # official alias

sam_model_registry: Dict[str, Callable[..., Union[Sam, Sam2]]] = {
    "default": build_sam_vit_h,  # as in the official package
    "vit_h": build_sam_vit_h,
    "vit_l": build_sam_vit_l,
    "vit_b": build_sam_vit_b,
    "vit_tiny": build_sam_vit_tiny,
    "vit_tiny_512": build_sam_vit_tiny_512,
}
# SAM 2 / 2.1, by the official config names: sam2.1_hiera_t, sam2.1_hiera_s,
# sam2.1_hiera_b+, sam2.1_hiera_l and the same with sam2_.
sam_model_registry.update({arch: _sam2_builder(arch) for arch in SAM2_ARCHS})
