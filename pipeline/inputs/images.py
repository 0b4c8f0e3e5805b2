"""Decoding input images into the RGB pixels the model sees and the JPEG bytes we store.

Masks always refer to the stored image, so every conversion (EXIF rotation, colour
mode, SA-1B resizing, privacy blurring) happens here, once, before annotation. Every
refusal raises ``ImageError`` with a reason a person can act on.

What is stored carries no metadata by default (SA-1B's images carry none): a JPEG that
needs no conversion keeps its compressed data byte for byte but loses its EXIF (GPS
position, camera serial, thumbnail), XMP, IPTC, ICC and comment segments and anything
after its end marker; every other image is encoded afresh, which writes none of them.

Memory: the pixel and decoded-byte limits are checked from the header, before any pixel
is decoded, and conversions work in place or in row blocks with no full-size float copy,
so preparing an image peaks at about 10 bytes a pixel whatever its depth (was 14 to 24;
``benchmarks/prepare_memory.py``).
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from PIL import Image, UnidentifiedImageError

EXIF_ORIENTATION = 0x0112
# How PIL turns each EXIF orientation upright (the table of ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# 16-bit to 8-bit: value / 257, truncated (65535 -> 255), by table lookup in row blocks.
_SIXTEEN_TO_EIGHT = (np.arange(65536) // 257).astype(np.uint8)
_BLOCK_ROWS = 256


class ImageError(ValueError):
    """An input image that cannot be annotated; ``str(error)`` is the reason."""


@dataclass
class PreparedImage:
    """An image ready for annotation.

    rgb: (H, W, 3) uint8 pixels of the stored image.
    jpeg: the bytes to store; for a JPEG that needed no rotation, colour conversion,
        resizing or blurring, its own compressed data (without its metadata segments
        unless ``strip_metadata`` was off), else a fresh encoding of ``rgb``.
    original_size: (width, height) of the input as decoded, before any rotation/resize.
    source_sha256: hex sha256 of the input's bytes (its content identity).
    blurred_regions: faces and licence plates blurred by the privacy step; None when
        the step is off.
    orientation: the input's EXIF orientation (1-8; 1: none), applied to ``rgb``: with
        ``original_size`` it maps the input's pixel coordinates (e.g. a detector's boxes)
        into the stored image (``pipeline.inputs.box_files.stored_frame``).
    """

    rgb: np.ndarray
    jpeg: bytes
    original_size: tuple[int, int]
    source_sha256: str = ""
    blurred_regions: int | None = None
    orientation: int = 1

    @property
    def width(self) -> int:
        return self.rgb.shape[1]

    @property
    def height(self) -> int:
        return self.rgb.shape[0]

    def record_fields(self) -> dict[str, Any]:
        """Fields to add to the SA-1B record's ``image`` object for this image:
        ``{"blurred_regions": n}`` when the privacy step ran, else nothing (the record
        keeps SA-1B's schema exactly). The writer does ``record["image"].update(...)``."""
        return {} if self.blurred_regions is None else {"blurred_regions": self.blurred_regions}


# Keys of stage.image that govern reading, not prepare_image; their defaults apply when a
# config predates them.
READ_LIMITS = {"max_file_bytes": None, "read_timeout_s": None, "decode_timeout_s": None}


def split_image_cfg(image_cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``stage.image`` -> (read limits, keyword arguments of ``prepare_image``)."""
    limits = {key: image_cfg.get(key, default) for key, default in READ_LIMITS.items()}
    return limits, {k: v for k, v in image_cfg.items() if k not in READ_LIMITS}


def prepare_image(
    data: bytes,
    *,
    short_side: int | None = 1500,
    max_pixels: int = 100_000_000,
    max_decoded_bytes: int | None = 400_000_000,
    min_side: int = 16,
    jpeg_quality: int = 95,
    strip_metadata: bool = True,
    privacy: Mapping[str, Any] | None = None,
) -> PreparedImage:
    """Decodes ``data``, converts it to RGB and resizes it like SA-1B.

    Images whose short side exceeds ``short_side`` are downscaled to it (None: never).
    Images over ``max_pixels`` pixels, or whose decoded pixels would take more than
    ``max_decoded_bytes`` (width x height x bands x bytes per sample, e.g. 8 bytes a
    pixel for 16-bit RGBA), are refused before their pixels are decoded; images with a
    side under ``min_side`` are refused as too small to segment. ``privacy`` is the
    ``stage.privacy`` block: with ``blur`` true, faces and licence plates are blurred
    (``pipeline.inputs.privacy``) before anything is stored or annotated.
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    image = _open(data, max_pixels)
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            f"{width}x{height} = {width * height} pixels exceeds stage.image.max_pixels="
            f"{max_pixels} (possible decompression bomb); raise the limit if it is genuine"
        )
    decoded = decoded_bytes(image)
    if max_decoded_bytes is not None and decoded > max_decoded_bytes:
        raise ImageError(
            f"{width}x{height} {image.mode} at {8 * _bytes_per_sample(image)} bits a sample decodes to "
            f"{decoded} bytes, over stage.image.max_decoded_bytes={max_decoded_bytes}; raise the "
            "limit if it is genuine"
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image.load()
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad data
            raise ImageError(f"corrupt or truncated {fmt or 'image'} data: {e}") from None
    # Read after load(): for PNG, reading EXIF means reading (and checking) the data.
    orientation = image.getexif().get(EXIF_ORIENTATION, 1)

    converted = _to_rgb(image)
    del image  # the decoded pixels: free them before the next copy is made
    if orientation in _UPRIGHT:
        converted = converted.transpose(_UPRIGHT[orientation])
    if scale < 1.0:
        size = (round(width * scale), round(height * scale))
        if orientation in (5, 6, 7, 8):  # a quarter turn swaps the sides
            size = size[::-1]
        converted = converted.resize(size, Image.Resampling.LANCZOS)
    rgb = np.array(converted)  # writable: the privacy step blurs it in place

    blurred = None
    if privacy and privacy.get("blur"):
        from pipeline.inputs.privacy import blur_faces_and_plates  # OpenCV only when asked for

        blurred = blur_faces_and_plates(rgb, **{k: v for k, v in privacy.items() if k != "blur"})
        if blurred:
            converted = Image.fromarray(rgb)

    stored = None
    if fmt == "JPEG" and orientation == 1 and scale == 1.0 and mode in ("RGB", "L") and not blurred:
        stored = strip_jpeg_metadata(data) if strip_metadata else data
    if stored is None:
        converted.info = {}  # PIL would copy a comment or XMP packet from here into the file
        buffer = io.BytesIO()
        converted.save(buffer, format="JPEG", quality=jpeg_quality)
        stored = buffer.getvalue()
    return PreparedImage(
        rgb=rgb, jpeg=stored, original_size=(width, height),
        source_sha256=hashlib.sha256(data).hexdigest(), blurred_regions=blurred, orientation=int(orientation),
    )


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Reads the header only (no pixel is decoded here)."""
    if max_pixels > (Image.MAX_IMAGE_PIXELS or 0):
        # PIL refuses images over 2 x MAX_IMAGE_PIXELS on its own; max_pixels must be the
        # limit that governs, so PIL's is raised to it (process-wide, never lowered).
        Image.MAX_IMAGE_PIXELS = max_pixels
    with warnings.catch_warnings():
        # Our own max_pixels governs; PIL's warning would only add noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise ImageError(
                f"refused as a decompression bomb: {e} (stage.image.max_pixels={max_pixels}; raise it "
                "if the image is genuine)"
            ) from None
        except UnidentifiedImageError:
            raise ImageError(
                f"not a readable image (unrecognised format, first bytes {data[:8]!r}); "
                "remove it or fix its contents"
            ) from None
        except Exception as e:  # a header cut short or damaged
            raise ImageError(f"corrupt or truncated image header: {e}") from None


def decoded_bytes(image: Image.Image) -> int:
    """Bytes of the decoded pixels of an opened (not yet loaded) image, from its header:
    width x height x bands x bytes per sample (2 for 16-bit data, 4 for 32-bit)."""
    width, height = image.size
    return width * height * len(image.getbands()) * _bytes_per_sample(image)


def _bytes_per_sample(image: Image.Image) -> int:
    if image.mode in ("I", "F"):
        return 4
    if image.mode.startswith("I;16") or any("16" in str(tile.args) for tile in image.tile):
        return 2  # PIL keeps 16-bit RGB(A) as 8 bits, but its decoder reads all 16
    return 1


def _to_rgb(image: Image.Image) -> Image.Image:
    """Converts any PIL mode to 8-bit RGB.

    16-bit and float images are rescaled rather than clipped (PIL's convert clips 16-bit
    to 255, which turns most 16-bit photos white); transparency is composited on white
    because the colour under a transparent pixel is arbitrary. No step holds more than
    one extra full-size copy, so a large image cannot multiply its memory.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # "I" is how PIL opens 32-bit and some 16-bit greyscale, values 0..65535.
        return _rescale_blocks(image).convert("RGB")
    if mode == "F":
        pixels = np.array(image, dtype=np.float32)
        pixels[~np.isfinite(pixels)] = np.nan
        low, high = (float(np.nanmin(pixels)), float(np.nanmax(pixels))) if np.isfinite(pixels).any() else (0.0, 1.0)
        pixels -= low
        pixels *= 255.0 / (high - low or 1.0)
        np.nan_to_num(pixels, copy=False)
        return Image.fromarray(pixels.astype(np.uint8)).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        if mode != "RGBA":
            image = image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def _rescale_blocks(image: Image.Image) -> Image.Image:
    """16/32-bit greyscale -> 8-bit "L", a block of rows at a time (no full-size temporaries)."""
    width, height = image.size
    out = np.empty((height, width), np.uint8)
    for top in range(0, height, _BLOCK_ROWS):
        block = np.asarray(image.crop((0, top, width, min(top + _BLOCK_ROWS, height))))
        if block.dtype.itemsize > 2:  # mode "I": int32, may hold values outside 0..65535
            block = np.clip(block, 0, 65535).astype(np.uint16)
        out[top : top + len(block)] = _SIXTEEN_TO_EIGHT[block]
    return Image.fromarray(out)


# --- JPEG metadata ---------------------------------------------------------------------
_SOI, _EOI, _SOS = 0xD8, 0xD9, 0xDA
_APP0, _APP14, _COM = 0xE0, 0xEE, 0xFE


def strip_jpeg_metadata(data: bytes) -> bytes | None:
    """``data`` without metadata, losslessly: the compressed image is copied unchanged.

    Removed: APP1..APP15 (EXIF with GPS, serial numbers and thumbnail; XMP; ICC; IPTC;
    maker data), COM comments, a JFXX thumbnail and anything after the end marker
    (e.g. an appended video). Kept: the JFIF header and Adobe's APP14, which tells
    decoders how the colours are transformed. Returns None for a stream it cannot
    follow, so the caller re-encodes the pixels instead.
    """
    if data[:2] != b"\xff\xd8":
        return None
    out = [data[:2]]
    i, n = 2, len(data)
    while i < n:
        if data[i] != 0xFF:
            return None
        while i < n and data[i] == 0xFF:  # fill bytes may precede a marker
            i += 1
        if i >= n:
            return None
        marker = data[i]
        i += 1
        if marker == _EOI:
            out.append(b"\xff\xd9")
            return b"".join(out)
        if 0xD0 <= marker <= 0xD7 or marker in (0x01, _SOI):  # markers without a length
            out.append(bytes((0xFF, marker)))
            continue
        if i + 2 > n:
            return None
        length = int.from_bytes(data[i : i + 2], "big")
        segment = data[i : i + length]
        if length < 2 or len(segment) < length:
            return None
        i += length
        if _keep_segment(marker, segment):
            out.append(bytes((0xFF, marker)) + segment)
        if marker == _SOS:  # entropy-coded data follows, up to the next real marker
            end = _scan_end(data, i)
            if end is None:
                return None
            out.append(data[i:end])
            i = end
    return None  # no end marker: a truncated stream that PIL tolerated; re-encode it


def _keep_segment(marker: int, segment: bytes) -> bool:
    if marker == _APP0:
        return segment[2:7] == b"JFIF\0"
    if marker == _APP14:
        return segment[2:7] == b"Adobe"
    return not (0xE1 <= marker <= 0xEF or marker == _COM)


def _scan_end(data: bytes, start: int) -> int | None:
    """Offset of the first marker after the scan data starting at ``start``."""
    j = start
    while True:
        j = data.find(b"\xff", j)
        if j < 0 or j + 1 >= len(data):
            return None
        following = data[j + 1]
        if following == 0x00 or 0xD0 <= following <= 0xD7:  # stuffed byte, restart marker
            j += 2
        elif following == 0xFF:  # fill byte
            j += 1
        else:
            return j
