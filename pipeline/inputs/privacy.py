"""Blurring of faces and licence plates before an image is stored, as SA-1B did.

Optional (``stage.privacy.blur=true``). The detectors are the Haar cascades that
opencv-python ships in ``cv2.data.haarcascades`` (nothing is downloaded): frontal faces
(``haarcascade_frontalface_default.xml``) and plates
(``haarcascade_russian_plate_number.xml``). They are classical detectors: they miss
profiles, small or occluded faces and many plate styles, and sometimes blur something
else; a dataset that must be anonymised for real needs a stronger detector behind the
same function. The number of regions blurred is recorded per image.

OpenCV 5 dropped ``CascadeClassifier`` and the cascade files; the project depends on
opencv-python-headless < 5 for them, and ``check_available`` says so if they are missing.
"""
from __future__ import annotations

import functools
import threading

import cv2
import numpy as np

CASCADES = {
    "faces": "haarcascade_frontalface_default.xml",
    "plates": "haarcascade_russian_plate_number.xml",
}
# Plates are wide: the plate cascade's window is 60x20, the face cascade's 24x24.
_ASPECT = {"faces": (1, 1), "plates": (3, 1)}
# A margin around each detection, as a fraction of its size: cascades box a face tightly
# (brow to chin), leaving hair line and ears readable otherwise.
_MARGIN = 0.15


class PrivacyUnavailable(RuntimeError):
    """The detectors cannot be loaded here; a problem of the installation, not of an image."""


def check_available() -> None:
    """Raises ``PrivacyUnavailable`` with what to install when the detectors are missing."""
    for kind in CASCADES:
        _detector(kind)


def blur_faces_and_plates(
    rgb: np.ndarray,
    *,
    faces: bool = True,
    plates: bool = True,
    min_neighbors: int = 5,
    min_size: int = 24,
    scale_factor: float = 1.1,
) -> int:
    """Blurs, in place, every face and licence plate found in ``rgb`` ((H, W, 3) uint8);
    returns how many regions were blurred.

    ``min_neighbors``: overlapping detections a region needs to count (higher finds
    fewer faces and fewer false ones); ``min_size``: the smallest region, in pixels of
    its short side; ``scale_factor``: the step between the detector's window sizes.
    """
    grey = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    regions: list[tuple[int, int, int, int]] = []
    for kind, wanted in (("faces", faces), ("plates", plates)):
        if not wanted:
            continue
        classifier, lock = _detector(kind)
        across, down = _ASPECT[kind]
        smallest = (min_size * across // down, min_size)
        with lock:  # a CascadeClassifier is not safe to share between threads
            found = classifier.detectMultiScale(
                grey, scaleFactor=scale_factor, minNeighbors=min_neighbors, minSize=smallest
            )
        regions.extend(tuple(int(v) for v in box) for box in found)
    for box in regions:
        _blur(rgb, *box)
    return len(regions)


def _blur(rgb: np.ndarray, x: int, y: int, w: int, h: int) -> None:
    """Replaces a region (plus a margin) by a blur strong enough that no feature survives."""
    dx, dy = int(w * _MARGIN), int(h * _MARGIN)
    x0, y0 = max(x - dx, 0), max(y - dy, 0)
    x1, y1 = min(x + w + dx, rgb.shape[1]), min(y + h + dy, rgb.shape[0])
    region = rgb[y0:y1, x0:x1]
    # Down to a few blocks and back: no detail finer than a sixth of the region remains;
    # the Gaussian then hides the block edges.
    side = max(min(x1 - x0, y1 - y0) // 6, 1)
    small = cv2.resize(region, (max((x1 - x0) // side, 1), max((y1 - y0) // side, 1)), interpolation=cv2.INTER_AREA)
    coarse = cv2.resize(small, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    region[...] = cv2.GaussianBlur(coarse, (0, 0), sigmaX=side / 2)


@functools.cache
def _detector(kind: str) -> tuple["cv2.CascadeClassifier", threading.Lock]:
    """The cascade for ``kind``, loaded once per process, with the lock that guards it."""
    classifier_type = getattr(cv2, "CascadeClassifier", None)
    directory = getattr(getattr(cv2, "data", None), "haarcascades", None)
    if classifier_type is None or directory is None:
        raise PrivacyUnavailable(
            f"stage.privacy.blur needs OpenCV's Haar cascades, which OpenCV {cv2.__version__} does not "
            "ship (OpenCV 5 dropped them): pip install 'opencv-python-headless>=4.8,<5'"
        )
    path = f"{directory.rstrip('/')}/{CASCADES[kind]}"
    classifier = classifier_type(path)
    if classifier.empty():
        raise PrivacyUnavailable(f"stage.privacy.blur: cannot load the {kind} detector {path}")
    return classifier, threading.Lock()
