"""Safe, strict loading of SAM state dicts in the official released formats: SAM 1's
flat state dict, SAM 2's ``{"model": state dict}`` with its video tensors."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .sizes import ENCODER_SIZES, HIERA_SIZES, SAM2_ARCHS

_SAM2_RELEASES = {"sam2": "072824", "sam2.1": "092824"}  # release folders of the download site
_HIERA_FILE_NAMES = {"hiera_t": "hiera_tiny", "hiera_s": "hiera_small", "hiera_b+": "hiera_base_plus",
                     "hiera_l": "hiera_large"}
OFFICIAL_CHECKPOINTS = {
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
    **{arch: f"https://dl.fbaipublicfiles.com/segment_anything_2/{_SAM2_RELEASES[version]}/"
             f"{version}_{_HIERA_FILE_NAMES[size]}.pt"
       for arch, (version, size) in SAM2_ARCHS.items()},
}

# SAM 2's checkpoint names for the parts shared with SAM 1, and the tensors only its
# video model uses (kept aside by ``load_checkpoint``, written back by ``official_state``).
SAM2_RENAMES = (("sam_prompt_encoder.", "prompt_encoder."), ("sam_mask_decoder.", "mask_decoder."))
SAM2_VIDEO_PREFIXES = ("memory_attention.", "memory_encoder.", "mask_downsample.", "obj_ptr_proj.",
                       "obj_ptr_tpos_proj.", "maskmem_tpos_enc", "no_mem_pos_enc", "no_obj_ptr",
                       "no_obj_embed_spatial")
SAM2_VIDEO_TENSORS = {"sam2": 157, "sam2.1": 160}  # the same for every Hiera size
_MLP_OFFICIAL = re.compile(r"(mask_decoder\.transformer\.layers\.\d+\.mlp\.)layers\.([01])\.")
_MLP_OURS = re.compile(r"(mask_decoder\.transformer\.layers\.\d+\.mlp\.)lin([12])\.")


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
    if isinstance(state, dict) and set(state) == {"model"} and isinstance(state["model"], dict):
        state = state["model"]  # SAM 2's released format
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
    trunk = state.get("image_encoder.trunk.pos_embed")
    if trunk is not None:
        width = trunk.shape[1]
        depth = len({k.split(".")[3] for k in state if k.startswith("image_encoder.trunk.blocks.")})
        version = "sam2.1" if "no_obj_embed_spatial" in state else "sam2"
        sizes = [name for name, sizes in HIERA_SIZES.items()
                 if sizes["embed_dim"] == width and sum(sizes["stages"]) == depth]
        if sizes:
            return f"{version}_{sizes[0]}"
        return f"a SAM 2 Hiera of an unregistered size (width {width}, depth {depth})"
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
    as_read = state  # what error messages describe
    video: Dict[str, torch.Tensor] = {}
    if getattr(model, "family", "sam") == "sam2":
        state, video = split_sam2_state(state, arch, path)
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
        parts.append(f"the file looks like {describe_architecture(as_read)}")
        raise CheckpointError("; ".join(parts))
    model.load_state_dict(state, strict=True)
    if video:
        model.video_state = video
    return model


def split_sam2_state(state: Dict[str, torch.Tensor], arch: Optional[str], path: Union[str, os.PathLike] = "checkpoint"
                     ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """An official SAM 2 state dict -> (this project's names for the image model, the video
    tensors by their official names). The video part must be whole and of the version
    ``arch`` names (any version for None), or absent (a file saved without it, by another
    tool, or from random weights)."""
    image: Dict[str, torch.Tensor] = {}
    video: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(SAM2_VIDEO_PREFIXES):
            video[key] = value
            continue
        for official, ours in SAM2_RENAMES:
            if key.startswith(official):
                key = ours + key[len(official):]
        image[_MLP_OFFICIAL.sub(lambda m: f"{m.group(1)}lin{int(m.group(2)) + 1}.", key)] = value
    if video:
        version = "sam2.1" if "no_obj_embed_spatial" in video else "sam2"
        named = None if arch is None else SAM2_ARCHS.get(arch, ("sam2.1" if arch.startswith("sam2.1") else "sam2",))
        wanted = version if named is None else named[0]
        if version != wanted:
            size = arch.split("_", 1)[1] if "_" in arch else "hiera_t"
            raise CheckpointError(
                f"{path} is a {version.replace('sam2', 'SAM 2')} checkpoint, not {wanted.replace('sam2', 'SAM 2')}: "
                f"use model={version}_{size} (the image models are the same; the video tensors differ)")
        if len(video) != SAM2_VIDEO_TENSORS[version]:
            raise CheckpointError(
                f"{path}: {len(video)} video tensors where a {version} checkpoint has "
                f"{SAM2_VIDEO_TENSORS[version]}: the file is incomplete or not an official one")
    return image, video


def load_official_state(model: nn.Module, state: Dict[str, object]) -> nn.Module:
    """Loads what ``official_state`` returned (e.g. a training checkpoint) back into
    ``model``, strictly; a SAM 2 model takes the video tensors with it."""
    if getattr(model, "family", "sam") != "sam2":
        model.load_state_dict(state, strict=True)
        return model
    inner = state["model"] if set(state) == {"model"} else state
    image, video = split_sam2_state(inner, None)  # type: ignore[arg-type]
    model.load_state_dict(image, strict=True)
    model.video_state = video
    return model


def official_state(model: nn.Module) -> Dict[str, object]:
    """``model``'s weights on the CPU in its family's released format, which the official
    package loads: SAM 1's flat state dict, or SAM 2's ``{"model": ...}`` with the video
    tensors the model was loaded with."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if getattr(model, "family", "sam") != "sam2":
        return state
    official: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = _MLP_OURS.sub(lambda m: f"{m.group(1)}layers.{int(m.group(2)) - 1}.", key)
        for theirs, ours in SAM2_RENAMES:
            if key.startswith(ours):
                key = theirs + key[len(ours):]
        official[key] = value
    official.update({k: v.detach().cpu() for k, v in getattr(model, "video_state", {}).items()})
    return {"model": official}


def checkpoint_sha256(path: Union[str, os.PathLike]) -> str:
    """Hex sha256 of a file: the identity of a model in dataset manifests."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
