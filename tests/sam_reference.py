"""The official ``segment_anything`` package as an oracle: its classes wired with the
sizes of any sam_core architecture, and pairs of (official model, sam_core model) with
identical random weights, for the parity tests. ``python -m sam_core.tools.bench`` imports
it only when it compares with the official generator."""
from __future__ import annotations

from functools import partial
from typing import Dict, Optional

import numpy as np
import torch
from pycocotools import mask as mask_utils

from sam_core.build import ENCODER_SIZES, _build_sam


def official_sam(arch: str, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> torch.nn.Module:
    """The official segment_anything classes wired with the sizes of ``arch``; loads
    ``state_dict`` strictly when given. In eval mode."""
    from segment_anything import modeling as ref

    s = {"image_size": 1024, "window_size": 14, "prompt_embed_dim": 256, "decoder_mlp_dim": 2048,
         "iou_head_hidden_dim": 256, **ENCODER_SIZES[arch]}
    grid, dim = s["image_size"] // 16, s["prompt_embed_dim"]
    sam = ref.Sam(
        image_encoder=ref.ImageEncoderViT(
            depth=s["encoder_depth"], embed_dim=s["encoder_embed_dim"], img_size=s["image_size"], mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=s["encoder_num_heads"], patch_size=16,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=tuple(s["encoder_global_attn_indexes"]),
            window_size=s["window_size"], out_chans=dim,
        ),
        prompt_encoder=ref.PromptEncoder(
            embed_dim=dim, image_embedding_size=(grid, grid), input_image_size=(s["image_size"],) * 2, mask_in_chans=16
        ),
        mask_decoder=ref.MaskDecoder(
            num_multimask_outputs=3,
            transformer=ref.TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=s["decoder_mlp_dim"], num_heads=8),
            transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=s["iou_head_hidden_dim"],
        ),
    )
    if state_dict is not None:
        sam.load_state_dict(state_dict, strict=True)
    return sam.eval()


def reference_sam(arch: str):
    """The official classes wired with the sizes of ``arch`` (random init)."""
    return official_sam(arch)


def randomise_(model: torch.nn.Module, seed: int) -> None:
    """Gives zero-initialised parameters (positional embeddings, relative positions,
    biases) random values so that parity tests exercise them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def model_pair(arch: str = "vit_tiny", seed: int = 0):
    """(official model, sam_core model) with the same random weights, in eval mode."""
    torch.manual_seed(seed)
    ref = reference_sam(arch)
    randomise_(ref, seed)
    ours = _build_sam(**ENCODER_SIZES[arch])
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours.eval()


def rle_of(record):
    """A generator record's mask as a pycocotools RLE, whatever its output_mode."""
    seg = record["segmentation"]
    if isinstance(seg, np.ndarray):
        return mask_utils.encode(np.asfortranarray(seg.astype(np.uint8)))
    return mask_utils.frPyObjects(seg, *seg["size"]) if isinstance(seg["counts"], list) else seg


def match_records(ref_records, our_records):
    """Greedy one-to-one matching by mask IoU (pycocotools); returns (ref, ours, iou)."""
    if not ref_records or not our_records:
        return []
    ious = mask_utils.iou([rle_of(r) for r in ref_records], [rle_of(r) for r in our_records],
                          [0] * len(our_records))
    ious = np.asarray(ious).reshape(len(ref_records), len(our_records))
    pairs = []
    for i in range(len(ref_records)):
        j = int(np.argmax(ious[i]))
        pairs.append((ref_records[i], our_records[j], float(ious[i, j])))
        ious[:, j] = -1.0
    return pairs


def scene_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A uint8 RGB image of flat-coloured rectangles and discs over a gradient: enough
    structure for the random-weight model to produce varied masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), np.full_like(xx, 90)], -1)
    img = img.astype(np.uint8)
    for _ in range(8):
        color = rng.integers(0, 256, 3)
        cx, cy = rng.integers(0, width), rng.integers(0, height)
        r = rng.integers(max(2, min(height, width) // 12), max(3, min(height, width) // 4))
        if rng.random() < 0.5:
            img[max(cy - r, 0): cy + r, max(cx - r, 0): cx + r] = color
        else:
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = color
    return img


# --- SAM 2 / 2.1: the official ``sam2`` package (pip install sam2 with SAM2_BUILD_CUDA=0)


def official_sam2(arch: str = "sam2.1_hiera_t", image_size: int = 256, seed: int = 0) -> torch.nn.Module:
    """The official SAM 2 model of ``arch`` at ``image_size`` (a smaller size keeps CPU
    tests fast; both sides use it), random weights (zero-initialised ones randomised),
    in eval mode on the CPU, with the official inference options (``build_sam2``'s)."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from sam2.build_sam import build_sam2

    version = arch.split("_", 1)[0]
    torch.manual_seed(seed)
    # Importing sam2 initialises Hydra globally for its own configs, which the pipeline's
    # Hydra (tests' compose_config) then refuses: build within its own initialisation,
    # leaving Hydra uninitialised afterwards.
    GlobalHydra.instance().clear()
    with initialize_config_module("sam2", version_base="1.2"):
        model = build_sam2(f"configs/{version}/{arch}.yaml", None, device="cpu",
                           hydra_overrides_extra=[f"++model.image_size={image_size}"])
    GlobalHydra.instance().clear()
    randomise_(model, seed)
    return model.eval()


def shape_for_thresholds_(model: torch.nn.Module, iou_shift: float = 1.4, logit_scale: float = 300.0) -> None:
    """Random weights predict IoU ~0.5 and logits near 0, so SAM 2's default thresholds
    (predicted IoU 0.8, stability 0.95 at offset 1) would keep nothing: shift the IoU
    head's last bias and scale the hypernetworks' last layers so that the scores straddle
    those thresholds and the filters decide for many masks."""
    decoder = model.sam_mask_decoder
    with torch.no_grad():
        decoder.iou_prediction_head.layers[-1].bias += iou_shift
        for mlp in decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight *= logit_scale


def official_feature_sizes(image_size: int) -> list:
    """SAM2ImagePredictor hard-codes the 1024-px feature sizes; these are another size's."""
    return [(image_size // 4,) * 2, (image_size // 8,) * 2, (image_size // 16,) * 2]


def save_official_sam2(model: torch.nn.Module, path) -> str:
    """``model``'s weights in the released file format."""
    torch.save({"model": model.state_dict()}, path)
    return str(path)
