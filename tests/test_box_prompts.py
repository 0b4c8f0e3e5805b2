"""Box prompts: the batched predictor function and the refinement rule (sam_core), box
files and their matching to the input, the coordinate frames (EXIF rotation, resizing),
and the box_prompts stage end to end on real Ray with the shipped model (its mIoU
against the eval stage's box mIoU), a killed run resumed, and the COCO export."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image

from pipeline.dataset import manifest
from pipeline.inputs import box_files
from pipeline.inputs.entries import Entry, InputError
from pipeline.inputs.images import prepare_image
from pipeline.stages import run_stage
from pipeline.truth.synthetic import coco_instances, make_scene, scene_seeds
from sam_core import SamPredictor, sam_model_registry
from sam_core.box_prompts import box_iou, predict_boxes, refine_boxes
from tests.conftest import REPO, encode
from tests.test_fully_auto import check_dataset

DEFAULT_MODEL = REPO / "models" / "sam_vit_tiny_512_synthetic.pth"


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    sam = sam_model_registry["vit_tiny"]().eval()
    scene = make_scene(3, (96, 128))
    p = SamPredictor(sam)
    p.set_image(scene.image)
    return p, scene


# --- sam_core ------------------------------------------------------------------------

def test_batched_boxes_answer_as_one_box_at_a_time(predictor):
    p, scene = predictor
    boxes = scene.boxes_xyxy() + np.array([0, 0, 1, 1], np.float32)
    single = predict_boxes(p, boxes, boxes_per_batch=3, upsample_batch=2)
    assert len(single) == len(boxes) and (single.chosen == 0).all()
    for i, box in enumerate(boxes):
        masks, iou, _ = p.predict(box=box, multimask_output=False)
        assert (mask_utils.decode(single.rles[i]).astype(bool) == masks[0]).all()
        assert single.predicted_iou[i] == pytest.approx(iou[0], abs=1e-5)
        ys, xs = np.nonzero(masks[0])
        extent = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if len(xs) else [0, 0, 0, 0]
        assert single.mask_boxes[i].tolist() == extent and single.areas[i] == masks[0].sum()

    multi = predict_boxes(p, boxes, multimask_output=True)
    for i, box in enumerate(boxes):
        masks, iou, _ = p.predict(box=box, multimask_output=True)
        best = int(np.argmax(iou))
        assert multi.chosen[i] == best and multi.predicted_iou[i] == pytest.approx(iou.max(), abs=1e-5)
        assert (mask_utils.decode(multi.rles[i]).astype(bool) == masks[best]).all()


def test_points_per_box_are_prompts_and_minus_one_pads(predictor):
    p, scene = predictor
    boxes = scene.boxes_xyxy()[:3] + np.array([0, 0, 1, 1], np.float32)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    answer = predict_boxes(p, boxes, centres[:, None], np.ones((3, 1), np.int64))
    for i in range(3):
        masks, _, _ = p.predict(point_coords=centres[i : i + 1], point_labels=np.array([1]), box=boxes[i],
                                multimask_output=False)
        assert (mask_utils.decode(answer.rles[i]).astype(bool) == masks[0]).all()
    padded = np.concatenate([centres[:, None], np.zeros((3, 1, 2), np.float32)], axis=1)
    labels = np.array([[1, -1], [1, 1], [1, -1]])
    assert len(predict_boxes(p, boxes, padded, labels)) == 3
    with pytest.raises(ValueError, match="NxKx2"):
        predict_boxes(p, boxes, padded, labels[:2])
    assert len(predict_boxes(p, np.zeros((0, 4)))) == 0


def test_refinement_trusts_only_good_masks_inside_the_margin():
    prompt = np.array([[10, 10, 110, 60]] * 6, float)
    extent = np.array([
        [20, 15, 100, 55],    # trusted: inside the box
        [5, 8, 115, 64],      # trusted: spills by 5 px < 10% of the width (10) and 4 px < 5
        [20, 15, 100, 55],    # predicted IoU too low
        [20, 15, 100, 55],    # stability too low
        [20, 15, 130, 55],    # spills 20 px on the right: something else
        [0, 0, 0, 0],         # empty mask
    ], float)
    iou = np.array([0.9, 0.9, 0.3, 0.9, 0.9, 0.9])
    stability = np.array([0.95, 0.95, 0.95, 0.5, 0.95, 0.95])
    boxes, trusted = refine_boxes(prompt, extent, iou, stability, 0.5, 0.8, margin=0.1)
    assert trusted.tolist() == [True, True, False, False, False, False]
    assert (boxes[trusted] == extent[trusted]).all() and (boxes[~trusted] == prompt[~trusted]).all()
    assert box_iou([[0, 0, 10, 10], [0, 0, 10, 10]], [[5, 0, 15, 10], [20, 20, 30, 30]]).tolist() == [1 / 3, 0.0]


# --- frames ----------------------------------------------------------------------------

@pytest.mark.parametrize("orientation", range(1, 9))
def test_boxes_follow_exif_rotation_and_resizing_into_the_stored_image(orientation):
    raw = np.full((60, 90, 3), 30, np.uint8)
    raw[10:25, 50:80] = (250, 250, 250)  # pixels x 50..79, y 10..24 of the decoded image
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(raw), "JPEG", quality=100, exif=exif)
    prepared = prepare_image(data, short_side=40)  # resized too
    assert prepared.orientation == orientation and prepared.original_size == (90, 60)
    stored = (prepared.width, prepared.height)
    bright = prepared.rgb.mean(-1) > 140
    ys, xs = np.nonzero(bright)
    truth = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    raw_row = {"x0": 50.0, "y0": 10.0, "x1": 80.0, "y1": 25.0, "normalized": False, "frame_width": 90,
               "frame_height": 60}
    assert box_files.stored_boxes(raw_row, (90, 60), orientation, stored, "raw") == pytest.approx(truth, abs=1.5)
    if orientation >= 5:  # a quarter turn: the declared size tells the frame
        assert box_files.stored_boxes(raw_row, (90, 60), orientation, stored) == pytest.approx(truth, abs=1.5)
    # The same box given in the frame as shown, found by its declared size.
    upright = np.asarray(Image.fromarray(raw).transpose(_TRANSPOSE[orientation]) if orientation > 1
                         else Image.fromarray(raw))
    ys, xs = np.nonzero(upright.mean(-1) > 140)
    h, w = upright.shape[:2]
    shown_row = {"x0": float(xs.min()), "y0": float(ys.min()), "x1": xs.max() + 1.0, "y1": ys.max() + 1.0,
                 "normalized": False, "frame_width": w, "frame_height": h}
    assert box_files.stored_boxes(shown_row, (90, 60), orientation, stored) == pytest.approx(truth, abs=1.5)
    assert (box_files.raw_mask_to_upright(raw[..., 0] > 140, orientation) == (upright[..., 0] > 140)).all()


_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def test_a_declared_size_of_another_shape_is_refused_and_a_scaled_one_is_scaled():
    row = {"x0": 10.0, "y0": 10.0, "x1": 20.0, "y1": 20.0, "normalized": False, "frame_width": 50, "frame_height": 50}
    with pytest.raises(ValueError, match="50x50"):
        box_files.stored_boxes(row, (200, 100), 1, (200, 100))
    scaled = {**row, "frame_width": 100, "frame_height": 50}  # a detector ran on a half-size copy
    assert box_files.stored_boxes(scaled, (200, 100), 1, (200, 100)).tolist() == [20, 20, 40, 40]
    yolo = {"x0": 0.25, "y0": 0.5, "x1": 0.75, "y1": 1.5, "normalized": True, "frame_width": 0, "frame_height": 0}
    assert box_files.stored_boxes(yolo, (200, 100), 6, (100, 200)).tolist() == [25, 100, 75, 200]  # clipped


# --- box files -------------------------------------------------------------------------

def _entries(*names: str, root: str = "/data/images") -> list[Entry]:
    return [Entry(n, f"{root}/{n}") for n in names]


def test_coco_boxes_are_read_and_matched_and_every_mismatch_is_reported(tmp_path):
    coco = {
        "images": [{"id": 1, "file_name": "a/one.jpg", "width": 64, "height": 48},
                   {"id": 2, "file_name": "./two.jpg", "width": 64, "height": 48},
                   {"id": 3, "file_name": "nowhere.jpg", "width": 64, "height": 48}],
        "annotations": [
            {"id": 10, "image_id": 1, "bbox": [1, 2, 10, 20], "category_id": 3, "score": 0.9, "iscrowd": 0},
            {"id": 11, "image_id": 1, "bbox": [1, 2, 0, 20], "category_id": 3},          # no area
            {"id": 12, "image_id": 1, "bbox": [5, 5, 10, 10], "category_id": 3, "iscrowd": 1},
            {"id": 13, "image_id": 9, "bbox": [5, 5, 10, 10], "category_id": 3},          # unknown image
            {"id": 14, "image_id": 3, "bbox": [5, 5, 10, 10]},
        ],
        "categories": [{"id": 3, "name": "cat"}],
    }
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps(coco))
    boxes = box_files.load(str(path))
    assert boxes.kind == "coco" and boxes.crowd == 1 and boxes.categories == [{"id": 3, "name": "cat"}]
    assert (len(boxes.invalid) == 2 and any("id 11" in r for r in boxes.invalid)
            and any("image id 9" in r for r in boxes.invalid))
    rows = boxes.table.to_pylist()
    one = [r for r in rows if r["name"] == "a/one.jpg"]
    assert [(r["x0"], r["y0"], r["x1"], r["y1"], r["category_id"], r["score"], r["prompt_id"]) for r in one] == [
        (1, 2, 11, 22, 3, 0.9, 10)]
    assert [r["x0"] for r in rows if r["name"] == "two.jpg"] == [None]  # looked at, nothing found
    matching = box_files.match(boxes, _entries("a/one.jpg", "two.jpg", "three.jpg"))
    assert [e.name for e in matching.entries] == ["a/one.jpg", "two.jpg"]
    assert [e.name for e in matching.unnamed] == ["three.jpg"] and matching.missing == ["nowhere.jpg"]
    with pytest.raises(InputError, match="not a COCO instances JSON"):
        (tmp_path / "bad.json").write_text("[]")
        box_files.load(str(tmp_path / "bad.json"))


def test_yolo_labels_match_by_stem_and_by_yolo_s_images_labels_rule(tmp_path):
    labels = tmp_path / "data" / "labels" / "train"
    labels.mkdir(parents=True)
    (labels / "cat.txt").write_text("2 0.5 0.5 0.2 0.4\n0 0.1 0.1 0.1 0.1 0.75\n"
                                    "7 0.5 0.5 0.2 0.2 0.4 0.4 2 0.6 0.6 0\n")
    (labels / "empty.txt").write_text("")
    (labels / "bad.txt").write_text("0 0.5 0.5\nx y z w h\n")
    boxes = box_files.load(str(tmp_path / "data" / "labels"))
    rows = [r for r in boxes.table.to_pylist() if r["name"] == "train/cat"]
    assert [r["category_id"] for r in rows] == [2, 0, 7] and [r["score"] for r in rows] == [None, 0.75, None]
    assert rows[0]["normalized"] and rows[0]["x0"] == pytest.approx(0.4) and rows[0]["y1"] == pytest.approx(0.7)
    assert rows[2]["keypoints"] == [0.4, 0.4, 2.0, 0.6, 0.6, 0.0]
    assert len(boxes.invalid) == 2 and {c["id"] for c in boxes.categories} == {0, 2, 7}
    images = str(tmp_path / "data" / "images")
    by_stem = box_files.match(boxes, _entries("train/cat.jpg", "train/empty.png", "train/dog.jpg", root=images))
    assert [e.name for e in by_stem.entries] == ["train/cat.jpg", "train/empty.png"]
    whole = box_files.match(boxes, _entries("images/train/cat.jpg", root=str(tmp_path / "data")))
    assert [e.name for e in whole.entries] == ["images/train/cat.jpg"]  # input=data, boxes=data/labels
    assert sorted(whole.missing) == ["train/bad", "train/empty"]


def test_parquet_boxes_with_category_names_and_an_image_without_boxes(tmp_path):
    table = pa.table({"file_name": ["x.jpg", "x.jpg", "y.jpg"], "x": [1.0, 2.0, None], "y": [1.0, 2.0, None],
                      "w": [5.0, 6.0, None], "h": [5.0, 6.0, None], "category": ["dog", "cat", None],
                      "score": [0.5, 0.6, None]})
    pq.write_table(table, tmp_path / "boxes.parquet")
    boxes = box_files.load(str(tmp_path / "boxes.parquet"))
    assert [c["name"] for c in boxes.categories] == ["cat", "dog"]
    assert [(r["name"], r["category_id"], r["x1"]) for r in boxes.table.to_pylist()] == [
        ("x.jpg", 2, 6.0), ("x.jpg", 1, 8.0), ("y.jpg", 1, None)]
    pq.write_table(pa.table({"file_name": ["x.jpg"]}), tmp_path / "nobox.parquet")
    with pytest.raises(InputError, match="bbox"):
        box_files.load(str(tmp_path / "nobox.parquet"))
    with pytest.raises(InputError, match="does not exist"):
        box_files.load(str(tmp_path / "missing.json"))


# --- the stage ---------------------------------------------------------------------------

def synthetic_input(root: Path, count: int, size=(256, 320), start: int = 0) -> tuple[Path, Path, list]:
    """Held-out synthetic scenes as PNGs and a COCO file of their exact boxes and masks."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    scenes = [make_scene(s, size) for s in scene_seeds("test", start, count)]
    names = [f"scene{i:02d}.png" for i in range(count)]
    for scene, name in zip(scenes, names):
        Image.fromarray(scene.image).save(root / "images" / name)
    (root / "boxes.json").write_text(json.dumps(coco_instances(scenes, names)))
    return root / "images", root / "boxes.json", scenes


def box_args(inp, boxes, out, *extra: str) -> list[str]:
    return ["+stage=box_prompts", f"input={inp}", f"output={out}", f"stage.boxes={boxes}", "cluster.num_cpus=2", *extra]


def test_box_prompted_miou_matches_the_eval_stage_and_the_export_has_categories(compose_config, tmp_path, ray_local):
    inp, boxes, scenes = synthetic_input(tmp_path, 6)
    (inp / "extra.png").write_bytes(encode(Image.fromarray(scenes[0].image), "PNG"))  # the box file names it not
    (inp / "empty.png").write_bytes(encode(Image.fromarray(scenes[1].image), "PNG"))  # named, with no box
    coco = json.loads(boxes.read_text())
    coco["images"].append({"id": 99, "file_name": "empty.png", "width": 320, "height": 256})
    coco["images"].append({"id": 98, "file_name": "gone.png", "width": 320, "height": 256})
    boxes.write_text(json.dumps(coco))
    out = tmp_path / "out"
    summary = run_stage(compose_config(*box_args(inp, boxes, out, "stage.refine_boxes=true")))
    report = summary["boxes"]
    n_boxes = sum(len(s.masks) for s in scenes)
    assert summary["images_ok"] == 7 and report["images_not_named"] == {"count": 1, "examples": ["extra.png"]}
    assert report["without_boxes"] == {"count": 1, "examples": ["empty.png"]}
    assert report["not_in_input"] == {"count": 1, "examples": ["gone.png"]}
    assert report["given"] == report["masks"] == report["gt"]["masks"] == n_boxes and report["outside_image"] == 0
    assert sum(report["gt"][s]["masks"] for s in ("small", "medium", "large")) == n_boxes

    evaluated = run_stage(compose_config(  # the eval stage itself, on the same scenes and model
        "+stage=eval", f"output={tmp_path / 'eval'}", "stage.num_images=6", "stage.size=[256,320]",
        "stage.max_masks_per_image=1000", "stage.clicks=[1]", "stage.amg.points_per_side=2"))
    assert evaluated["masks"] == n_boxes
    assert abs(report["gt"]["miou"] - evaluated["box_miou"]) < 0.02, (report["gt"], evaluated["box_miou"])

    records = _records(out)
    categories = {a["category_id"] for r in records for a in r["annotations"]}
    assert categories <= {c["id"] for c in json.loads((out / "categories.json").read_text())}
    assert sorted(len(r["annotations"]) for r in records)[0] == 0, "the image with no box is kept, with no mask"
    ann = next(r for r in records if r["annotations"])["annotations"][0]
    assert {"category_id", "prompt_id", "prompt_box", "box", "box_source", "gt_iou"} <= set(ann)
    refined = [a for r in records for a in r["annotations"] if a["box_source"] == "mask"]
    assert 0 < len(refined) == report["refined"]
    for a in refined:  # a refined box is its mask's extent
        x, y, w, h = mask_utils.toBbox(a["segmentation"]).tolist()
        assert a["box"] == pytest.approx([x, y, w, h])
    kept = [a for r in records for a in r["annotations"] if a["box_source"] == "detector"]
    assert kept and all(a["box"] == a["prompt_box"] for a in kept), "an untrusted box is kept as given"

    exported = run_stage(compose_config("+stage=export_coco", f"input={out}"))
    from pycocotools.coco import COCO

    coco = COCO(exported["path"])
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} >= {"polygon", "blob"}
    assert sorted({a["category_id"] for a in coco.dataset["annotations"]}) == sorted(categories)
    by_id = {a["id"]: a for r in records for a in r["annotations"]}
    assert all(a["bbox"] == pytest.approx(by_id[a["id"]]["box"]) for a in coco.dataset["annotations"])


def kill_mid_run(args: list[str], out: Path, tmp_path: Path, condition) -> None:
    """Runs ``python -m pipeline.run *args`` and SIGKILLs it and all its processes (Ray
    included) once ``condition()`` holds, as a crashed or preempted job would stop."""
    from tests.test_fully_auto import _descendants, _wait_for

    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.run", *args, f"hydra.run.dir={tmp_path / 'hydra'}"],
                              cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    family: set[int] = set()
    try:
        def reached():
            family.update(p.pid for p in _descendants(driver.pid))
            return condition() or driver.poll() is not None

        _wait_for(reached, 240, "the run to get mid-way")
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()
        family.update(p.pid for p in _descendants(driver.pid))
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        for pid in family | {driver.pid}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()


def _records(out: Path) -> list[dict]:
    from pipeline.dataset.listing import iter_samples

    return [s.record for s in iter_samples(str(out), images=False)]


def test_no_input_image_named_fails_before_writing(compose_config, tmp_path):
    inp, boxes, _ = synthetic_input(tmp_path, 1)
    (inp / "scene00.png").rename(inp / "renamed.png")
    with pytest.raises(InputError, match="names none of the 1 images"):
        run_stage(compose_config(*box_args(inp, boxes, tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_killed_run_resumed_gives_every_image_once(compose_config, tmp_path, tiny_checkpoint, ray_local):
    inp, boxes, scenes = synthetic_input(tmp_path, 8, size=(64, 80))
    out = tmp_path / "out"
    args = box_args(inp, boxes, out, "model=vit_tiny", f"model.checkpoint={tiny_checkpoint}", "stage.images_per_unit=1",
                    "stage.num_actors=1")
    kill_mid_run(args, out, tmp_path, lambda: len(manifest.committed_units(str(out))) >= 2)
    done = len(manifest.committed_units(str(out)))
    assert 2 <= done < 8, "the run was stopped mid-way"
    summary = run_stage(compose_config(*args))
    assert summary["units_skipped"] == done and summary["units_committed"] == 8 - done
    records = check_dataset(out, str(inp))
    assert len(records) == 8 and summary["boxes"]["masks"] == sum(len(s.masks) for s in scenes)
    with pytest.raises(Exception, match="boxes_sha256"):  # another box file: another dataset
        boxes.write_text(boxes.read_text().replace('"category_id": 1', '"category_id": 2'))
        run_stage(compose_config(*args))


def test_refinement_with_the_shipped_model_improves_loose_and_shifted_boxes():
    """The measurement of docs/prompt_stages.md, small: held-out scenes, boxes jittered as
    a detector errs, refined with the shipped thresholds."""
    from omegaconf import OmegaConf

    from pipeline.truth.synthetic import detector_boxes

    conf = OmegaConf.load(REPO / "conf" / "stage" / "box_prompts.yaml").refine
    predictor = SamPredictor(sam_model_registry["vit_tiny_512"](checkpoint=str(DEFAULT_MODEL)).eval())
    rng = np.random.default_rng(0)
    for error in ("loose", "shift"):
        before, after, trust = [], [], []
        for seed in scene_seeds("test", 100, 4):
            scene = make_scene(seed, (384, 384))
            truth = scene.boxes_xyxy() + np.array([0, 0, 1, 1], np.float32)
            prompt = detector_boxes(truth, error, rng, (384, 384))
            predictor.set_image(scene.image)
            answer = predict_boxes(predictor, prompt)
            boxes, trusted = refine_boxes(prompt, answer.mask_boxes, answer.predicted_iou, answer.stability_score,
                                          conf.pred_iou_thresh, conf.stability_score_thresh, conf.margin)
            assert (boxes[~trusted] == prompt[~trusted]).all(), "an untrusted box is never changed"
            trust.append(trusted)
            before.append(box_iou(prompt, truth))
            after.append(box_iou(boxes, truth))
        trust = np.concatenate(trust)
        assert 0.2 < trust.mean() < 0.9, "the rule tells masks apart"
        gain = np.concatenate(after).mean() - np.concatenate(before).mean()
        assert gain > 0.03, (error, gain)


def test_box_source_maps_boxes_and_keypoints_into_the_resized_image(tmp_path, tiny_checkpoint):
    """The worker's mask source, without Ray: keypoints become points of the stored
    (resized) image, a box outside the image makes no mask, a clipped one does."""
    from pipeline.inputs.entries import Item
    from pipeline.masks.sources import build

    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 128, "height": 96},
                       {"id": 2, "file_name": "b.png", "width": 50, "height": 50}],
            "annotations": [
                {"id": 1, "image_id": 1, "bbox": [10, 10, 40, 30], "category_id": 4, "score": 0.8,
                 "keypoints": [30, 20, 2, 40, 30, 0, 20, 30, 2]},
                {"id": 2, "image_id": 1, "bbox": [100, 80, 60, 60], "category_id": 4},   # clipped to the image
                {"id": 3, "image_id": 1, "bbox": [200, 200, 10, 10], "category_id": 4},  # outside
                {"id": 4, "image_id": 2, "bbox": [1, 1, 10, 10]}]}
    (tmp_path / "boxes.json").write_text(json.dumps(coco))
    boxes = box_files.load(str(tmp_path / "boxes.json"))
    entries = _entries("a.png", "b.png", root=str(tmp_path))
    box_files.write_table(str(tmp_path), boxes, box_files.match(boxes, entries))
    prompt = {"multimask_output": True, "boxes_per_batch": None, "stability_score_offset": 1.0, "box_frame": "auto",
              "points": {"use": True, "min_visibility": 2}, "refine": {"enabled": False}}
    source = build({"kind": "boxes", "model": {"arch": "vit_tiny", "checkpoint": str(tiny_checkpoint), "device": "cpu"},
                    "output": str(tmp_path), "prompt": prompt})
    image = prepare_image(encode(Image.fromarray(make_scene(1, (96, 128)).image), "PNG"), short_side=48)
    assert (image.width, image.height) == (64, 48)
    records = source(Item("a.png", "x", key="sa_1", image_id=1), image)
    assert [r["prompt_id"] for r in records] == [1, 2]
    assert records[0]["prompt_box"] == [5.0, 5.0, 20.0, 15.0] and records[1]["prompt_box"] == [50.0, 40.0, 14.0, 8.0]
    assert records[0]["point_coords"] == [[15.0, 10.0], [10.0, 15.0]] and records[1]["point_coords"] == []
    assert records[0]["score"] == 0.8 and "score" not in records[1] and records[0]["category_id"] == 4
    assert all(r["box_source"] == "detector" and r["box"] == r["prompt_box"] for r in records)
    with pytest.raises(ValueError, match="50x50"):  # b.png's declared size is not this image's
        source(Item("b.png", "x", key="sa_2", image_id=2), image)
