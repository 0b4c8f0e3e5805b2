"""The published SAM encoder sizes, and this project's small ones: each variant is a set
of sizes of the same network (``build`` wires them; ``checkpoint`` names the size a
file fits)."""
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
