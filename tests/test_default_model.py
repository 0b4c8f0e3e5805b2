"""The models the project ships (conf/model/default.yaml, and vit_tiny.yaml): they load everywhere,
the quickstart runs with the default, and the bf16 fast path agrees with the fp32 path on it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import sam_core
from pipeline.stages import run_stage
from sam_core.tools.bench import mask_parity
from tests.conftest import REPO
from tests.sam_reference import official_sam
from tests.test_fully_auto import check_dataset


def shipped(name: str):
    """(arch, checkpoint file, generator thresholds) of a model shipped in models/."""
    cfg = OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml")
    return cfg.model.arch, REPO / "models" / cfg.model.checkpoint.rsplit("/models/", 1)[1], cfg.get("amg")


ARCH, DEFAULT_MODEL, SHIPPED_AMG = shipped("default")
SAMPLE = REPO / "sample" / "images"


def sample_image(name: str, long_side: int = 512) -> np.ndarray:
    image = Image.open(SAMPLE / name).convert("RGB")
    image.thumbnail((long_side, long_side))
    return np.asarray(image)


@pytest.mark.parametrize("name", ["default", "vit_tiny"])
def test_shipped_models_are_small_and_load_in_both_implementations(name):
    arch, path, _ = shipped(name)
    assert path.stat().st_size <= 25 * 2**20
    ours = sam_core.sam_model_registry[arch](checkpoint=str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    official = official_sam(arch, state)  # strict load into the official classes
    image = sample_image("coffee.jpg", 256)
    pred = sam_core.SamPredictor(ours)
    pred.set_image(image)
    from segment_anything import SamPredictor as OfficialPredictor

    ref = OfficialPredictor(official)
    ref.set_image(image)
    point = (np.array([[128, 90]]), np.array([1]))
    m1, s1, l1 = pred.predict(*point)
    m2, s2, l2 = ref.predict(*point)
    np.testing.assert_allclose(l1, l2, atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(s1, s2, atol=1e-4)


def test_quickstart_command_annotates_the_samples(compose_config, tmp_path, ray_local):
    """`python -m pipeline.run +stage=fully_auto` with only the output moved: the sample
    photos, the default model, every image annotated, a dataset that validates clean."""
    out = tmp_path / "quickstart"
    summary = run_stage(compose_config("+stage=fully_auto", f"output={out}"))
    images = len(list(SAMPLE.glob("*.jpg")))
    assert summary["images_ok"] == images and summary["images_failed"] == 0
    assert summary["masks"] >= 3 * images, "the default model should find objects in every photo"
    records = check_dataset(out, str(SAMPLE))
    assert all(r["annotations"] for r in records.values())
    checked = run_stage(compose_config("+stage=validate", f"input={out}", f"output={out}", "stage.parallel=local"))
    assert checked["problems"] == 0 and checked["annotations"] == summary["masks"]


def test_bf16_fast_path_matches_the_fp32_path():
    """Issue 3's quality bar on the shipped model: >= 97% of the fp32 masks matched at
    IoU >= 0.9, mean matched IoU >= 0.97; not counting masks whose predicted IoU or
    stability lies within float noise of the filter that kept them (bf16 may put them
    either side: with this model every unmatched mask was within 0.002 of a threshold)."""
    sam = sam_core.sam_model_registry[ARCH](checkpoint=str(DEFAULT_MODEL))
    images = [sample_image("astronaut.jpg", 384), sample_image("coffee.jpg", 384)]
    settings = dict(points_per_side=16, output_mode="coco_rle", **SHIPPED_AMG)  # its calibrated thresholds
    ref = [sam_core.SamAutomaticMaskGenerator(sam, **settings).generate(im) for im in images]
    fast = [sam_core.SamAutomaticMaskGenerator(sam, **settings, precision="bf16").generate(im) for im in images]
    margin = 0.005

    def clear(record):
        return (abs(record["predicted_iou"] - SHIPPED_AMG.pred_iou_thresh) > margin
                and abs(record["stability_score"] - SHIPPED_AMG.stability_score_thresh) > margin)

    decided = [[r for r in records if clear(r)] for records in ref]
    total, kept = sum(map(len, ref)), sum(map(len, decided))
    assert kept >= 0.85 * total, (kept, total)  # borderline masks stay a minority
    parity = mask_parity(decided, fast)
    assert parity["reference_masks"] >= 5
    assert parity["matched_fraction"] >= 0.97 and parity["mean_matched_iou"] >= 0.97, parity


def test_unknown_precision_is_refused():
    sam = sam_core.sam_model_registry["vit_tiny"]()
    with pytest.raises(ValueError, match="precision"):
        sam_core.SamAutomaticMaskGenerator(sam, precision="fp8")


def test_models_folder_holds_one_training_curve_per_shipped_model():
    """models/README.md, "Shipping a new default model": each shipped model is a .pth
    with one training curve beside it, every shipped model is named by a model config,
    and nothing else is committed there (every binary stays in every clone)."""
    models = REPO / "models"
    shipped_files = {p.name for p in models.iterdir()}
    weights = sorted(n for n in shipped_files if n.endswith(".pth"))
    expected = {"README.md", *weights, *(n.removesuffix(".pth") + "_training.png" for n in weights)}
    assert shipped_files == expected
    named = {shipped(p.stem)[1].name for p in (REPO / "conf" / "model").glob("*.yaml")
             if "/models/" in str(OmegaConf.load(p).get("model", {}).get("checkpoint", ""))}
    assert set(weights) <= named
