"""Target domains the default model has not seen, drawn procedurally with exact masks:
where SAM is known to be weak (microscopy, camouflage), so that adapting a model to a
domain can be measured against exact truth. ``make_domain_scene(domain, seed, size)``;
``shapes`` is the training domain of the shipped model (``pipeline.truth.synthetic``).

- ``microscopy``: a field of many small cells, touching in clusters (each cell the part
  of a cluster nearest its centre, so neighbours share boundaries), a little brighter
  than an unevenly lit background (low contrast), with blur and shot noise, grey.
- ``camouflage``: objects whose texture is the background's own (the same noise field
  at another phase), told apart only by a slight shift of brightness and colour.

Same seed, same scene; train and test seeds as ``scene_seeds`` gives them.
"""
from __future__ import annotations

import cv2
import numpy as np

from pipeline.truth.synthetic import Scene, make_scene

DOMAINS = ("shapes", "microscopy", "camouflage")


def make_domain_scene(domain: str, seed: int, size: tuple[int, int] = (512, 512)) -> Scene:
    """The scene of ``seed`` in ``domain`` at ``size`` (H, W)."""
    if domain == "shapes":
        return make_scene(seed, size)
    if domain == "microscopy":
        return _microscopy(seed, size)
    if domain == "camouflage":
        return _camouflage(seed, size)
    raise ValueError(f"unknown scene domain {domain!r}; known: {', '.join(DOMAINS)}")


def _smooth_field(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """A smooth random field in [0, 1] varying over about ``cells`` periods per side."""
    small = rng.uniform(0, 1, (cells + 1, cells + 1)).astype(np.float32)
    field = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    return cv2.GaussianBlur(field, (0, 0), 0.35 * min(h, w) / cells).clip(0, 1)  # no visible grid


def _scene(image: np.ndarray, labels: np.ndarray, count: int, seed: int, kind: str, min_area: int) -> Scene:
    """A Scene of the instances 1..count of ``labels`` with at least ``min_area`` pixels."""
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    ids = [i for i in range(1, count + 1) if areas[i] >= min_area]
    masks = np.stack([labels == i for i in ids]) if ids else np.zeros((0, *labels.shape), bool)
    return Scene(image=image, masks=masks, kinds=[kind] * len(ids), parents=np.full(len(ids), -1, np.int64), seed=seed)


def _microscopy(seed: int, size: tuple[int, int]) -> Scene:
    h, w = size
    rng = np.random.default_rng([seed, 1])
    short = min(h, w)
    radius = short * rng.uniform(0.018, 0.035)  # a cell's radius: ~9-18 px at 512
    centres: list[tuple[float, float]] = []
    for _ in range(int(rng.integers(4, 9))):  # clusters of touching cells
        cx, cy = rng.uniform(0.1 * w, 0.9 * w), rng.uniform(0.1 * h, 0.9 * h)
        for _ in range(int(rng.integers(4, 14))):
            x, y = cx + rng.normal(0, radius * 1.8), cy + rng.normal(0, radius * 1.8)
            if all((x - a) ** 2 + (y - b) ** 2 > (1.2 * radius) ** 2 for a, b in centres):
                centres.append((x, y))
    for _ in range(int(rng.integers(5, 15))):  # and some lone ones
        centres.append((rng.uniform(0, w), rng.uniform(0, h)))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    best = np.full((h, w), np.inf, np.float32)
    labels = np.zeros((h, w), np.int32)
    for i, (x, y) in enumerate(centres, 1):
        a, b = radius * rng.uniform(0.8, 1.35), radius * rng.uniform(0.7, 1.1)
        t = rng.uniform(0, np.pi)
        dx, dy = xx - x, yy - y
        u, v = dx * np.cos(t) + dy * np.sin(t), -dx * np.sin(t) + dy * np.cos(t)
        d = (u / a) ** 2 + (v / b) ** 2  # < 1 inside the cell's ellipse
        inside = (d < 1) & (d < best)  # touching cells: each pixel goes to the nearest centre
        labels[inside], best[inside] = i, d[inside]
    light = 60 + 50 * _smooth_field(rng, h, w, 3)  # uneven illumination
    image = light.copy()
    brightness = rng.uniform(12, 30, len(centres) + 1)  # low contrast to the background
    cells = labels > 0
    image[cells] += brightness[labels[cells]] * (0.6 + 0.4 * (1 - best[cells]))  # brighter towards the middle
    image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.8, 1.6))
    image = image + rng.normal(0, rng.uniform(5, 10), image.shape)  # shot noise
    grey = np.clip(image, 0, 255).astype(np.uint8)
    return _scene(np.repeat(grey[..., None], 3, axis=2), labels, len(centres), seed, "cell", min_area=24)


def _texture(rng: np.random.Generator, h: int, w: int, colours: np.ndarray) -> np.ndarray:
    """A natural-looking texture: two smooth fields at different scales mixing two colours."""
    coarse, fine = _smooth_field(rng, h, w, 6), _smooth_field(rng, h, w, 24)
    mix = (0.55 * coarse + 0.45 * fine)
    mix = ((mix - mix.min()) / max(float(mix.max() - mix.min()), 1e-6))[..., None]
    return colours[0] * (1 - mix) + colours[1] * mix


def _camouflage(seed: int, size: tuple[int, int]) -> Scene:
    h, w = size
    rng = np.random.default_rng([seed, 2])
    colours = rng.uniform(40, 220, (2, 3)).astype(np.float32)
    image = _texture(rng, h, w, colours)
    labels = np.zeros((h, w), np.int32)
    count = int(rng.integers(3, 9))
    short = min(h, w)
    for i in range(1, count + 1):
        r = short * np.exp(rng.uniform(np.log(0.06), np.log(0.22)))
        cx, cy = rng.uniform(0.05 * w, 0.95 * w), rng.uniform(0.05 * h, 0.95 * h)
        angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(7, 14))))
        radii = r * rng.uniform(0.55, 1.0, len(angles))
        points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)
        shape = np.zeros((h, w), np.uint8)
        cv2.fillPoly(shape, [np.round(points).astype(np.int32)], 1)
        shape = cv2.GaussianBlur(shape.astype(np.float32), (0, 0), r * 0.08) > 0.5  # rounded outline
        # The same texture at another phase, a little brighter or darker, a little tinted.
        shift = rng.choice([-1, 1]) * rng.uniform(6, 14) + rng.normal(0, 4, 3)
        own = _texture(rng, h, w, colours) + shift
        image[shape] = own[shape]
        labels[shape] = i
    image = cv2.GaussianBlur(image, (0, 0), 0.7) + rng.normal(0, 3, image.shape)
    return _scene(np.clip(image, 0, 255).astype(np.uint8), labels, count, seed, "object", min_area=64)
