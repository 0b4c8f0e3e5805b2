"""Builds the automatic mask generator from ``cfg.model`` and ``cfg.amg``.

``cfg.model``: arch (a key of ``sam_model_registry``), checkpoint (local path, or null for
random weights, only useful for benchmarks), device ("auto", "cpu", "cuda", "cuda:1").
``cfg.amg``: the keyword arguments of ``SamAutomaticMaskGenerator``; the pipeline always
asks for compressed COCO RLE, the format SA-1B stores.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import sam_core
import torch
from omegaconf import DictConfig, OmegaConf

RANDOM_WEIGHTS = "random-init"


def model_identity(checkpoint: str | None) -> str:
    """The model identity recorded in the manifest: the checkpoint file's sha256."""
    if checkpoint is None:
        return RANDOM_WEIGHTS
    require_checkpoint(checkpoint)
    return sam_core.checkpoint_sha256(checkpoint)


def require_checkpoint(checkpoint: str) -> None:
    """Fails early, and clearly, when the configured checkpoint is missing."""
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(
            f"model checkpoint {checkpoint} does not exist. Train or download it, or pass "
            "model.checkpoint=<path> (model.checkpoint=null runs random weights, for benchmarks)"
        )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def build_generator(model_cfg: Mapping[str, Any] | DictConfig, amg_cfg: Mapping[str, Any] | DictConfig):
    """Returns a ``sam_core.SamAutomaticMaskGenerator`` on the configured device."""
    model_cfg = _plain(model_cfg)
    arch = model_cfg["arch"]
    if arch not in sam_core.sam_model_registry:
        raise ValueError(f"unknown model.arch {arch!r}; known: {', '.join(sorted(sam_core.sam_model_registry))}")
    checkpoint = model_cfg.get("checkpoint")
    if checkpoint is not None:
        require_checkpoint(checkpoint)
    sam = sam_core.sam_model_registry[arch](checkpoint=checkpoint)
    sam.to(resolve_device(model_cfg.get("device", "auto")))
    return sam_core.SamAutomaticMaskGenerator(sam, **{**_plain(amg_cfg), "output_mode": "coco_rle"})


def _plain(cfg: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)
