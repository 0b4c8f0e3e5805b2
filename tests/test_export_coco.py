"""+stage=export_coco: the JSON loads in pycocotools' COCO and COCOeval."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.stages import run_stage

from .dataset_factory import compose, make_dataset


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("coco")
    dataset = make_dataset(tmp / "dataset", num_shards=2, images_per_shard=3)
    summary = run_stage(compose("export_coco", dataset.root, tmp / "out",
                                overrides=["stage.extract_images=true"]))
    return dataset, summary


def test_coco_loads_with_true_masks(export):
    dataset, summary = export
    coco = COCO(summary["path"])
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["object"]
    assert summary["images"] == len(coco.getImgIds()) == len(dataset.samples)
    assert summary["annotations"] == len(coco.getAnnIds()) == sum(len(s.masks) for s in dataset.samples)
    for s in dataset.samples:
        image_id = s.record["image"]["image_id"]
        info = coco.loadImgs(image_id)[0]
        assert (info["width"], info["height"], info["file_name"]) == (
            s.image.shape[1], s.image.shape[0], f"{s.key}.jpg")
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert [a["id"] for a in anns] == [a["id"] for a in s.record["annotations"]]
        for ann, mask in zip(anns, s.masks):
            np.testing.assert_array_equal(coco.annToMask(ann), mask)
            ys, xs = np.nonzero(mask)
            # COCO's convention, one pixel wider than SA-1B's stored bbox
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert ann["area"] == mask.sum()
            assert ann["iscrowd"] == 0 and ann["category_id"] == 1


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_cocoeval_scores_ground_truth_as_perfect(export, iou_type):
    _, summary = export
    coco = COCO(summary["path"])
    anns = json.load(open(summary["path"]))["annotations"]
    detections = [{"image_id": a["image_id"], "category_id": 1, "segmentation": a["segmentation"],
                   "bbox": a["bbox"], "score": a["predicted_iou"]} for a in anns]
    evaluator = COCOeval(coco, coco.loadRes(detections), iou_type)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)  # AP@[.5:.95]
    # and a detector that misses half the masks is not perfect: the export is not trivially 1
    half = COCOeval(coco, coco.loadRes(detections[::2]), iou_type)
    half.evaluate()
    half.accumulate()
    half.summarize()
    assert half.stats[8] < 0.75  # AR@100


def test_extracted_images_match_records(export):
    dataset, summary = export
    images_dir = dataset.root.parent / "out" / "coco" / "images"
    for s in dataset.samples:
        image = cv2.imread(str(images_dir / f"{s.key}.jpg"))
        assert image is not None and image.shape == s.image.shape
