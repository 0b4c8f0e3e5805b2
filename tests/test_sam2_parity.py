"""Parity of sam_core's SAM 2 / 2.1 with the official ``sam2`` package (same random
weights, the same released file, CPU, fp32, 256-px models on both sides), and the
loading rules for official SAM 2 checkpoints."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator as RefGenerator
from sam2.sam2_image_predictor import SAM2ImagePredictor
from scipy import ndimage

from sam_core import (
    AMG_PRESETS,
    CheckpointError,
    SAM2AutomaticMaskGenerator,
    SamPredictor,
    official_state,
    sam_model_registry,
)
from sam_core.utils.regions import fill_small_regions

from .sam_reference import (
    match_records,
    official_feature_sizes,
    official_sam2,
    save_official_sam2,
    scene_image,
    shape_for_thresholds_,
)

SIZE = 256
ARCH = "sam2.1_hiera_t"


@pytest.fixture(autouse=True)
def _inference_only():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(official model, its released-format file, sam_core's model loaded from it)."""
    ref = official_sam2(ARCH, SIZE, seed=0)
    shape_for_thresholds_(ref)
    path = save_official_sam2(ref, tmp_path_factory.mktemp("sam2") / f"{ARCH}.pt")
    ours = sam_model_registry[ARCH](checkpoint=path, image_size=SIZE)
    return ref, path, ours


@pytest.fixture(scope="module")
def image():
    return scene_image(300, 450, seed=1)


@pytest.fixture(scope="module")
def predictors(pair, image):
    ref, _, ours = pair
    p_ref, p_ours = SAM2ImagePredictor(ref), SamPredictor(ours)
    p_ref._bb_feat_sizes = official_feature_sizes(SIZE)
    with torch.no_grad():
        p_ref.set_image(image)
        p_ours.set_image(image)
    return p_ref, p_ours


def test_official_file_loads_strictly_and_saves_back_unchanged(pair):
    ref, path, ours = pair
    saved = official_state(ours)
    original = torch.load(path, weights_only=True)["model"]
    assert set(saved) == {"model"} and set(saved["model"]) == set(original)
    for key, value in original.items():
        assert torch.equal(saved["model"][key], value), key
    fresh = official_sam2(ARCH, SIZE, seed=5)
    fresh.load_state_dict(saved["model"], strict=True)  # the official package takes it back


def _rewrite(path, tmp_path, change) -> str:
    state = torch.load(path, weights_only=True)["model"]
    change(state)
    return save_official_sam2_state(state, tmp_path / "changed.pt")


def save_official_sam2_state(state, path) -> str:
    torch.save({"model": state}, path)
    return str(path)


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("memory_encoder.fuser.layers.0.gamma"), "video tensors"),
    (lambda s: s.pop("sam_mask_decoder.conv_s0.weight"), "missing keys: mask_decoder.conv_s0.weight"),
    (lambda s: s.update(extra=torch.zeros(1)), "unexpected keys: extra"),
    (lambda s: s.pop("no_obj_embed_spatial"), "SAM 2 checkpoint, not SAM 2.1"),
], ids=["video-tensor-missing", "image-tensor-missing", "foreign-key", "sam2.0-file"])
def test_incomplete_or_foreign_files_are_refused(pair, tmp_path, change, message):
    _, path, _ = pair
    changed = _rewrite(path, tmp_path, change)
    with pytest.raises(CheckpointError, match=message):
        sam_model_registry[ARCH](checkpoint=changed, image_size=SIZE)


def test_truncated_file_and_other_families_are_refused(pair, tmp_path):
    _, path, _ = pair
    data = open(path, "rb").read()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        sam_model_registry[ARCH](checkpoint=str(truncated), image_size=SIZE)
    # A SAM 2.1 file into SAM 1, and a SAM 1 file into SAM 2.1: refused, naming what the file is.
    with pytest.raises(CheckpointError, match="looks like sam2.1_hiera_t"):
        sam_model_registry["vit_tiny"](checkpoint=path)
    sam1 = tmp_path / "sam1.pth"
    torch.save(sam_model_registry["vit_tiny"]().state_dict(), sam1)
    with pytest.raises(CheckpointError, match="does not fit sam2.1_hiera_t.*looks like vit_tiny"):
        sam_model_registry[ARCH](checkpoint=str(sam1), image_size=SIZE)
    # The same version at another size: the message names the size the file fits.
    small = save_official_sam2(official_sam2("sam2.1_hiera_s", SIZE), tmp_path / "s.pt")
    with pytest.raises(CheckpointError, match="looks like sam2.1_hiera_s"):
        sam_model_registry[ARCH](checkpoint=small, image_size=SIZE)


def test_image_features_match(predictors):
    p_ref, p_ours = predictors
    torch.testing.assert_close(p_ours.get_image_embedding(), p_ref._features["image_embed"], rtol=1e-4, atol=1e-4)
    for theirs, ours in zip(p_ref._features["high_res_feats"], p_ours.get_high_res_features()):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert p_ours.get_image_embedding().abs().mean() > 0.1  # not a degenerate embedding


PROMPTS = {
    "points-multimask": dict(point_coords=np.array([[100.0, 80.0], [300.0, 200.0]]), point_labels=np.array([1, 0])),
    # single output: SAM 2 falls back to the best multimask output when it is unstable
    "point-single": dict(point_coords=np.array([[100.0, 80.0]]), point_labels=np.array([1]), multimask_output=False),
    "box": dict(box=np.array([50, 40, 260, 220]), multimask_output=False),
    "box-and-point": dict(box=np.array([50, 40, 260, 220]), point_coords=np.array([[120.0, 100.0]]),
                          point_labels=np.array([1])),
}


@pytest.mark.parametrize("name", list(PROMPTS))
def test_predictions_match(predictors, name):
    p_ref, p_ours = predictors
    kwargs = PROMPTS[name]
    first = p_ref.predict(**kwargs, return_logits=True)
    ours = p_ours.predict(**kwargs, return_logits=True)
    for theirs, mine in zip(first, ours):
        assert theirs.shape == mine.shape
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-4)
    # The low-res logits fed back as a mask prompt (clipped to +-32 on both sides).
    again = p_ref.predict(**kwargs, mask_input=first[2][:1])
    mine = p_ours.predict(**kwargs, mask_input=ours[2][:1])
    assert (again[0].astype(bool) == mine[0]).mean() >= 0.999
    np.testing.assert_allclose(mine[1], again[1], atol=1e-4)


def test_batched_prompts_match_official(predictors):
    p_ref, p_ours = predictors
    coords = torch.tensor([[[40.0, 60.0]], [[120.0, 90.0]], [[200.0, 30.0]]])
    labels = torch.ones(3, 1, dtype=torch.int)
    theirs = p_ref._predict(coords, labels, multimask_output=True, return_logits=True)
    ours = p_ours.predict_torch(coords, labels, multimask_output=True, return_logits=True)
    for a, b in zip(theirs, ours):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def _generators(pair, **settings):
    ref, _, ours = pair
    official = RefGenerator(ref, **settings)
    official.predictor._bb_feat_sizes = official_feature_sizes(SIZE)
    return official, SAM2AutomaticMaskGenerator(ours, **settings)


# SAM 2's defaults (predicted IoU 0.8, stability 0.95 at offset 1, three masks per point),
# on smaller grids for time. Box NMS is off (IoU > 1 never happens): random masks spread
# over the image, which NMS would collapse to one, and then one mask would be compared.
@pytest.mark.parametrize("settings", [
    dict(points_per_side=16, box_nms_thresh=1.0),
    dict(points_per_side=8, box_nms_thresh=1.0, use_m2m=True),
    dict(points_per_side=8, box_nms_thresh=1.0, multimask_output=False),
    dict(points_per_side=8, box_nms_thresh=1.0, crop_nms_thresh=1.0, crop_n_layers=1),
], ids=["defaults", "m2m", "single-output", "crops"])
def test_automatic_generator_matches_official(pair, image, settings):
    official, ours = _generators(pair, **settings)
    theirs = official.generate(image)
    mine = ours.generate(image)
    assert len(theirs) >= 20, "the shaped weights should give the filters many masks to decide"
    if "crop_n_layers" not in settings and settings.get("multimask_output", True):
        # Without crops only the IoU and stability filters remove candidates: they did.
        assert len(theirs) < 0.9 * 3 * settings["points_per_side"] ** 2
    assert abs(len(mine) - len(theirs)) <= max(1, len(theirs) // 100)
    pairs = match_records(theirs, mine)
    ious = np.array([iou for _, _, iou in pairs])
    assert (ious >= 0.99).mean() >= 0.99, sorted(ious)[:5]
    for a, b, iou in pairs:
        if iou >= 0.99:
            assert abs(a["predicted_iou"] - b["predicted_iou"]) < 1e-4
            assert abs(a["stability_score"] - b["stability_score"]) < 1e-4
            assert a["crop_box"] == b["crop_box"] and set(a) == set(b)


def _components(binary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, _ = ndimage.label(binary, structure=np.ones((3, 3)))  # 8-connectivity
    return labels, np.bincount(labels.ravel())


def test_small_regions_filled_as_the_cuda_extension_does():
    """SAM 2's hole filling and speck removal (min_mask_region_area / max_hole_area),
    which the official package runs only with its CUDA extension, against scipy's
    8-connected components as the oracle."""
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(ndimage.gaussian_filter(rng.normal(size=(3, 64, 64)), (0, 1.5, 1.5)) * 10).float()
    out = fill_small_regions(logits, 0.0, 12, 9).numpy()
    for before, after in zip(logits.numpy(), out):
        holes, hole_areas = _components(before <= 0)
        specks, speck_areas = _components(before > 0)
        is_hole = (holes > 0) & (hole_areas[holes] <= 12)
        is_speck = (specks > 0) & (speck_areas[specks] <= 9)
        assert is_hole.any() and is_speck.any()
        np.testing.assert_array_equal(after[is_hole], 10.0)
        np.testing.assert_array_equal(after[is_speck], -10.0)
        untouched = ~is_hole & ~is_speck
        np.testing.assert_array_equal(after[untouched], before[untouched])


def test_generator_cleans_small_regions_on_the_cpu(pair, image):
    _, _, ours = pair
    plain = SAM2AutomaticMaskGenerator(ours, points_per_side=8, box_nms_thresh=1.0).generate(image)
    cleaned = SAM2AutomaticMaskGenerator(ours, points_per_side=8, box_nms_thresh=1.0,
                                         min_mask_region_area=50).generate(image)
    assert plain and cleaned
    changed = sum(a["area"] != b["area"] for a, b, _ in match_records(plain, cleaned))
    assert changed > 0


def test_dense_preset_is_the_notebook_setting(pair):
    _, _, ours = pair
    generator = SAM2AutomaticMaskGenerator.from_preset(ours, "sam2_dense")
    assert generator.use_m2m and generator.crop_n_layers == 1 and generator.min_mask_region_area == 25
    assert len(generator.point_grids[0]) == 64 * 64 and len(generator.point_grids[1]) == 32 * 32
    assert AMG_PRESETS["sam2_dense"]["pred_iou_thresh"] == 0.7
