"""Training of SAM models: losses, interactive prompt simulation, train step.

Knows nothing of Ray, Hydra or dataset formats; ``pipeline.training`` drives it.
"""
from .batch import Batch, collate, prepare_sample, select_masks
from .losses import MaskLosses, binary_mask_iou, dice_loss, multimask_losses, sigmoid_focal_loss
from .prompts import noisy_boxes, round_schedule, sample_error_points, sample_points_in_masks
from .step import InteractiveConfig, InteractiveSam, encoder_input, train_step
from .tune import ENCODER_MODES, TUNE_MODES, TunedSpec, apply_tuned, encoder_frozen, load_tuned, prepare, tuned_state

__all__ = [
    "Batch", "collate", "prepare_sample", "select_masks",
    "MaskLosses", "binary_mask_iou", "dice_loss", "multimask_losses", "sigmoid_focal_loss",
    "noisy_boxes", "round_schedule", "sample_error_points", "sample_points_in_masks",
    "InteractiveConfig", "InteractiveSam", "encoder_input", "train_step",
    "ENCODER_MODES", "TUNE_MODES", "TunedSpec", "apply_tuned", "encoder_frozen", "load_tuned", "prepare",
    "tuned_state",
]
