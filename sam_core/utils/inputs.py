"""Validation and conversion of user images to the HxWx3 uint8 RGB the model expects."""
from __future__ import annotations

import numpy as np


def as_rgb_uint8(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Returns ``image`` as a C-contiguous HxWx3 uint8 array.

    Converted: grayscale (HxW or HxWx1, replicated to 3 channels), RGBA (alpha dropped),
    16-bit (scaled by 1/257 so 65535 -> 255), non-contiguous views (copied).
    Refused with ValueError: float and bool arrays (their value range is ambiguous),
    other channel counts, empty images, anything that is not a numpy array.
    """
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{name} must be a numpy array (HxWx3 uint8 RGB); got {type(image).__name__}")
    desc = f"{name} with shape {image.shape} and dtype {image.dtype}"
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise ValueError(f"{desc}: expected HxW (grayscale) or HxWxC with C in 1, 3, 4")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{desc}: the image is empty")
    if image.dtype == np.uint16:
        image = ((image.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif image.dtype != np.uint8:
        hint = " (scale to 0..255 and cast with .astype(np.uint8))" if image.dtype.kind == "f" else ""
        raise ValueError(f"{desc}: expected uint8 (or uint16) pixel values{hint}")
    channels = image.shape[2]
    if channels == 1:
        image = np.repeat(image, 3, axis=2)
    elif channels == 4:
        image = image[:, :, :3]
    elif channels != 3:
        raise ValueError(f"{desc}: expected 1, 3 or 4 channels")
    return np.ascontiguousarray(image)
