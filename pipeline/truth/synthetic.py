"""Procedural scenes with exact instance masks, for training and evaluation.

A scene is painted back to front: every object is drawn as one or more *leaves*
(regions with their own texture) into a label map, so the visible part of each
instance is known exactly after occlusion. Objects with parts (``"composite"``)
produce one instance for the whole and one per part, which gives the part/whole
ambiguity that SAM's three output masks are meant to resolve.

Everything random comes from one ``numpy.random.Generator`` seeded by the scene
seed, so a seed always produces the same image and masks. Training and held-out
evaluation use disjoint seed ranges (:func:`scene_seeds`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Literal

import cv2
import numpy as np

# Held-out scenes use seeds from here on; training seeds must stay below it so that
# "seeds never used in training" holds by construction.
TEST_SEED_OFFSET = 1_000_000_000

KINDS = ("polygon", "ellipse", "blob", "thin", "holed", "composite")
# Categories of the instances, by shape kind (a part of a composite is a "part"; the
# target domains' cells and objects, pipeline.truth.domains), as COCO category entries:
# id k + 1 for CATEGORY_NAMES[k].
CATEGORY_NAMES = (*KINDS, "part", "cell", "object")
CATEGORIES = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CATEGORY_NAMES)]


@dataclass(frozen=True)
class SceneConfig:
    """Knobs of the generator; the defaults give SA-1B-like variety at small scale."""

    min_objects: int = 4
    max_objects: int = 22
    # Object size as a fraction of the short image side, drawn log-uniformly so that
    # small objects are as common per octave as large ones (like SA-1B, fig. 6).
    min_scale: float = 0.03
    max_scale: float = 0.6
    kind_weights: tuple[float, ...] = (0.2, 0.16, 0.2, 0.12, 0.14, 0.18)
    min_area: int = 24  # visible pixels below which an instance is dropped
    max_blur_sigma: float = 1.2
    max_noise_sigma: float = 8.0
    min_contrast: float = 40.0  # L2 RGB distance of a leaf's colour from what it covers


@dataclass
class Scene:
    """One synthetic image with its instances.

    Attributes:
        image: HxWx3 uint8 RGB.
        masks: NxHxW bool, the *visible* part of each instance.
        kinds: N shape kinds (one of KINDS, or "part" for a part of a composite).
        parents: N ints, the index of the whole instance for parts, -1 otherwise.
        seed: the seed that reproduces this scene.
    """

    image: np.ndarray
    masks: np.ndarray
    kinds: list[str]
    parents: np.ndarray
    seed: int

    @property
    def category_ids(self) -> np.ndarray:
        """N COCO category ids of the instances (``CATEGORIES``: one per shape kind)."""
        return np.array([CATEGORY_NAMES.index(k) + 1 for k in self.kinds], np.int64)

    @property
    def areas(self) -> np.ndarray:
        return self.masks.reshape(len(self.masks), -1).sum(axis=1)

    def boxes_xyxy(self) -> np.ndarray:
        """Nx4 float boxes (x0, y0, x1, y1), inclusive pixel bounds as in SAM's amg_utils."""
        boxes = np.zeros((len(self.masks), 4), np.float32)
        for i, m in enumerate(self.masks):
            ys, xs = np.nonzero(m.any(axis=1))[0], np.nonzero(m.any(axis=0))[0]
            boxes[i] = (xs[0], ys[0], xs[-1], ys[-1])
        return boxes


def scene_seeds(split: Literal["train", "test"], start: int, count: int) -> range:
    """Seeds of ``count`` scenes of a split; train and test ranges never overlap."""
    if split == "train":
        if start + count > TEST_SEED_OFFSET:
            raise ValueError("training seeds must stay below TEST_SEED_OFFSET")
        return range(start, start + count)
    if split == "test":
        return range(TEST_SEED_OFFSET + start, TEST_SEED_OFFSET + start + count)
    raise ValueError(f"unknown split {split!r}: use 'train' or 'test'")


def iter_scenes(
    seeds: range | list[int], size: tuple[int, int] = (512, 512), config: SceneConfig | None = None
) -> Iterator[Scene]:
    for seed in seeds:
        yield make_scene(seed, size, config)


# --------------------------------------------------------------------------- shapes
# Each shape function returns a list of leaves; a leaf is (mask, x0, y0): a uint8 mask
# of its bounding box (already clipped to the image) and the box's top-left corner.
Leaf = tuple[np.ndarray, int, int]


def _canvas(points: np.ndarray, pad: float, h: int, w: int) -> tuple[np.ndarray, int, int] | None:
    """A zero canvas covering ``points`` (+pad) clipped to the image, or None if off-image."""
    x0 = max(int(math.floor(points[:, 0].min() - pad)), 0)
    y0 = max(int(math.floor(points[:, 1].min() - pad)), 0)
    x1 = min(int(math.ceil(points[:, 0].max() + pad)) + 1, w)
    y1 = min(int(math.ceil(points[:, 1].max() + pad)) + 1, h)
    if x1 <= x0 or y1 <= y0:
        return None
    return np.zeros((y1 - y0, x1 - x0), np.uint8), x0, y0


def _fill(points: np.ndarray, h: int, w: int) -> Leaf | None:
    c = _canvas(points, 1, h, w)
    if c is None:
        return None
    canvas, x0, y0 = c
    cv2.fillPoly(canvas, [np.round(points - (x0, y0)).astype(np.int32)], 1)
    return canvas, x0, y0


def _star_polygon(rng: np.random.Generator, cx: float, cy: float, r: float) -> np.ndarray:
    """A random star-shaped polygon: convex when the radii are equal, concave otherwise."""
    n = int(rng.integers(3, 9))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = r * (rng.uniform(0.45, 1.0, n) if rng.random() < 0.5 else np.ones(n))
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)


def _ellipse_points(rng: np.random.Generator, cx: float, cy: float, r: float) -> np.ndarray:
    a, b = r, r * rng.uniform(0.25, 1.0)
    t = np.linspace(0, 2 * np.pi, max(16, int(r)), endpoint=False)
    rot = rng.uniform(0, np.pi)
    x, y = a * np.cos(t), b * np.sin(t)
    return np.stack(
        [cx + x * np.cos(rot) - y * np.sin(rot), cy + x * np.sin(rot) + y * np.cos(rot)], axis=1
    )


def _blob_points(rng: np.random.Generator, cx: float, cy: float, r: float) -> np.ndarray:
    """A smooth closed curve: radius modulated by a few random harmonics."""
    t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    radius = np.ones_like(t)
    for k in range(2, 6):
        radius += rng.uniform(0, 0.35 / k * 2) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    radius = r * np.clip(radius, 0.2, None) / radius.max()
    return np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], axis=1)


def _outline(rng: np.random.Generator, cx: float, cy: float, r: float) -> np.ndarray:
    kind = rng.integers(3)
    return (_star_polygon, _ellipse_points, _blob_points)[kind](rng, cx, cy, r)


def _thin(rng: np.random.Generator, cx: float, cy: float, r: float, h: int, w: int) -> Leaf | None:
    """A wire-like polyline or arc, 1 to 5 px thick: the hard case for low-res decoders."""
    n = int(rng.integers(2, 6))
    if rng.random() < 0.5:
        heading = rng.uniform(0, 2 * np.pi)
        steps = [np.array([cx, cy])]
        for _ in range(n):
            heading += rng.normal(0, 0.7)
            steps.append(steps[-1] + 2 * r / n * np.array([np.cos(heading), np.sin(heading)]))
        points = np.stack(steps)
    else:
        start, span = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 1.6) * np.pi
        t = np.linspace(start, start + span, 24)
        points = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)
    thickness = int(rng.integers(1, 6))
    c = _canvas(points, thickness + 1, h, w)
    if c is None:
        return None
    canvas, x0, y0 = c
    cv2.polylines(canvas, [np.round(points - (x0, y0)).astype(np.int32)], False, 1, thickness)
    return canvas, x0, y0


def _holed(rng: np.random.Generator, cx: float, cy: float, r: float, h: int, w: int) -> Leaf | None:
    """An outline with one to three holes; what is behind shows through the holes."""
    leaf = _fill(_outline(rng, cx, cy, r), h, w)
    if leaf is None:
        return None
    canvas, x0, y0 = leaf
    n_holes = 1 if rng.random() < 0.6 else int(rng.integers(2, 4))
    for _ in range(n_holes):
        scale = rng.uniform(0.3, 0.6) if n_holes == 1 else rng.uniform(0.15, 0.3)
        offset = rng.uniform(-0.35, 0.35, 2) * r * (1 - scale)
        hole = _outline(rng, cx + offset[0], cy + offset[1], r * scale)
        cv2.fillPoly(canvas, [np.round(hole - (x0, y0)).astype(np.int32)], 0)
    return canvas, x0, y0


def _composite(rng: np.random.Generator, cx: float, cy: float, r: float, h: int, w: int) -> list[Leaf]:
    """An object made of 2-6 touching parts, each a leaf with its own texture."""
    style = rng.integers(3)
    outlines: list[np.ndarray] = []
    if style == 0:  # body + head + limbs, like a figure or an animal
        body = _ellipse_points(rng, cx, cy, r * 0.6)
        outlines.append(body)
        angle = rng.uniform(0, 2 * np.pi)
        hx, hy = cx + 0.75 * r * np.cos(angle), cy + 0.75 * r * np.sin(angle)
        outlines.append(_ellipse_points(rng, hx, hy, r * rng.uniform(0.2, 0.35)))
        for _ in range(int(rng.integers(0, 4))):
            a = angle + np.pi + rng.normal(0, 0.8)
            end = np.array([cx + r * np.cos(a), cy + r * np.sin(a)])
            direction = (end - (cx, cy)) / (np.linalg.norm(end - (cx, cy)) + 1e-6)
            normal = np.array([-direction[1], direction[0]]) * max(2.0, r * 0.08)
            mid = np.array([cx, cy]) + direction * r * 0.4
            outlines.append(np.stack([mid + normal, end + normal, end - normal, mid - normal]))
    elif style == 1:  # a panel split into cells, like a window or a tiled sign
        rows, cols = int(rng.integers(1, 3)), int(rng.integers(2, 4))
        aspect = rng.uniform(0.6, 1.4)
        bw, bh = 2 * r * aspect, 2 * r / aspect
        gap = max(1.0, r * rng.uniform(0.0, 0.06))
        left, top = cx - bw / 2, cy - bh / 2
        for i in range(rows):
            for j in range(cols):
                xa, ya = left + j * bw / cols + gap / 2, top + i * bh / rows + gap / 2
                xb, yb = left + (j + 1) * bw / cols - gap / 2, top + (i + 1) * bh / rows - gap / 2
                outlines.append(np.array([[xa, ya], [xb, ya], [xb, yb], [xa, yb]]))
    else:  # a tool: a handle and a head
        angle = rng.uniform(0, 2 * np.pi)
        d = np.array([np.cos(angle), np.sin(angle)])
        n = np.array([-d[1], d[0]]) * r * rng.uniform(0.08, 0.18)
        start, joint = np.array([cx, cy]) - d * r, np.array([cx, cy]) + d * r * 0.3
        outlines.append(np.stack([start + n, joint + n, joint - n, start - n]))
        head_c = joint + d * r * 0.35
        outlines.append(_outline(rng, head_c[0], head_c[1], r * rng.uniform(0.3, 0.5)))
    leaves = [_fill(o, h, w) for o in outlines]
    return [leaf for leaf in leaves if leaf is not None]


# ------------------------------------------------------------------------- textures
def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3).astype(np.float32)


def _texture(rng: np.random.Generator, base: np.ndarray, hh: int, ww: int) -> np.ndarray:
    """An hh x ww x 3 float texture around ``base``: flat, gradient, stripes, checks or noise."""
    kind = rng.choice(5, p=(0.35, 0.2, 0.15, 0.1, 0.2))
    if kind == 0:
        return np.broadcast_to(base, (hh, ww, 3))
    other = np.clip(base + rng.normal(0, 50, 3), 0, 255).astype(np.float32)
    if kind == 4:
        small = rng.random((max(2, hh // 8), max(2, ww // 8), 1)).astype(np.float32)
        t = cv2.resize(small, (ww, hh), interpolation=cv2.INTER_LINEAR)[..., None]
    else:
        yy, xx = np.mgrid[0:hh, 0:ww].astype(np.float32)
        a = rng.uniform(0, np.pi)
        proj = xx * np.cos(a) + yy * np.sin(a)
        if kind == 1:
            t = (proj - proj.min()) / (np.ptp(proj) + 1e-6)
        elif kind == 2:
            t = (np.sin(proj * 2 * np.pi / rng.uniform(4, 20)) > 0).astype(np.float32)
        else:
            period = rng.uniform(4, 16)
            t = ((xx // period + yy // period) % 2).astype(np.float32)
        t = t[..., None]
    return base * (1 - t) + other * t


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth low-frequency colour field: 'stuff' that carries no instance."""
    small = rng.uniform(0, 255, (int(rng.integers(2, 6)), int(rng.integers(2, 6)), 3))
    return cv2.resize(small.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)


# ---------------------------------------------------------------------------- scene
def _draw_object(
    rng: np.random.Generator, kind: str, cx: float, cy: float, r: float, h: int, w: int
) -> list[Leaf]:
    if kind == "composite":
        return _composite(rng, cx, cy, r, h, w)
    if kind == "thin":
        leaf = _thin(rng, cx, cy, r, h, w)
    elif kind == "holed":
        leaf = _holed(rng, cx, cy, r, h, w)
    else:
        points = {"polygon": _star_polygon, "ellipse": _ellipse_points, "blob": _blob_points}[kind](
            rng, cx, cy, r
        )
        leaf = _fill(points, h, w)
    return [] if leaf is None else [leaf]


def _paint(
    rng: np.random.Generator, image: np.ndarray, label: np.ndarray, leaf: Leaf, leaf_id: int,
    min_contrast: float,
) -> None:
    mask, x0, y0 = leaf
    hh, ww = mask.shape
    sel = mask.astype(bool)
    if not sel.any():
        return
    region = image[y0 : y0 + hh, x0 : x0 + ww]
    under = region[sel].mean(axis=0)
    # A few tries for a colour that stands out from what it covers; low contrast is
    # still allowed after that, because real data has camouflaged objects too.
    base = _colour(rng)
    for _ in range(3):
        if np.linalg.norm(base - under) >= min_contrast:
            break
        base = _colour(rng)
    region[sel] = _texture(rng, base, hh, ww)[sel]
    label[y0 : y0 + hh, x0 : x0 + ww][sel] = leaf_id


def make_scene(
    seed: int, size: tuple[int, int] = (512, 512), config: SceneConfig | None = None
) -> Scene:
    """Generates the scene of ``seed`` at ``size`` (H, W); same seed, same scene."""
    cfg = config or SceneConfig()
    h, w = size
    rng = np.random.default_rng(seed)
    image = _background(rng, h, w)
    label = np.zeros((h, w), np.int32)  # 0: background, k: leaf k

    n_objects = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    short = min(h, w)
    scales = np.exp(rng.uniform(math.log(cfg.min_scale), math.log(cfg.max_scale), n_objects))
    # Mostly large-to-small painting order (small things lie on big things), with
    # jitter so that small objects are sometimes occluded by larger ones.
    order = np.argsort(-(np.log(scales) + rng.normal(0, 0.5, n_objects)))
    kind_p = np.asarray(cfg.kind_weights) / np.sum(cfg.kind_weights)

    instances: list[tuple[str, list[int], int]] = []  # kind, leaf ids, parent index
    next_leaf = 1
    for i in order:
        r = scales[i] * short / 2
        cx, cy = rng.uniform(-0.1 * w, 1.1 * w), rng.uniform(-0.1 * h, 1.1 * h)
        kind = str(rng.choice(KINDS, p=kind_p))
        leaves = _draw_object(rng, kind, cx, cy, r, h, w)
        if not leaves:
            continue
        ids = list(range(next_leaf, next_leaf + len(leaves)))
        next_leaf += len(leaves)
        for leaf, leaf_id in zip(leaves, ids):
            _paint(rng, image, label, leaf, leaf_id, cfg.min_contrast)
        whole = len(instances)
        instances.append((kind, ids, -1))
        if kind == "composite":
            instances.extend(("part", [leaf_id], whole) for leaf_id in ids)

    masks, kinds, parents = _visible_instances(label, instances, cfg.min_area)
    image = _degrade(rng, image, cfg)
    return Scene(image=image, masks=masks, kinds=kinds, parents=parents, seed=seed)


def _visible_instances(
    label: np.ndarray, instances: list[tuple[str, list[int], int]], min_area: int
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Visible masks after occlusion; drops tiny instances and parts equal to their whole."""
    h, w = label.shape
    n_leaves = max((max(ids) for _, ids, _ in instances), default=0)
    counts = np.bincount(label.ravel(), minlength=n_leaves + 1)
    keep: list[int] = []
    new_index: dict[int, int] = {}
    masks: list[np.ndarray] = []
    for idx, (_kind, ids, parent) in enumerate(instances):
        area = int(counts[ids].sum())
        if area < min_area:
            continue
        if parent >= 0:
            if parent not in new_index:
                continue  # the whole was too small, so its parts are too
            parent_area = int(masks[new_index[parent]].sum())
            # A part that is (almost) all that remains of its whole is not a
            # separate answer; keeping both would make identical targets.
            if area >= 0.95 * parent_area:
                continue
        m = label == ids[0] if len(ids) == 1 else np.isin(label, ids)
        new_index[idx] = len(masks)
        masks.append(m)
        keep.append(idx)
    kinds = [instances[i][0] for i in keep]
    parents = np.array(
        [new_index.get(instances[i][2], -1) if instances[i][2] >= 0 else -1 for i in keep], np.int64
    )
    # A whole whose parts were all dropped is still a fine object; no fix-up needed.
    stacked = np.stack(masks) if masks else np.zeros((0, h, w), bool)
    return stacked, kinds, parents


def _degrade(rng: np.random.Generator, image: np.ndarray, cfg: SceneConfig) -> np.ndarray:
    """Camera-like blur and sensor noise; masks stay exact because they come from labels."""
    sigma = rng.uniform(0, cfg.max_blur_sigma)
    if sigma > 0.3:
        image = cv2.GaussianBlur(image, (0, 0), sigma)
    noise = rng.uniform(0, cfg.max_noise_sigma)
    if noise > 0:
        image = image + rng.standard_normal(image.shape, dtype=np.float32) * noise
    return np.clip(image, 0, 255).astype(np.uint8)


def coco_instances(scenes: list[Scene], file_names: list[str]) -> dict:
    """A COCO instances dict of ``scenes`` saved as ``file_names``: each instance's tight
    box (pixel edges), its category and its exact mask as compressed RLE (str counts)."""
    from pycocotools import mask as mask_utils

    images, annotations = [], []
    for image_id, (scene, name) in enumerate(zip(scenes, file_names), 1):
        h, w = scene.image.shape[:2]
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        rles = (mask_utils.encode(np.asfortranarray(scene.masks.transpose(1, 2, 0).astype(np.uint8)))
                if len(scene.masks) else [])
        for index, (rle, box, category) in enumerate(zip(rles, scene.boxes_xyxy(), scene.category_ids)):
            x0, y0, x1, y1 = (float(v) for v in box)
            annotations.append({
                "id": image_id * 1000 + index, "image_id": image_id, "category_id": int(category),
                "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1], "area": int(mask_utils.area(rle)), "iscrowd": 0,
                "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
            })
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}


DETECTOR_ERRORS = ("shift", "scale", "loose", "tight")


def detector_boxes(boxes: np.ndarray, error: str, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """Nx4 XYXY boxes as a detector that errs in one way would give them, clipped to the
    image ``size`` (H, W): ``shift`` moves the centre by N(0, 0.15 side) per axis,
    ``scale`` multiplies both sides by exp(N(0, 0.2)), ``loose`` pushes each edge out by
    U(0.05, 0.3) side, ``tight`` pulls each edge in by U(0.05, 0.2) side."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.stack([w, h, w, h], axis=1)
    if error == "shift":
        offset = rng.normal(0, 0.15, (len(boxes), 2)) * side[:, :2]
        moved = boxes + np.concatenate([offset, offset], axis=1)
    elif error == "scale":
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        half = (boxes[:, 2:] - boxes[:, :2]) / 2 * np.exp(rng.normal(0, 0.2, (len(boxes), 1)))
        moved = np.concatenate([centre - half, centre + half], axis=1)
    elif error in ("loose", "tight"):
        low, high, sign = (0.05, 0.3, 1.0) if error == "loose" else (0.05, 0.2, -1.0)
        push = rng.uniform(low, high, boxes.shape) * side * sign
        moved = boxes + push * np.array([-1, -1, 1, 1])
    else:
        raise ValueError(f"unknown detector error {error!r}; one of {DETECTOR_ERRORS}")
    hh, ww = size
    return np.clip(moved, 0, [ww, hh, ww, hh])
