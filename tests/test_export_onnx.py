"""The ONNX decoder (sam_core.utils.onnx) against the PyTorch predictor, with onnxruntime.

Masks must agree on at least 99.9% of pixels and IoU predictions within 1e-3, for
points, boxes, mask inputs and several prompt counts; on random weights and on the
shipped default model.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from pipeline.truth.synthetic import make_scene
from sam_core import SamPredictor, sam_model_registry
from sam_core.tools.export_onnx import main as export_main
from sam_core.utils.onnx import LOW_RES_INPUT_NAMES, upscale_low_res

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models" / "sam_vit_tiny_512_synthetic.pth"
PIXEL_AGREEMENT, IOU_TOLERANCE = 0.999, 1e-3


def _exported(tmp_path_factory, arch: str, checkpoint: Path | None, *extra: str):
    path = tmp_path_factory.mktemp("onnx") / f"{arch}.onnx"
    weights = ["--checkpoint", str(checkpoint)] if checkpoint else ["--random-weights"]
    assert export_main(["--arch", arch, *weights, "--output", str(path), *extra]) == 0
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A non-square synthetic scene, so that padding and cropping are exercised."""
    return make_scene(7, (300, 420)).image


SAM2_SIZE = 256  # SAM 2.1 Hiera-T at a smaller input on both sides, for time


@pytest.fixture(scope="module", params=["random_vit_tiny", "default_model", "random_sam2.1_hiera_t"])
def model(request, tiny_checkpoint, tmp_path_factory, image):
    """(predictor with the image set, onnxruntime session of the same model)."""
    if request.param == "random_sam2.1_hiera_t":
        from .sam_reference import official_sam2, save_official_sam2

        checkpoint = save_official_sam2(official_sam2("sam2.1_hiera_t", SAM2_SIZE),
                                        tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_t.pt")
        predictor = SamPredictor(sam_model_registry["sam2.1_hiera_t"](checkpoint=checkpoint, image_size=SAM2_SIZE))
        predictor.set_image(image)
        return predictor, _exported(tmp_path_factory, "sam2.1_hiera_t", checkpoint, "--image-size", str(SAM2_SIZE))
    arch, checkpoint = (("vit_tiny", tiny_checkpoint) if request.param == "random_vit_tiny"
                        else ("vit_tiny_512", DEFAULT_MODEL))
    predictor = SamPredictor(sam_model_registry[arch](checkpoint=str(checkpoint)))
    predictor.set_image(image)
    return predictor, _exported(tmp_path_factory, arch, checkpoint)


def run_onnx(session, predictor, points=None, labels=None, box=None, mask_input=None, embedding=None,
             high_res=None):
    """The official calling convention: coordinates in the resized frame, box corners as
    labels 2 and 3, one padding point (-1) when there is no box (SAM 2: always); SAM 2's
    graph also takes the image's high-resolution maps."""
    h, w = predictor.original_size
    sam2 = predictor.model.family == "sam2"
    coords, lbls = np.zeros((0, 2)), np.zeros(0)
    if points is not None:
        coords, lbls = np.asarray(points, float), np.asarray(labels, float)
    if box is not None:
        coords = np.concatenate([np.asarray(box, float).reshape(2, 2), coords] if sam2 else
                                [coords, np.asarray(box, float).reshape(2, 2)])
        lbls = np.concatenate([[2, 3], lbls] if sam2 else [lbls, [2, 3]])
    if box is None or sam2:
        coords = np.concatenate([coords, [[0.0, 0.0]]])
        lbls = np.concatenate([lbls, [-1]])
    coords = predictor.transform.apply_coords(coords, (h, w))
    if embedding is None:
        embedding = predictor.get_image_embedding().numpy()
    side = 4 * predictor.model.prompt_encoder.image_embedding_size[0]
    maps = {}
    if sam2:
        high_res = high_res or [level.numpy() for level in predictor.get_high_res_features()]
        maps = {"high_res_feats_0": high_res[0].astype(np.float32), "high_res_feats_1": high_res[1].astype(np.float32)}
    feeds = {
        "image_embeddings": embedding.astype(np.float32),
        **maps,
        "point_coords": coords[None].astype(np.float32),
        "point_labels": lbls[None].astype(np.float32),
        "mask_input": (np.zeros((1, 1, side, side)) if mask_input is None else mask_input[None]).astype(np.float32),
        "has_mask_input": np.array([0.0 if mask_input is None else 1.0], np.float32),
        "orig_im_size": np.array([h, w], np.float32),
    }
    masks, scores, low_res = session.run(None, feeds)
    return masks[0] > 0, scores[0], low_res[0]


def assert_agree(onnx_masks, onnx_scores, torch_masks, torch_scores):
    assert onnx_masks.shape == torch_masks.shape
    agreement = (onnx_masks == torch_masks).mean()
    assert agreement >= PIXEL_AGREEMENT, f"masks agree on only {agreement:.5f} of pixels"
    np.testing.assert_allclose(onnx_scores, torch_scores, atol=IOU_TOLERANCE)


CASES = {
    "one_click": dict(points=[[150, 120]], labels=[1]),
    "three_clicks": dict(points=[[150, 120], [60, 200], [300, 40]], labels=[1, 0, 1]),
    "six_clicks": dict(points=[[150, 120], [60, 200], [300, 40], [10, 10], [410, 290], [200, 150]],
                       labels=[1, 0, 1, 0, 0, 1]),
    "box": dict(box=[40, 30, 260, 220]),
    "box_and_clicks": dict(points=[[150, 120], [60, 200]], labels=[1, 0], box=[40, 30, 260, 220]),
}


def predict_kwargs(prompt: dict) -> dict:
    """A CASES prompt as SamPredictor.predict's keyword arguments."""
    return dict(point_coords=np.array(prompt["points"]) if "points" in prompt else None,
                point_labels=np.array(prompt["labels"]) if "points" in prompt else None,
                box=np.array(prompt["box"]) if "box" in prompt else None)


@pytest.mark.parametrize("case", sorted(CASES))
def test_onnx_matches_pytorch(model, case):
    predictor, session = model
    prompt = CASES[case]
    masks, scores, _ = run_onnx(session, predictor, **prompt)
    kwargs = predict_kwargs(prompt)
    multi, multi_scores, _ = predictor.predict(**kwargs, multimask_output=True)
    single, single_scores, _ = predictor.predict(**kwargs, multimask_output=False)
    # ONNX output 0 is the single-mask token, 1..3 the ambiguity-aware ones.
    assert_agree(masks[1:], scores[1:], multi, multi_scores)
    assert_agree(masks[:1], scores[:1], single, single_scores)


def test_onnx_mask_input_matches_pytorch(model):
    """A refinement click with the previous low-res logits fed back as mask input."""
    predictor, session = model
    _, first_scores, first_low = predictor.predict(np.array([[150, 120]]), np.array([1]), multimask_output=True)
    previous = first_low[int(np.argmax(first_scores))][None]
    points, labels = np.array([[150, 120], [80, 60]]), np.array([1, 0])
    masks, scores, low_res = run_onnx(session, predictor, points, labels, mask_input=previous)
    ref, ref_scores, ref_low = predictor.predict(points, labels, mask_input=previous, multimask_output=False)
    assert_agree(masks[:1], scores[:1], ref, ref_scores)
    np.testing.assert_allclose(low_res[0], ref_low[0], atol=1e-3)
    # The mask input really is used: without it the answer differs.
    no_mask, _, _ = predictor.predict(points, labels, multimask_output=False)
    assert (no_mask != ref).any()


def test_float16_embedding_keeps_parity(model):
    """The server sends embeddings as float16; the decoder's answer must not change."""
    predictor, session = model
    def half(x):
        return x.numpy().astype(np.float16).astype(np.float32)

    embedding = half(predictor.get_image_embedding())
    high_res = [half(level) for level in predictor.get_high_res_features() or []]  # SAM 2's maps, also float16
    for case in ("one_click", "three_clicks", "box"):
        full_masks, full_scores, _ = run_onnx(session, predictor, **CASES[case])
        half_masks, half_scores, _ = run_onnx(session, predictor, **CASES[case], embedding=embedding,
                                              high_res=high_res or None)
        assert_agree(half_masks, half_scores, full_masks, full_scores)


def test_return_single_mask(tiny_checkpoint, tmp_path_factory, image):
    """One prompt: the best ambiguity-aware mask; several: the single-mask output."""
    predictor = SamPredictor(sam_model_registry["vit_tiny"](checkpoint=str(tiny_checkpoint)))
    predictor.set_image(image)
    session = _exported(tmp_path_factory, "vit_tiny", tiny_checkpoint, "--return-single-mask")
    masks, scores, _ = run_onnx(session, predictor, **CASES["one_click"])
    multi, multi_scores, _ = predictor.predict(np.array([[150, 120]]), np.array([1]))
    best = int(np.argmax(multi_scores))
    assert_agree(masks, scores, multi[best : best + 1], multi_scores[best : best + 1])
    masks, scores, _ = run_onnx(session, predictor, **CASES["three_clicks"])
    prompt = CASES["three_clicks"]
    single, single_scores, _ = predictor.predict(np.array(prompt["points"]), np.array(prompt["labels"]),
                                                 multimask_output=False)
    assert_agree(masks, scores, single, single_scores)


def test_sam2_return_single_mask_counts_prompts(tmp_path_factory, image):
    """SAM 2 always pads, so one box (2 corners + padding) and two clicks (+ padding) both
    have three points: the graph tells them apart by their labels."""
    from .sam_reference import official_sam2, save_official_sam2

    checkpoint = save_official_sam2(official_sam2("sam2.1_hiera_t", SAM2_SIZE), tmp_path_factory.mktemp("s") / "m.pt")
    predictor = SamPredictor(sam_model_registry["sam2.1_hiera_t"](checkpoint=checkpoint, image_size=SAM2_SIZE))
    predictor.set_image(image)
    session = _exported(tmp_path_factory, "sam2.1_hiera_t", checkpoint, "--image-size", str(SAM2_SIZE),
                        "--return-single-mask")
    for case, one_prompt in (("one_click", True), ("box", True), ("three_clicks", False), ("box_and_clicks", False)):
        prompt = CASES[case]
        masks, scores, _ = run_onnx(session, predictor, **prompt)
        kwargs = predict_kwargs(prompt)
        multi, multi_scores, _ = predictor.predict(**kwargs, multimask_output=True)
        if one_prompt:
            best = int(np.argmax(multi_scores))
            assert_agree(masks, scores, multi[best : best + 1], multi_scores[best : best + 1])
        else:
            single, single_scores, _ = predictor.predict(**kwargs, multimask_output=False)
            assert_agree(masks, scores, single, single_scores)


def test_vit_b_export_on_random_weights(tmp_path_factory):
    """The official models' sizes: a 256 x 64 x 64 embedding, 256 x 256 low-res masks."""
    torch.manual_seed(0)
    session = _exported(tmp_path_factory, "vit_b", None)
    shapes = {i.name: i.shape for i in session.get_inputs()}
    assert shapes["image_embeddings"] == [1, 256, 64, 64]
    assert shapes["point_coords"][1] == "num_points"
    feeds = {
        "image_embeddings": np.random.default_rng(0).normal(size=(1, 256, 64, 64)).astype(np.float32),
        "point_coords": np.array([[[500, 400], [0, 0]]], np.float32),
        "point_labels": np.array([[1, -1]], np.float32),
        "mask_input": np.zeros((1, 1, 256, 256), np.float32),
        "has_mask_input": np.array([0], np.float32),
        "orig_im_size": np.array([1500, 2000], np.float32),
    }
    masks, scores, low_res = session.run(None, feeds)
    assert masks.shape == (1, 4, 1500, 2000) and scores.shape == (1, 4) and low_res.shape == (1, 4, 256, 256)


def test_export_refuses_missing_weights(tmp_path):
    with pytest.raises(SystemExit):
        export_main(["--arch", "vit_tiny", "--output", str(tmp_path / "x.onnx")])
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        export_main(["--arch", "vit_tiny", "--checkpoint", str(tmp_path / "none.pth"),
                     "--output", str(tmp_path / "x.onnx")])


def test_low_res_graph_and_its_upscaling_match_pytorch(tmp_path_factory, image):
    """The annotation tool's graph: no orig_im_size, no masks; upscale_low_res of its
    low-res logits gives the predictor's masks."""
    predictor = SamPredictor(sam_model_registry["vit_tiny_512"](checkpoint=str(DEFAULT_MODEL)))
    predictor.set_image(image)
    session = _exported(tmp_path_factory, "vit_tiny_512", DEFAULT_MODEL, "--low-res-only")
    assert [i.name for i in session.get_inputs()] == list(LOW_RES_INPUT_NAMES)
    assert [o.name for o in session.get_outputs()] == ["iou_predictions", "low_res_masks"]
    for case in ("one_click", "six_clicks", "box_and_clicks"):
        prompt = CASES[case]
        coords, labels = np.zeros((0, 2)), np.zeros(0)
        if "points" in prompt:
            coords, labels = np.array(prompt["points"], float), np.array(prompt["labels"], float)
        if "box" in prompt:
            coords, labels = (np.concatenate([coords, np.reshape(prompt["box"], (2, 2))]),
                              np.concatenate([labels, [2, 3]]))
        else:
            coords, labels = np.concatenate([coords, [[0, 0]]]), np.concatenate([labels, [-1]])
        feeds = {"image_embeddings": predictor.get_image_embedding().numpy(),
                 "point_coords": (predictor.transform.apply_coords(coords, predictor.original_size)[None]
                                  .astype(np.float32)),
                 "point_labels": labels[None].astype(np.float32), "mask_input": np.zeros((1, 1, 128, 128), np.float32),
                 "has_mask_input": np.zeros(1, np.float32)}
        scores, low_res = session.run(None, feeds)
        masks = upscale_low_res(torch.from_numpy(low_res[0]), 512, predictor.original_size).numpy() > 0
        kwargs = dict(point_coords=np.array(prompt["points"]) if "points" in prompt else None,
                      point_labels=np.array(prompt["labels"]) if "points" in prompt else None,
                      box=np.array(prompt["box"]) if "box" in prompt else None)
        multi, multi_scores, _ = predictor.predict(**kwargs, multimask_output=True)
        assert_agree(masks[1:], scores[0, 1:], multi, multi_scores)
