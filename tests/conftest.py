"""Shared fixtures: a local Ray cluster, a random-weights model, Hydra configs, image corpora."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"


# --- Ray -----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def ray_local():
    """One in-process Ray cluster (2 CPUs) for the session; stages reuse it."""
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        job_config=ray.job_config.JobConfig(code_search_path=[str(REPO)]),
    )
    yield ray
    ray.shutdown()


# --- object store --------------------------------------------------------------------
@pytest.fixture(scope="session")
def s3_env():
    """A moto S3 server on loopback; the endpoint and fake credentials go into the
    environment, which subprocesses and Ray workers inherit (botocore reads them)."""
    import logging
    import os

    from moto.server import ThreadedMotoServer

    from jobs.local_cluster import free_port

    port = free_port()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


# --- model ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A state dict of a randomly initialised vit_tiny, as a checkpoint file."""
    import torch

    from sam_core import sam_model_registry

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "sam_vit_tiny_random.pth"
    torch.save(sam_model_registry["vit_tiny"]().state_dict(), path)
    return path


# --- Hydra ---------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _hydra_uninitialised():
    """Importing the official sam2 package (a test oracle) initialises Hydra globally for
    its own configs, after which composing the pipeline's configs is refused: every test
    starts with Hydra uninitialised."""
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    yield


@pytest.fixture
def compose_config() -> Callable[..., "DictConfig"]:  # noqa: F821
    """compose_config("+stage=fully_auto", "input=...", ...) -> the app's resolved config."""
    from hydra import compose, initialize_config_dir

    import pipeline.config  # noqa: F401  registers the ${project_root:} resolver

    def compose_with(*overrides: str):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))

    return compose_with


# --- images --------------------------------------------------------------------------
def scene(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A small RGB picture with a few flat shapes on a gradient: something to segment."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), np.full_like(x, 96)], -1)
    for _ in range(3):
        x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
        x1, y1 = x0 + rng.integers(width // 8, width // 2), y0 + rng.integers(height // 8, height // 2)
        image[y0:y1, x0:x1] = rng.integers(0, 255, 3)
    return image.astype(np.uint8)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def png_header_only(width: int, height: int, bit_depth: int = 8, colour_type: int = 0) -> bytes:
    """A PNG that declares width x height pixels but carries one compressed row.

    Enough to look like a decompression bomb: its header promises far more pixels than
    any decoder should allocate, at the cost of a few bytes. The default is 8-bit
    greyscale; ``bit_depth=16, colour_type=6`` declares 16-bit RGBA (8 bytes a pixel).
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1)))
            + chunk(b"IEND", b""))


def good_corpus() -> dict[str, bytes]:
    """Images that must be annotated, each exercising one conversion, by file name."""
    rgb = Image.fromarray(scene(64, 48, 1))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise
    alpha = Image.fromarray(scene(40, 40, 2)).convert("RGBA")
    alpha.putalpha(Image.fromarray(np.tile(np.arange(40, dtype=np.uint8) * 6, (40, 1))))
    sixteen = Image.fromarray((np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16))
    return {
        "plain.jpg": encode(rgb, "JPEG", quality=90),
        "rotated.jpg": encode(rgb, "JPEG", exif=exif),
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"),
        "grey16.png": encode(sixteen, "PNG"),
        "palette.png": encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "alpha.png": encode(alpha, "PNG"),
        "photo.webp": encode(rgb, "WEBP"),
        "photo.bmp": encode(rgb, "BMP"),
        "photo.tif": encode(rgb, "TIFF"),
        "large.jpg": encode(Image.fromarray(scene(200, 150, 3)), "JPEG"),
    }


def bad_corpus() -> dict[str, tuple[bytes, str]]:
    """Files that must be refused, by file name, with a substring of the expected reason."""
    jpeg = encode(Image.fromarray(scene(64, 48, 4)), "JPEG")
    png = bytearray(encode(Image.fromarray(scene(64, 48, 5)), "PNG"))
    png[60:80] = b"\xff" * 20  # damages the compressed data and its checksum
    return {
        "empty.jpg": (b"", "empty file"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "corrupt.png": (bytes(png), "corrupt"),
        "notes.jpg": (b"this is a text file, not a photo\n" * 4, "not a readable image"),
        "bomb.png": (png_header_only(30000, 30000), "decompression bomb"),
        "sliver.png": (encode(Image.fromarray(scene(3, 40, 6)), "PNG"), "too small"),
    }


@pytest.fixture
def image_folder(tmp_path) -> Callable[..., Path]:
    """Writes the good (and optionally bad) corpus into a folder tree and returns it.

    Two sub-folders hold a file of the same name, and a broken link stands for an
    unreadable path.
    """

    def make(with_bad: bool = True, root: Path | None = None) -> Path:
        root = root or tmp_path / "images"
        (root / "a").mkdir(parents=True)
        (root / "b" / "deeper").mkdir(parents=True)
        for name, data in good_corpus().items():
            (root / "a" / name).write_bytes(data)
        (root / "b" / "deeper" / "plain.jpg").write_bytes(good_corpus()["plain.jpg"])
        (root / "b" / "readme.txt").write_text("not an input: wrong extension")
        if with_bad:
            for name, (data, _) in bad_corpus().items():
                (root / "b" / name).write_bytes(data)
            (root / "b" / "gone.jpg").symlink_to(root / "nowhere.jpg")
        return root

    return make


# --- privacy and unusual inputs (tests/test_images.py, tests/test_bad_inputs.py) ---------
SERIAL = "SERIAL-4711-0815"  # the camera serial planted in private_jpeg()


def private_jpeg(orientation: int = 1, seed: int = 9) -> bytes:
    """A JPEG a phone would write: EXIF with a GPS position and the camera's serial
    number, an ICC profile and a comment naming the serial, and bytes after the end
    marker (as motion photos append a video)."""
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "Canon", "Canon EOS 5D"
    if orientation != 1:
        exif[0x0112] = orientation
    exif.get_ifd(0x8769)[0xA431] = SERIAL  # BodySerialNumber
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2], gps[3], gps[4] = "N", (48.0, 51.0, 29.5), "E", (2.0, 17.0, 40.2)
    data = encode(
        Image.fromarray(scene(64, 48, seed)), "JPEG", quality=90, exif=exif,
        icc_profile=f"not a real profile; device {SERIAL}".encode(), comment=f"owner {SERIAL}".encode(),
    )
    return data + f"appended video of {SERIAL}".encode()


def face_photo() -> bytes:
    """A portrait with one frontal face: matplotlib's sample photo of Grace Hopper
    (public domain; installed with matplotlib, no download)."""
    import matplotlib.cbook

    return Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).read_bytes()


def plate_photo() -> bytes:
    """A grey street-like picture with one licence plate: black characters in a white
    box with a black border, as the plate detector was trained on."""
    import cv2

    image = np.full((360, 480, 3), 110, np.uint8)
    x, y, w, h = 140, 160, 200, 44
    cv2.rectangle(image, (x, y), (x + w, y + h), (255, 255, 255), -1)
    cv2.rectangle(image, (x, y), (x + w, y + h), (0, 0, 0), 2)
    text = "A123BC77"
    width = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 1, 2)[0][0]
    cv2.putText(image, text, (x + 6, y + int(h * 0.8)), cv2.FONT_HERSHEY_SIMPLEX, (w - 12) / width, (0, 0, 0), 2)
    return encode(Image.fromarray(image), "PNG")


def sixteen_bit_png(width: int, height: int, bands: int, seed: int = 0, noise: bool = True) -> bytes:
    """A 16-bit PNG with 1, 3 or 4 bands (PIL cannot write 16-bit colour; OpenCV can);
    ``noise`` fills the low bytes (real 16-bit data), else the file compresses well."""
    import cv2

    rng = np.random.default_rng(seed)
    pixels = scene(width, height, seed).astype(np.uint16) * 257
    if noise:
        pixels += rng.integers(0, 256, (height, width, 3), dtype=np.uint16)
    if bands == 1:
        pixels = pixels[..., 0]
    elif bands == 4:
        alpha = np.full((height, width, 1), 65535, np.uint16)
        pixels = np.concatenate([pixels, alpha], -1)
    ok, data = cv2.imencode(".png", pixels)
    assert ok
    return data.tobytes()


def animated(fmt: str) -> bytes:
    """A three-frame animated PNG, WebP or GIF; the first frame is what gets annotated."""
    frames = [Image.fromarray(scene(64, 48, seed)) for seed in (11, 12, 13)]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def multipage_tiff() -> bytes:
    pages = [Image.fromarray(scene(64, 48, seed)) for seed in (14, 15)]
    return encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
