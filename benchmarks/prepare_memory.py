"""Peak memory of preparing one large image, by kind, against its decoded size.

    python benchmarks/prepare_memory.py                 # 24 Mpx (6000 x 4000) images
    python benchmarks/prepare_memory.py --size 4000x3000

Each case runs ``prepare_image`` in a fresh process that has read the file's bytes;
reported: the header's decoded size (what ``stage.image.max_decoded_bytes`` bounds) and
the process's peak resident memory above what it held before the call, in MB and in
bytes per pixel. A worker holds about prefetch + 2 images at once, so its memory for
images is about that many times the worst figure here.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent

# VmHWM (the process's peak resident memory; getrusage's ru_maxrss would start at the
# parent's, which forked it) before and after the call, on Linux.
CHILD = """
import sys
sys.path.insert(0, sys.argv[2])
from pipeline.inputs.images import prepare_image
def peak():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
data = open(sys.argv[1], "rb").read()
before = peak()
prepare_image(data, short_side=None)
print(peak() - before)
"""


def cases(width: int, height: int) -> dict[str, tuple[np.ndarray, str, int]]:
    """name -> (pixels as OpenCV writes them, extension, decoded bytes)."""
    rng = np.random.default_rng(0)
    grey = np.add.outer(np.arange(height, dtype=np.uint32), np.arange(width, dtype=np.uint32))
    grey16 = (grey * 65535 // grey.max()).astype(np.uint16) ^ rng.integers(0, 64, grey.shape, dtype=np.uint16)
    rgb8 = np.stack([(grey16 >> 8).astype(np.uint8)] * 3, -1)
    rgba16 = np.concatenate([np.stack([grey16] * 3, -1), np.full((height, width, 1), 40000, np.uint16)], -1)
    rgba8 = np.concatenate([rgb8, np.full((height, width, 1), 160, np.uint8)], -1)
    px = width * height
    return {
        "8-bit RGB JPEG": (rgb8, ".jpg", 3 * px),
        "8-bit RGBA PNG": (rgba8, ".png", 4 * px),
        "16-bit grey PNG": (grey16, ".png", 2 * px),
        "16-bit RGBA PNG": (rgba16, ".png", 8 * px),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="6000x4000", help="WIDTHxHEIGHT")
    parser.add_argument("--code", default=str(REPO), help="checkout whose pipeline.inputs.images to measure")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    print(f"prepare_image peak memory, {width}x{height} ({width * height / 1e6:.0f} Mpx), code: {args.code}")
    print(f"{'image':18s} {'decoded MB':>10s} {'peak MB':>8s} {'bytes/px':>9s}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (pixels, ext, decoded) in cases(width, height).items():
            path = Path(tmp) / f"image{ext}"
            ok, data = cv2.imencode(ext, pixels, [cv2.IMWRITE_PNG_COMPRESSION, 1] if ext == ".png" else [])
            assert ok
            path.write_bytes(data.tobytes())
            del data
            out = subprocess.run([sys.executable, "-c", CHILD, str(path), args.code], capture_output=True, text=True)
            if out.returncode:
                print(f"{name:18s} failed: {out.stderr.strip().splitlines()[-1]}")
                continue
            peak = int(out.stdout.strip())
            print(f"{name:18s} {decoded / 1e6:10.0f} {peak / 1e6:8.0f} {peak / (width * height):9.1f}")


if __name__ == "__main__":
    main()
