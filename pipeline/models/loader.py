"""Builds the SAM model from ``cfg.model``, checked against the identity the run recorded.

``cfg.model``: arch (a key of ``sam_model_registry``), checkpoint (a local path or an
fsspec URL, or null for random weights, only useful for benchmarks), device ("auto",
"cpu", "cuda", "cuda:1").
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from typing import Any, Iterator, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

import sam_core
from pipeline import storage
from pipeline.paths import is_url

RANDOM_WEIGHTS = "random-init"


def model_identity(checkpoint: str | None) -> str:
    """The model identity recorded in the manifest: the checkpoint file's sha256."""
    if checkpoint is None:
        return RANDOM_WEIGHTS
    require_checkpoint(checkpoint)
    if not is_url(checkpoint):
        return sam_core.checkpoint_sha256(checkpoint)
    digest = hashlib.sha256()
    fs, path = storage.filesystem(checkpoint)
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def require_checkpoint(checkpoint: str) -> None:
    """Fails early, and clearly, when the configured checkpoint is missing."""
    fs, path = storage.filesystem(checkpoint)
    if not fs.isfile(path):
        raise FileNotFoundError(
            f"model checkpoint {checkpoint} does not exist. Train or download it, or pass "
            "model.checkpoint=<path> (model.checkpoint=null runs random weights, for benchmarks)"
        )


@contextlib.contextmanager
def local_checkpoint(checkpoint: str | None) -> Iterator[str | None]:
    """A local path to ``checkpoint``: itself, or a temporary copy of a URL's object
    (removed on exit); ``sam_core`` loads local files only."""
    if checkpoint is None or not is_url(checkpoint):
        yield checkpoint
        return
    require_checkpoint(checkpoint)
    fs, path = storage.filesystem(checkpoint)
    with tempfile.TemporaryDirectory(prefix="checkpoint_") as tmp:
        local = os.path.join(tmp, os.path.basename(path) or "model.pth")
        fs.get_file(path, local)
        yield local


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_sam(model_cfg: Mapping[str, Any] | DictConfig, expected_sha256: str | None = None,
             resize: bool = False) -> "sam_core.modeling.Sam":
    """The configured SAM on its device.

    ``expected_sha256``: the identity the driver recorded (``model_identity``); the bytes
    loaded are checked against it (``sam_core.ChecksumError`` if the file changed since).
    ``resize``: the checkpoint may come from the same architecture at another input size
    (position tables are resampled, ``sam_core.checkpoint.resize_positions``), e.g. to
    fine-tune a 256-px model at 512 px.
    """
    model_cfg = plain(model_cfg)
    arch = model_cfg["arch"]
    if arch not in sam_core.sam_model_registry:
        raise ValueError(f"unknown model.arch {arch!r}; known: {', '.join(sorted(sam_core.sam_model_registry))}")
    checkpoint = model_cfg.get("checkpoint")
    if checkpoint is not None:
        require_checkpoint(checkpoint)
    elif expected_sha256 not in (None, RANDOM_WEIGHTS):
        raise ValueError(f"model.checkpoint is null but the run recorded model {expected_sha256}")
    sha = None if expected_sha256 == RANDOM_WEIGHTS else expected_sha256
    with local_checkpoint(checkpoint) as path:
        if resize and path is not None:
            from sam_core.checkpoint import load_checkpoint

            sam = load_checkpoint(sam_core.sam_model_registry[arch](), path, arch=arch, resize=True,
                                  expected_sha256=sha)
        else:
            sam = sam_core.sam_model_registry[arch](checkpoint=path, expected_sha256=sha)
    return sam.to(resolve_device(model_cfg.get("device", "auto")))


# Keys of cfg.amg that are the pipeline's, not the generator's: the mask verifier that
# filters the generator's output (pipeline.models.verifier, used by pipeline.masks.sources).
PIPELINE_AMG_KEYS = ("verifier", "verifier_precision")


def generator_kwargs(amg_cfg: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    """``cfg.amg`` as SamAutomaticMaskGenerator keyword arguments, asking for compressed
    COCO RLE (what SA-1B stores)."""
    return {**{k: v for k, v in plain(amg_cfg).items() if k not in PIPELINE_AMG_KEYS}, "output_mode": "coco_rle"}


def build_generator(
    model_cfg: Mapping[str, Any] | DictConfig,
    amg_cfg: Mapping[str, Any] | DictConfig,
    expected_sha256: str | None = None,
) -> sam_core.SamAutomaticMaskGenerator:
    """The automatic mask generator of ``cfg.amg`` (``generator_kwargs``)."""
    sam = load_sam(model_cfg, expected_sha256)
    return sam_core.SamAutomaticMaskGenerator(sam, **generator_kwargs(amg_cfg))


def plain(cfg: Mapping[str, Any] | DictConfig | None) -> dict[str, Any]:
    """A plain dict of a config node (resolved), or of a mapping."""
    if cfg is None:
        return {}
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)
