"""Segment Anything: model, predictor and automatic mask generator.

Drop-in for the official package: ``from sam_core import sam_model_registry,
SamPredictor, SamAutomaticMaskGenerator``. Knows nothing of Ray, Hydra or datasets.
"""
from .automatic_mask_generator import AMG_PRESETS, SamAutomaticMaskGenerator
from .build import (
    ENCODER_SIZES,
    build_sam,
    build_sam_vit_b,
    build_sam_vit_h,
    build_sam_vit_l,
    build_sam_vit_tiny,
    build_sam_vit_tiny_512,
    sam_model_registry,
)
from .checkpoint import CheckpointError, ChecksumError, checkpoint_sha256, load_checkpoint, read_state_dict
from .predictor import SamPredictor
from .utils.inputs import as_rgb_uint8

__all__ = [
    "AMG_PRESETS",
    "CheckpointError",
    "ChecksumError",
    "ENCODER_SIZES",
    "SamAutomaticMaskGenerator",
    "SamPredictor",
    "as_rgb_uint8",
    "build_sam",
    "build_sam_vit_b",
    "build_sam_vit_h",
    "build_sam_vit_l",
    "build_sam_vit_tiny",
    "build_sam_vit_tiny_512",
    "checkpoint_sha256",
    "load_checkpoint",
    "read_state_dict",
    "sam_model_registry",
]
