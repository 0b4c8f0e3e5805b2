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
from sam_core.utils.amg import (
    area_from_rle,
    build_point_grid,
    decode_rle,
    encode_rle,
    run_lengths,
    uncompressed_rle,
)

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


# --- prompting: grid, adaptive, objects ----------------------------------------------


def _simple_scene() -> tuple[np.ndarray, list[np.ndarray]]:
    """Three discs and a rectangle on a plain background, with their masks."""
    h, w = 256, 320
    yy, xx = np.mgrid[:h, :w]
    image = np.full((h, w, 3), 200, np.uint8)
    objects = [(yy - 70) ** 2 + (xx - 80) ** 2 <= 35**2, (yy - 170) ** 2 + (xx - 230) ** 2 <= 45**2,
               (yy - 190) ** 2 + (xx - 70) ** 2 <= 30**2, (abs(yy - 60) < 30) & (abs(xx - 240) < 40)]
    for mask, colour in zip(objects, [(200, 30, 30), (30, 30, 200), (30, 160, 30), (220, 200, 20)]):
        image[mask] = colour
    return image, objects


@pytest.fixture(scope="module")
def shipped_model():
    return sam_model_registry["vit_tiny_512"](checkpoint=str(REPO / "models" / "sam_vit_tiny_512_synthetic.pth"))


def test_every_prompting_finds_every_object_deterministically_and_records_its_prompts(shipped_model):
    """grid, adaptive and objects (the true boxes as a detector's) each find all four
    objects of a simple scene (IoU >= 0.9), give the same records when run again, and
    record the prompt of each mask: a point of the grid, or (objects) the box, XYWH. The
    adaptive and box prompts cost fewer decoder prompts than the grid."""
    image, objects = _simple_scene()
    boxes = np.array([[np.nonzero(o)[1].min(), np.nonzero(o)[0].min(), np.nonzero(o)[1].max() + 1,
                       np.nonzero(o)[0].max() + 1] for o in objects], float)
    grid_points = {(float(x), float(y)) for x, y in build_point_grid(16) * np.array([320, 256])}
    prompts = {}
    for mode in ("grid", "adaptive", "objects"):
        gen = SamAutomaticMaskGenerator(shipped_model, points_per_side=16, pred_iou_thresh=0.4,
                                        stability_score_thresh=0.85, output_mode="coco_rle", prompting=mode)
        given = boxes if mode == "objects" else None
        records = gen.generate(image, boxes=given)
        prompts[mode] = gen.counts["prompts"]
        again = gen.generate(image, boxes=given)
        assert [(r["segmentation"]["counts"], r["point_coords"], r.get("prompt_box")) for r in records] == \
               [(r["segmentation"]["counts"], r["point_coords"], r.get("prompt_box")) for r in again]
        masks = [mask_utils.decode(r["segmentation"]).astype(bool) for r in records]
        best = [max((m & o).sum() / (m | o).sum() for m in masks) for o in objects]
        assert min(best) >= 0.9, (mode, best)
        for r in records:
            if "prompt_box" in r:
                x, y, w, h = r["prompt_box"]
                assert mode == "objects" and r["point_coords"] == [] and [x, y, x + w, y + h] in boxes.tolist()
            else:
                assert len(r["point_coords"]) == 1 and tuple(r["point_coords"][0]) in grid_points
        if mode == "objects":
            assert sum("prompt_box" in r for r in records) >= 1
    assert prompts["grid"] == 256 and prompts["adaptive"] < 256 / 2 and prompts["objects"] < prompts["adaptive"]


def test_prompting_refuses_what_it_cannot_use(shipped_model):
    image, _ = _simple_scene()
    with pytest.raises(ValueError, match="only with prompting='objects'"):
        SamAutomaticMaskGenerator(shipped_model, points_per_side=4).generate(image, boxes=np.zeros((1, 4)))
    with pytest.raises(ValueError, match="needs boxes="):
        SamAutomaticMaskGenerator(shipped_model, points_per_side=4, prompting="objects").generate(image)
    for bad in (np.array([[0, 0, np.nan, 4]]), np.zeros((4, 5)), np.zeros(8)):  # a score column; flat
        with pytest.raises(ValueError, match="N x 4 finite"):
            SamAutomaticMaskGenerator(shipped_model, points_per_side=4, prompting="objects").generate(image, boxes=bad)
    with pytest.raises(ValueError, match="not square"):
        SamAutomaticMaskGenerator(shipped_model, points_per_side=None, point_grids=[np.random.rand(5, 2)],
                                  prompting="adaptive")
    with pytest.raises(ValueError, match="Unknown prompting"):
        SamAutomaticMaskGenerator(shipped_model, prompting="everywhere")


def test_adaptive_prompts_small_grids_too(shipped_model):
    """A grid too small for the levels asked (a deep crop layer's) gets fewer levels, never
    no prompt at all."""
    image, _ = _simple_scene()
    for side, levels in ((1, 2), (2, 3), (4, 5)):
        gen = SamAutomaticMaskGenerator(shipped_model, points_per_side=side, prompting="adaptive",
                                        adaptive_levels=levels, pred_iou_thresh=0, stability_score_thresh=0)
        gen.generate(image)
        assert gen.counts["prompts"] >= 1, (side, levels)


def test_masks_made_a_few_at_a_time_are_the_same_masks(shipped_model):
    image, _ = _simple_scene()
    settings = dict(points_per_side=8, pred_iou_thresh=0, stability_score_thresh=0, output_mode="coco_rle")
    whole = SamAutomaticMaskGenerator(shipped_model, **settings).generate(image)
    few = SamAutomaticMaskGenerator(shipped_model, max_mask_memory_mb=1, **settings).generate(image)  # ~2 masks
    assert len(whole) > 20 and whole == few


def test_peak_memory_of_a_large_image_does_not_grow_with_its_masks(tmp_path):
    """A 2000x3000 image with a crop layer, every candidate kept (230 masks): the process
    grows by less than 400 MB with a 64 MB mask budget (all at once it grew by 2.5 GB).
    Measured in a fresh process: the peak resident size is per process."""
    import os
    import subprocess
    import sys

    script = tmp_path / "large.py"
    script.write_text(f"""
import resource, numpy as np, torch
torch.set_num_threads(1)
from sam_core import sam_model_registry, SamAutomaticMaskGenerator
sam = sam_model_registry["vit_tiny_512"](checkpoint={str(REPO / "models" / "sam_vit_tiny_512_synthetic.pth")!r})
image = np.repeat(np.repeat(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8), 50, 0), 50, 1)
gen = SamAutomaticMaskGenerator(sam, points_per_side=4, pred_iou_thresh=0, stability_score_thresh=0, crop_n_layers=1,
                                output_mode="coco_rle", max_mask_memory_mb=64)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad():
    records = gen.generate(image)
print(len(records), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
""")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=REPO, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    masks, grown_mb = out.stdout.split()
    assert int(masks) > 100 and float(grown_mb) < 400, out.stdout


@pytest.mark.parametrize("width,heads,n_prompts,shared_image",
                         [(128, 8, 5, True), (128, 8, 5, False), (256, 8, 3, False)])
def test_folded_cross_attention_equals_the_reference_form(width, heads, n_prompts, shared_image):
    """Inference folds the prompt side of the decoder's cross-attentions into the
    projections (transformer.Attention._few_keys / _few_queries); training keeps the
    reference form. Both must give the same numbers, for a shared image and per prompt."""
    from sam_core.modeling.transformer import Attention

    torch.manual_seed(0)
    attention = Attention(width, heads, downsample_rate=2).eval()
    with torch.no_grad():  # biases nonzero so that every folded bias term is exercised
        for linear in (attention.q_proj, attention.k_proj, attention.v_proj, attention.out_proj):
            linear.bias.normal_()
    image = torch.randn(1 if shared_image else n_prompts, 32 * 32, width)
    prompt = torch.randn(n_prompts, 7, width)
    per_prompt_image = image.expand(n_prompts, -1, -1)
    cases = [(image, prompt, prompt * 0.5), (prompt, per_prompt_image * 1.0, per_prompt_image + 1),
             (image, prompt[:1], prompt[:1]), (prompt[:1], per_prompt_image * 1.0, per_prompt_image)]  # batches of 1
    for q, k, v in cases:
        with torch.enable_grad():
            reference = attention(q, k, v).detach()
        with torch.no_grad():
            folded = attention(q, k, v)
        assert folded.shape == reference.shape
        assert torch.allclose(folded, reference, atol=1e-5, rtol=1e-4), (folded - reference).abs().max()
