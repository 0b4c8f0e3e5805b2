"""Stage ``detector``: trains the class-agnostic box detector of the semi-automatic
stage with Ray Train and registers it with its held-out box AP.

    python -m pipeline.run +stage=detector output=DIR [stage.data.datasets=DATASET] [stage.steps=N]

The model, data and AP are ``pipeline.models.detector``; training and registration are
``pipeline.training.detector`` (semi_auto calls the same).
"""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from pipeline.training.detector import train


def run(cfg: DictConfig) -> dict[str, Any]:
    """Returns ``pipeline.training.detector.train``'s summary (version, path, steps,
    complete, final_loss, seconds_per_step, eval)."""
    summary = train(cfg)
    ev = summary["eval"]
    print(f"detector {summary['version']} at {summary['path']}: {summary['steps']} steps, "
          f"box AP {ev['box_ap']:.3f}, AP50 {ev['box_ap50']:.3f}, AP75 {ev['box_ap75']:.3f}, "
          f"AR100 {ev['box_ar100']:.3f} on {ev['images']} held-out images", flush=True)
    return summary
