"""The synthetic scene generator: determinism, exact masks, variety, speed."""
from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from pipeline.truth.synthetic import KINDS, TEST_SEED_OFFSET, SceneConfig, make_scene, scene_seeds

SEEDS = range(40)


@pytest.fixture(scope="module")
def scenes():
    return [make_scene(s) for s in SEEDS]


def test_same_seed_same_scene_other_seed_other_scene():
    a, b, c = make_scene(7), make_scene(7), make_scene(8)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
    assert a.kinds == b.kinds and np.array_equal(a.parents, b.parents)
    assert not np.array_equal(a.image, c.image)


def test_shapes_and_types_follow_size():
    s = make_scene(3, size=(200, 320))
    assert s.image.shape == (200, 320, 3) and s.image.dtype == np.uint8
    assert s.masks.dtype == bool and s.masks.shape[1:] == (200, 320)
    assert len(s.kinds) == len(s.parents) == len(s.masks)


def test_masks_are_visible_parts_consistent_with_hierarchy(scenes):
    for s in scenes:
        assert (s.areas >= SceneConfig().min_area).all()
        for i, parent in enumerate(s.parents):
            if parent >= 0:
                assert s.kinds[i] == "part" and s.kinds[parent] == "composite"
                # a part lies inside its whole and is strictly smaller than it
                assert not (s.masks[i] & ~s.masks[parent]).any()
                assert s.areas[i] < 0.95 * s.areas[parent]
        # Occlusion: objects that are not part and whole never share a pixel.
        top = [i for i, p in enumerate(s.parents) if p < 0]
        coverage = s.masks[top].sum(0)
        assert coverage.max() <= 1


def test_masks_match_image_content(scenes):
    """A mask's pixels must look different from the ring just outside it, or the
    labels would be detached from the picture."""
    contrasts = []
    for s in scenes[:10]:
        img = s.image.astype(np.float32)
        for m in s.masks[s.areas > 2000]:
            ring = cv2.dilate(m.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool) & ~m
            inner = cv2.erode(m.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
            if inner.sum() > 100 and ring.sum() > 100:
                contrasts.append(np.linalg.norm(img[inner].mean(0) - img[ring].mean(0)))
    assert np.median(contrasts) > 20


def test_variety_of_kinds_sizes_holes_and_parts(scenes):
    kinds = {k for s in scenes for k in s.kinds}
    assert set(KINDS) | {"part"} == kinds
    rel = np.concatenate([np.sqrt(s.areas / s.masks[0].size) for s in scenes])
    assert rel.min() < 0.02 and rel.max() > 0.3  # SA-1B-like spread of relative sizes
    holes = 0
    for s in scenes:
        for m, k in zip(s.masks, s.kinds):
            if k == "holed":
                _, hierarchy = cv2.findContours(m.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
                holes += int(hierarchy is not None and (hierarchy[0][:, 3] >= 0).any())
    assert holes >= 3
    assert sum((s.parents >= 0).sum() for s in scenes) >= 10
    counts = [len(s.masks) for s in scenes]
    assert min(counts) >= 1 and max(counts) >= 20


def test_thin_structures_are_thin(scenes):
    widths = []
    for s in scenes:
        for m, k in zip(s.masks, s.kinds):
            if k == "thin":
                dist = cv2.distanceTransform(m.astype(np.uint8), cv2.DIST_L2, 3)
                widths.append(dist.max())
    assert widths and np.median(widths) <= 3.5


def test_noise_and_blur_vary():
    stds = []
    for seed in range(10):
        s = make_scene(seed, config=SceneConfig(min_objects=1, max_objects=1))
        # Flat background regions: a high-pass residual measures the noise level.
        img = s.image.astype(np.float32).mean(-1)
        stds.append(np.std(img - cv2.GaussianBlur(img, (0, 0), 3)))
    assert max(stds) > 2 * min(stds)


def test_seed_splits_never_overlap():
    train, test = scene_seeds("train", 0, 1000), scene_seeds("test", 0, 1000)
    assert not set(train) & set(test) and min(test) == TEST_SEED_OFFSET
    with pytest.raises(ValueError):
        scene_seeds("train", TEST_SEED_OFFSET - 5, 10)
    with pytest.raises(ValueError):
        scene_seeds("val", 0, 1)


def test_fast_enough_for_training():
    make_scene(0)
    times = []
    for seed in range(30):
        t = time.perf_counter()
        make_scene(seed)
        times.append(time.perf_counter() - t)
    assert np.median(times) < 0.05
