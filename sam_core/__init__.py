"""Segment Anything (SAM 1 and SAM 2 / 2.1 image models): model, predictor and
automatic mask generator.

Drop-in for the official packages: ``from sam_core import sam_model_registry,
SamPredictor, SamAutomaticMaskGenerator`` (``sam_model_registry["sam2.1_hiera_l"]`` for
SAM 2.1; ``SAM2AutomaticMaskGenerator`` has SAM 2's defaults). Knows nothing of Ray,
Hydra or datasets.
"""
from .automatic_mask_generator import AMG_PRESETS, SAM2AutomaticMaskGenerator, SamAutomaticMaskGenerator
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
from .checkpoint import (
    CheckpointError,
    ChecksumError,
    checkpoint_sha256,
    load_checkpoint,
    official_state,
    read_state_dict,
)
from .modeling.sam2 import Sam2
from .predictor import SamPredictor
from .utils.inputs import as_rgb_uint8

__all__ = [
    "AMG_PRESETS",
    "CheckpointError",
    "ChecksumError",
    "ENCODER_SIZES",
    "SAM2AutomaticMaskGenerator",
    "Sam2",
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
    "official_state",
    "read_state_dict",
    "sam_model_registry",
]
