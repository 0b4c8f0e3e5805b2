"""The published SAM 1 encoder sizes and this project's small ones, and the SAM 2 / 2.1
Hiera sizes: each variant is a set of sizes of the same network (``build`` wires them;
``checkpoint`` names the size a file fits)."""
from __future__ import annotations

from typing import Dict

# Published sizes, plus the project's small model (trained on synthetic scenes; see
# docs and the retrain stage). Every size is expressed by the same parameters.
ENCODER_SIZES: Dict[str, dict] = {
    "vit_h": dict(encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16,
                  encoder_global_attn_indexes=(7, 15, 23, 31)),
    "vit_l": dict(encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16,
                  encoder_global_attn_indexes=(5, 11, 17, 23)),
    "vit_b": dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                  encoder_global_attn_indexes=(2, 5, 8, 11)),
    "vit_tiny": dict(
        encoder_embed_dim=192,
        encoder_depth=6,
        encoder_num_heads=3,
        encoder_global_attn_indexes=(2, 5),
        image_size=256,
        window_size=8,
        prompt_embed_dim=128,
        decoder_mlp_dim=512,
        iou_head_hidden_dim=128,
    ),
}
# The small model at twice the input size: its 128x128 low-res masks can draw objects a
# 256-px model's 64x64 cannot (models/README.md, "resolution ceiling"); 4x the compute.
ENCODER_SIZES["vit_tiny_512"] = {**ENCODER_SIZES["vit_tiny"], "image_size": 512}

# SAM 2 / 2.1 Hiera trunks (the four published sizes; 2.0 and 2.1 share them, their
# checkpoints differ only in video tensors). Window sizes default to (8, 4, 14, 7).
HIERA_SIZES: Dict[str, dict] = {
    "hiera_t": dict(embed_dim=96, num_heads=1, stages=(1, 2, 7, 2), global_att_blocks=(5, 7, 9),
                    window_pos_embed_bkg_spatial_size=(7, 7)),
    "hiera_s": dict(embed_dim=96, num_heads=1, stages=(1, 2, 11, 2), global_att_blocks=(7, 10, 13),
                    window_pos_embed_bkg_spatial_size=(7, 7)),
    "hiera_b+": dict(embed_dim=112, num_heads=2, stages=(2, 3, 16, 3), global_att_blocks=(12, 16, 20),
                     window_pos_embed_bkg_spatial_size=(14, 14)),
    "hiera_l": dict(embed_dim=144, num_heads=2, stages=(2, 6, 36, 4), global_att_blocks=(23, 33, 43),
                    window_pos_embed_bkg_spatial_size=(7, 7), window_spec=(8, 4, 16, 8)),
}
SAM2_VERSIONS = ("sam2", "sam2.1")
# Architecture names, as the official config files are named: sam2.1_hiera_t, sam2_hiera_l, ...
SAM2_ARCHS: Dict[str, tuple] = {f"{version}_{size}": (version, size)
                                for version in SAM2_VERSIONS for size in HIERA_SIZES}


def family(arch: str) -> str:
    """"sam" (SAM 1 ViTs) or "sam2" (SAM 2 / 2.1 Hiera): what a dataset records, so that
    a run is never resumed with the other family."""
    if arch in SAM2_ARCHS:
        return "sam2"
    if arch in ENCODER_SIZES or arch == "default":
        return "sam"
    raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(sorted([*ENCODER_SIZES, *SAM2_ARCHS]))}")
