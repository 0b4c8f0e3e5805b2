"""Safe, strict loading of SAM state dicts (the official released format)."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
from pathlib import Path
from typing import Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .sizes import ENCODER_SIZES

OFFICIAL_CHECKPOINTS = {
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded into the requested model."""


class ChecksumError(CheckpointError):
    """A checkpoint whose bytes are not the ones expected (its sha256 differs)."""


def read_state_dict(path: Union[str, os.PathLike], expected_sha256: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Reads a state dict with ``weights_only=True``: a pickle that would construct
    arbitrary objects (and so could run code) is refused, never executed.

    ``expected_sha256``: the bytes are read once, hashed and loaded from memory, so the
    weights loaded are exactly the file that was checked (a file replaced under the same
    path between a driver's check and a worker's load raises ``ChecksumError``).
    """
    path = Path(path)
    if not path.is_file():
        published = "\n".join(f"  {name}: {url}" for name, url in OFFICIAL_CHECKPOINTS.items())
        raise FileNotFoundError(
            f"checkpoint not found: {path}\nThe official SAM checkpoints are published at:\n{published}"
        )
    source: Union[Path, io.BytesIO] = path
    if expected_sha256 is not None:
        data = path.read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256:
            raise ChecksumError(
                f"{path}: sha256 is {actual}, expected {expected_sha256}: the checkpoint was replaced "
                "after the run recorded it; the dataset would mix two models"
            )
        source = io.BytesIO(data)
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused to load; its pickle contains objects other than tensors "
            f"(weights_only=True), which could execute code: {err}"
        ) from err
    except Exception as err:  # truncated zip, not a torch file, ...
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    # A diverged training run saves NaN weights that load without complaint, then score
    # every mask NaN: every threshold comparison is False, so a run "succeeds" with no mask.
    non_finite = sorted(k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if non_finite:
        shown = ", ".join(non_finite[:8]) + (f", ... ({len(non_finite)} in all)" if len(non_finite) > 8 else "")
        raise CheckpointError(
            f"{path}: refused to load; tensors hold NaN or infinite values (a diverged training "
            f"run?): {shown}"
        )
    return state


def describe_architecture(state: Dict[str, torch.Tensor]) -> str:
    """A short guess of the encoder a state dict belongs to, for error messages."""
    pos = state.get("image_encoder.pos_embed")
    if pos is None:
        return "no SAM image encoder (image_encoder.pos_embed is absent)"
    depth = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
    embed_dim, grid = pos.shape[-1], pos.shape[1]
    same = [name for name, sizes in ENCODER_SIZES.items()
            if sizes["encoder_embed_dim"] == embed_dim and sizes["encoder_depth"] == depth]
    exact = [name for name in same if ENCODER_SIZES[name].get("image_size", 1024) // 16 == grid]
    if exact or same:
        return f"{(exact or same)[0]} (embed_dim {embed_dim}, depth {depth}, {grid}x{grid} patches)"
    return f"an unregistered size (embed_dim {embed_dim}, depth {depth}, {grid}x{grid} patches)"


def resize_positions(state: Dict[str, torch.Tensor], model: nn.Module) -> list[str]:
    """Fits, in place, the input-size-dependent tensors of ``state`` to ``model``.

    The same architecture at another input size differs only in the absolute position
    embedding (one vector per patch: resampled bicubically over the patch grid) and the
    relative-position tables of global-attention blocks (one row per patch distance:
    resampled linearly), which is how SAM and ViTDet move a ViT to a new resolution.
    Returns the keys it changed; every other tensor is left for the strict load to check.
    """
    expected = model.state_dict()
    changed = []
    for key, value in state.items():
        want = expected.get(key)
        if want is None or want.shape == value.shape:
            continue
        if key.endswith("image_encoder.pos_embed") and value.ndim == 4:  # 1 x H x W x C
            grid = F.interpolate(value.permute(0, 3, 1, 2).float(), size=tuple(want.shape[1:3]),
                                 mode="bicubic", align_corners=False)
            state[key] = grid.permute(0, 2, 3, 1).to(value.dtype)
        elif (key.endswith((".attn.rel_pos_h", ".attn.rel_pos_w")) and value.ndim == 2
              and value.shape[1] == want.shape[1]):
            rows = F.interpolate(value.T[None].float(), size=want.shape[0], mode="linear", align_corners=False)
            state[key] = rows[0].T.to(value.dtype)
        else:
            continue
        changed.append(key)
    return changed


def load_checkpoint(
    model: nn.Module,
    path: Union[str, os.PathLike],
    arch: str = "the model",
    resize: bool = False,
    expected_sha256: Optional[str] = None,
) -> nn.Module:
    """Loads ``path`` into ``model`` strictly: missing keys, unexpected keys and shape
    mismatches raise CheckpointError naming them and the architecture the file fits.

    ``resize`` first fits a file of the same architecture at another input size
    (``resize_positions``), e.g. to fine-tune a 256-px model at 512 px.
    ``expected_sha256``: see ``read_state_dict``.
    """
    state = read_state_dict(path, expected_sha256)
    if resize:
        resize_positions(state, model)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or mismatched:
        parts = [f"{path} does not fit {arch}"]
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches", mismatched)):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
                parts.append(f"{label}: {shown}")
        parts.append(f"the file looks like {describe_architecture(state)}")
        raise CheckpointError("; ".join(parts))
    model.load_state_dict(state, strict=True)
    return model


def checkpoint_sha256(path: Union[str, os.PathLike]) -> str:
    """Hex sha256 of a file: the identity of a model in dataset manifests."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
