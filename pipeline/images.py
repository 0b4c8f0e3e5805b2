"""Decoding input images into the RGB pixels the model sees and the JPEG bytes we store.

Masks always refer to the stored image, so every conversion (EXIF rotation, colour
mode, SA-1B resizing) happens here, once, before annotation. Every refusal raises
``ImageError`` with a reason a person can act on.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

EXIF_ORIENTATION = 0x0112


class ImageError(ValueError):
    """An input image that cannot be annotated; ``str(error)`` is the reason."""


@dataclass
class PreparedImage:
    """An image ready for annotation.

    rgb: (H, W, 3) uint8 pixels of the stored image.
    jpeg: the bytes to store; the original bytes when the input was a JPEG that needed
        no rotation, colour conversion or resizing, else a fresh encoding of ``rgb``.
    original_size: (width, height) of the input as decoded, before any rotation/resize.
    source_sha256: hex sha256 of the input's bytes (its content identity).
    orientation: the input's EXIF orientation (1-8; 1: none), applied to ``rgb``: with
        ``original_size`` it maps the input's pixel coordinates (e.g. a detector's boxes)
        into the stored image (``pipeline.box_files.stored_frame``).
    """

    rgb: np.ndarray
    jpeg: bytes
    original_size: tuple[int, int]
    source_sha256: str = ""
    orientation: int = 1

    @property
    def width(self) -> int:
        return self.rgb.shape[1]

    @property
    def height(self) -> int:
        return self.rgb.shape[0]


def prepare_image(
    data: bytes,
    *,
    short_side: int | None = 1500,
    max_pixels: int = 100_000_000,
    min_side: int = 16,
    jpeg_quality: int = 95,
) -> PreparedImage:
    """Decodes ``data``, converts it to RGB and resizes it like SA-1B.

    Images whose short side exceeds ``short_side`` are downscaled to it (None: never).
    Images over ``max_pixels`` pixels are refused before their pixels are decoded;
    images with a side under ``min_side`` are refused as too small to segment.
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    if max_pixels > (Image.MAX_IMAGE_PIXELS or 0):
        # PIL refuses images over 2 x MAX_IMAGE_PIXELS on its own; max_pixels must be the
        # limit that governs, so PIL's is raised to it (process-wide, never lowered).
        Image.MAX_IMAGE_PIXELS = max_pixels
    with warnings.catch_warnings():
        # Our own max_pixels governs; PIL's warning would only add noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise ImageError(f"refused as a decompression bomb: {e}") from None
        except UnidentifiedImageError:
            raise ImageError(
                f"not a readable image (unrecognised format, first bytes {data[:8]!r}); "
                "remove it or fix its contents"
            ) from None
        except Exception as e:  # a header cut short or damaged
            raise ImageError(f"corrupt or truncated image header: {e}") from None
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(
                f"{width}x{height} = {width * height} pixels exceeds stage.image.max_pixels="
                f"{max_pixels} (possible decompression bomb); raise the limit if it is genuine"
            )
        if min(width, height) < min_side:
            raise ImageError(
                f"{width}x{height} is too small: a side is under stage.image.min_side={min_side}"
            )
        fmt, mode = image.format, image.mode
        scale = 1.0 if not short_side else min(1.0, short_side / min(width, height))
        if scale < 1.0 and fmt == "JPEG":
            # Lets libjpeg decode at 1/2, 1/4 or 1/8 scale: large photos decode much faster.
            image.draft("RGB", (round(width * scale), round(height * scale)))
        try:
            image.load()
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad data
            raise ImageError(f"corrupt or truncated {fmt or 'image'} data: {e}") from None
        # Read after load(): for PNG, reading EXIF means reading (and checking) the data.
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)

    converted = _to_rgb(ImageOps.exif_transpose(image))
    if scale < 1.0:
        size = (round(width * scale), round(height * scale))
        if orientation in (5, 6, 7, 8):  # a quarter turn swaps the sides
            size = size[::-1]
        converted = converted.resize(size, Image.Resampling.LANCZOS)

    keep_bytes = (
        fmt == "JPEG" and orientation == 1 and scale == 1.0 and mode in ("RGB", "L")
    )
    if keep_bytes:
        stored = data
    else:
        buffer = io.BytesIO()
        converted.save(buffer, format="JPEG", quality=jpeg_quality)
        stored = buffer.getvalue()
    return PreparedImage(
        rgb=np.asarray(converted), jpeg=stored, original_size=(width, height),
        source_sha256=hashlib.sha256(data).hexdigest(), orientation=int(orientation),
    )


def _to_rgb(image: Image.Image) -> Image.Image:
    """Converts any PIL mode to 8-bit RGB.

    16-bit and float images are rescaled rather than clipped (PIL's convert clips 16-bit
    to 255, which turns most 16-bit photos white); transparency is composited on white
    because the colour under a transparent pixel is arbitrary.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # "I" is how PIL opens 16-bit PNG/TIFF greyscale, values 0..65535.
        pixels = np.asarray(image, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        low, high = np.nanmin(pixels), np.nanmax(pixels)
        pixels = (pixels - low) / (high - low or 1.0) * 255.0
        return Image.fromarray(np.nan_to_num(pixels).astype(np.uint8)).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
