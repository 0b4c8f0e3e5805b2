"""sam_core behaviour beyond parity: checkpoints, input handling, RLE, options."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from sam_core import (
    AMG_PRESETS,
    CheckpointError,
    SamAutomaticMaskGenerator,
    as_rgb_uint8,
    sam_model_registry,
)
from sam_core.utils.amg import area_from_rle, decode_rle, encode_rle, run_lengths, uncompressed_rle

from .conftest import REPO
from .sam_reference import model_pair, reference_sam, scene_image


@pytest.fixture(autouse=True)
def _inference_only():
    """No autograd in this module's tests (a module-level switch would leak into
    every test collected after it, e.g. the training tests)."""
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory):
    ref, _ = model_pair("vit_tiny", seed=5)
    path = tmp_path_factory.mktemp("ckpt") / "official_tiny.pth"
    torch.save(ref.state_dict(), path)
    return path, ref


# --- checkpoints -----------------------------------------------------------------------

def test_official_state_dict_loads_unchanged(official_checkpoint):
    path, ref = official_checkpoint
    ours = sam_model_registry["vit_tiny"](checkpoint=str(path))
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


def test_our_state_dict_loads_into_the_official_classes():
    ours = sam_model_registry["vit_tiny"]()
    ref = reference_sam("vit_tiny")
    ref.load_state_dict(ours.state_dict(), strict=True)


def test_renamed_key_is_named_in_the_error(official_checkpoint, tmp_path):
    path, _ = official_checkpoint
    state = torch.load(path, weights_only=True)
    state["mask_decoder.iou_token.weight_renamed"] = state.pop("mask_decoder.iou_token.weight")
    bad = tmp_path / "renamed.pth"
    torch.save(state, bad)
    with pytest.raises(CheckpointError) as err:
        sam_model_registry["vit_tiny"](checkpoint=str(bad))
    message = str(err.value)
    assert ("mask_decoder.iou_token.weight_renamed" in message
            and "missing keys: mask_decoder.iou_token.weight" in message)
    assert str(bad) in message


def test_wrong_architecture_is_recognised(official_checkpoint):
    path, _ = official_checkpoint
    with pytest.raises(CheckpointError) as err:
        sam_model_registry["vit_b"](checkpoint=str(path))
    assert "does not fit vit_b" in str(err.value) and "looks like vit_tiny" in str(err.value)


def test_a_model_moves_to_another_input_size(official_checkpoint):
    """vit_tiny (256 px) -> vit_tiny_512: only the position tables are resampled, and
    only on request; the result is a plain official state dict at the new size."""
    from sam_core.checkpoint import load_checkpoint, resize_positions

    path, ref = official_checkpoint
    with pytest.raises(CheckpointError) as err:
        sam_model_registry["vit_tiny_512"](checkpoint=str(path))
    assert "image_encoder.pos_embed" in str(err.value) and "looks like vit_tiny (" in str(err.value)

    big = load_checkpoint(sam_model_registry["vit_tiny_512"](), path, "vit_tiny_512", resize=True)
    small_state, big_state = ref.state_dict(), big.state_dict()
    assert big_state["image_encoder.pos_embed"].shape == (1, 32, 32, 192)
    resized = {"image_encoder.pos_embed"} | {
        f"image_encoder.blocks.{i}.attn.rel_pos_{a}" for i in (2, 5) for a in "hw"}  # global attention
    for key in resized:
        assert big_state[key].shape != small_state[key].shape, key
    assert big_state["image_encoder.blocks.2.attn.rel_pos_h"].shape == (63, 64)
    for key, value in small_state.items():
        if key not in resized:  # windowed blocks' tables and every weight carry over unchanged
            assert torch.equal(big_state[key], value), key
    # Resampling keeps the table's values: the ends of the distance axis stay close.
    h_small, h_big = (small_state["image_encoder.blocks.5.attn.rel_pos_h"],
                      big_state["image_encoder.blocks.5.attn.rel_pos_h"])
    assert torch.allclose(h_big[31], h_small[15], atol=0.02)  # distance 0 sits in the middle of both
    assert resize_positions(dict(big_state), big) == []  # nothing to do at the same size

    from tests.sam_reference import official_sam
    official_sam("vit_tiny_512", big_state)  # loads strictly in the official classes
    from sam_core import SamPredictor

    predictor = SamPredictor(big)
    predictor.set_image(scene_image(300, 400))
    masks, scores, low = predictor.predict(box=np.array([50, 60, 200, 220]), multimask_output=False)
    assert masks.shape == (1, 300, 400) and low.shape == (1, 128, 128)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code-was-executed"
    bad = tmp_path / "evil.pth"
    with open(bad, "wb") as f:
        pickle.dump({"image_encoder.pos_embed": _Exploit(str(marker))}, f)
    with pytest.raises(CheckpointError, match="refused"):
        sam_model_registry["vit_tiny"](checkpoint=str(bad))
    assert not marker.exists()


def test_truncated_and_missing_files(official_checkpoint, tmp_path):
    path, _ = official_checkpoint
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        sam_model_registry["vit_tiny"](checkpoint=str(truncated))
    with pytest.raises(FileNotFoundError, match="sam_vit_h_4b8939.pth"):
        sam_model_registry["vit_h"](checkpoint=str(tmp_path / "nope.pth"))


# --- input images ----------------------------------------------------------------------

def test_image_conversions():
    rgb = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    assert as_rgb_uint8(rgb[:, :, 0]).shape == (7, 9, 3)
    assert np.array_equal(as_rgb_uint8(rgb[:, :, :1])[:, :, 2], rgb[:, :, 0])
    rgba = np.concatenate([rgb, np.full((7, 9, 1), 255, np.uint8)], axis=2)
    assert np.array_equal(as_rgb_uint8(rgba), rgb)
    assert np.array_equal(as_rgb_uint8(rgb.astype(np.uint16) * 257), rgb)
    view = rgb[:, ::-1]
    out = as_rgb_uint8(view)
    assert out.flags.c_contiguous and np.array_equal(out, view)


@pytest.mark.parametrize(
    "bad, reason",
    [
        (np.zeros((4, 4, 3), np.float32), "float32"),
        (np.zeros((4, 4, 3), bool), "bool"),
        (np.zeros((4, 4, 5), np.uint8), "channels"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
        (np.zeros((2, 4, 4, 3), np.uint8), "shape"),
        ([[1, 2], [3, 4]], "numpy array"),
    ],
)
def test_bad_images_are_refused_with_a_reason(bad, reason):
    with pytest.raises(ValueError, match=reason):
        as_rgb_uint8(bad)


@pytest.fixture(scope="module")
def tiny_model():
    return model_pair("vit_tiny", seed=0)[1]


@pytest.mark.parametrize("shape", [(3, 5, 3), (1, 1, 3), (24, 900, 3), (600, 16)])
def test_generator_accepts_tiny_and_wide_images(tiny_model, shape):
    image = scene_image(shape[0], shape[1], seed=2)
    if len(shape) == 2:
        image = image[:, :, 0]
    gen = SamAutomaticMaskGenerator(tiny_model, points_per_side=4, pred_iou_thresh=0, stability_score_thresh=0,
                                    output_mode="coco_rle", crop_n_layers=1)
    records = gen.generate(image)
    for r in records:
        assert r["segmentation"]["size"] == [shape[0], shape[1]]
        x, y, w, h = r["bbox"]
        assert 0 <= x <= x + w < shape[1] and 0 <= y <= y + h < shape[0]


def test_generator_refuses_float_images(tiny_model):
    with pytest.raises(ValueError, match="float64"):
        SamAutomaticMaskGenerator(tiny_model).generate(np.zeros((8, 8, 3)))


def test_max_mask_area_fraction_drops_large_masks(tiny_model):
    image = scene_image(120, 160, seed=3)
    settings = dict(points_per_side=6, pred_iou_thresh=0, stability_score_thresh=0, box_nms_thresh=1.0,
                    output_mode="coco_rle")
    everything = SamAutomaticMaskGenerator(tiny_model, **settings).generate(image)
    fraction = float(np.median([r["area"] for r in everything])) / image[..., 0].size
    kept = SamAutomaticMaskGenerator(tiny_model, max_mask_area_fraction=fraction, **settings).generate(image)
    limit = fraction * image[..., 0].size
    assert 0 < len(kept) < len(everything)
    assert all(r["area"] < limit for r in kept)
    assert len(kept) == sum(r["area"] < limit for r in everything)


def test_sa1b_preset():
    gen = SamAutomaticMaskGenerator.from_preset(sam_model_registry["vit_tiny"](), "sa1b", points_per_batch=16)
    assert (gen.crop_n_layers, gen.min_mask_region_area, gen.max_mask_area_fraction) == (2, 100, 0.95)
    assert [len(g) for g in gen.point_grids] == [32 * 32, 16 * 16, 8 * 8]
    assert gen.points_per_batch == 16 and gen.crop_overlap_ratio == 512 / 1500
    assert (gen.pred_iou_thresh, gen.stability_score_thresh, gen.box_nms_thresh) == (0.88, 0.95, 0.7)
    with pytest.raises(ValueError, match="unknown preset"):
        SamAutomaticMaskGenerator.from_preset(sam_model_registry["vit_tiny"](), "nope")


@pytest.mark.parametrize("preset", ["default", "sa1b", "sam2_dense"])
def test_generator_presets_agree_with_the_amg_configs(preset, compose_config):
    """The library's defaults and presets and conf/amg/<preset>.yaml must both exist (a
    drop-in API, a Hydra group): every setting of one is the same in the other."""
    import inspect

    signature = inspect.signature(SamAutomaticMaskGenerator.__init__).parameters
    library = {k: p.default for k, p in signature.items() if k not in ("self", "model", "output_mode")}
    library.update(AMG_PRESETS[preset])
    from pipeline.models.loader import PIPELINE_AMG_KEYS  # the mask verifier's keys: not the generator's

    conf = dict(compose_config("+stage=fully_auto", "output=/x", "model=vit_h", f"amg={preset}").amg)
    assert set(PIPELINE_AMG_KEYS) <= conf.keys()
    conf = {k: v for k, v in conf.items() if k not in PIPELINE_AMG_KEYS}
    if conf["pred_iou_thresh"] is None:  # the family's default: the library's, for SAM 1 models
        sam = sam_model_registry["vit_tiny"]()
        assert SamAutomaticMaskGenerator(sam, **conf).pred_iou_thresh == library["pred_iou_thresh"]
        conf["pred_iou_thresh"] = library["pred_iou_thresh"]
    assert conf.keys() == library.keys()
    assert conf == pytest.approx(library)


# --- run-length encoding ---------------------------------------------------------------

def test_rle_is_byte_identical_to_pycocotools_and_round_trips():
    rng = np.random.default_rng(0)
    masks = rng.random((5, 37, 53)) > 0.6
    masks[1] = True  # starts with a foreground run
    masks[2] = False
    ours = encode_rle(torch.as_tensor(masks))
    theirs = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for a, b, m in zip(ours, theirs, masks):
        assert a["counts"] == b["counts"] and list(a["size"]) == [37, 53]
        assert np.array_equal(decode_rle(a), m)
        assert area_from_rle(a) == m.sum()
        un = uncompressed_rle(m)
        assert sum(un["counts"]) == m.size and area_from_rle(un) == m.sum()
        assert mask_utils.frPyObjects(un, 37, 53)["counts"] == b["counts"]


def test_run_lengths_path_matches_pycocotools():
    """The accelerator path (run boundaries in torch, compression by pycocotools) gives
    the same bytes as encoding the masks directly; checked here on CPU tensors."""
    rng = np.random.default_rng(1)
    masks = rng.random((6, 19, 23)) > 0.5
    masks[0], masks[1], masks[2] = True, False, False
    masks[2][-1, -1] = True  # a single foreground pixel at the very end
    direct = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    via_runs = [mask_utils.frPyObjects(r, 19, 23) for r in run_lengths(torch.as_tensor(masks))]
    assert [r["counts"] for r in via_runs] == [r["counts"] for r in direct]


def test_the_generator_says_when_its_thresholds_drop_everything(caplog):
    """The shipped model at SAM's thresholds keeps no mask: the generator's counts say
    where they went and one warning names the thresholds; at its own thresholds it keeps
    masks and stays quiet."""
    from PIL import Image

    from sam_core import SamAutomaticMaskGenerator

    sam = sam_model_registry["vit_tiny_512"](checkpoint=str(REPO / "models" / "sam_vit_tiny_512_synthetic.pth"))
    image = np.asarray(Image.open(REPO / "sample" / "images" / "coffee.jpg").convert("RGB"))
    strict = SamAutomaticMaskGenerator(sam, points_per_side=8)
    assert strict.generate(image) == [] and strict.generate(image) == []
    assert strict.counts["candidates"] == 3 * 64 and strict.counts["passed_iou"] == 0
    assert caplog.text.count("no mask kept of 192 candidates") == 1  # once per generator
    assert "pred_iou_thresh=0.88" in caplog.text
    caplog.clear()
    own = SamAutomaticMaskGenerator(sam, points_per_side=8, pred_iou_thresh=0.4, stability_score_thresh=0.85)
    records = own.generate(image)
    assert records and own.counts["kept"] == len(records) <= own.counts["passed_stability"] <= own.counts["passed_iou"]
    assert "no mask kept" not in caplog.text
