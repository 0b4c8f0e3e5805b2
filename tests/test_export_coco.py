"""+stage=export_coco: the JSON loads in pycocotools' COCO and COCOeval."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.stages import run_stage

from .dataset_factory import REPO, compose, make_dataset
from .test_stats import FOREIGN, add_members, blocking_shard, wait_until_read


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


def test_foreign_json_members_are_skipped_and_reported(tmp_path, caplog):
    dataset = make_dataset(tmp_path / "dataset", num_shards=2, images_per_shard=2)
    add_members(dataset.shard_path(1), FOREIGN)
    summary = run_stage(compose("export_coco", dataset.root, tmp_path / "out",
                                overrides=["stage.parallel=local", "stage.extract_images=true"]))
    assert summary["skipped"] == 4
    coco = COCO(summary["path"])
    assert len(coco.getImgIds()) == summary["images"] == len(dataset.samples)
    for key in ("caption_1", "listed", "flat", "cut"):
        assert any(m.startswith(f"skipped shard sa_000001.tar key {key}: ") for m in caplog.messages), key
    assert not (tmp_path / "out" / "coco" / "images" / "caption_1.jpg").exists()


def test_killed_export_is_cleaned_up_by_the_rerun(tmp_path):
    """SIGKILL mid-export (blocked on the 2nd of 3 shards): no instances.json, and the
    rerun removes the parts folder and temporary JSON the killed run left."""
    dataset = make_dataset(tmp_path / "dataset", num_shards=3, images_per_shard=2)
    fifo = dataset.shard_path(1)
    shard = blocking_shard(dataset, 1)
    command = [sys.executable, "-m", "pipeline.run", "+stage=export_coco", f"input={dataset.root}",
               "stage.parallel=local", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    writer = wait_until_read(fifo, process)
    process.kill()
    process.wait(timeout=60)
    os.close(writer)
    coco_dir = dataset.root / "coco"
    left = sorted(p.name for p in coco_dir.iterdir())
    assert any(n.startswith(".parts-") for n in left) and any(".tmp-" in n for n in left), left
    assert "instances.json" not in left

    fifo.unlink()
    fifo.write_bytes(shard)
    rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert sorted(p.name for p in coco_dir.iterdir()) == ["instances.json"]
    coco = COCO(str(coco_dir / "instances.json"))
    assert len(coco.getAnnIds()) == sum(len(s.masks) for s in dataset.samples)


def test_export_from_s3_into_s3(s3_env, tmp_path, monkeypatch):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("coco-bucket")
    dataset = make_dataset(tmp_path / "dataset", num_shards=2, images_per_shard=2)
    fs.put(str(dataset.root) + "/", "coco-bucket/dataset/", recursive=True)
    # What a killed export leaves on an object store.
    fs.pipe({"coco-bucket/out/coco/.parts-dead/sa_000000.tar.images": b"{}",
             "coco-bucket/out/coco/.instances.json.tmp-dead": b"{"})
    monkeypatch.chdir(tmp_path)
    summary = run_stage(compose("export_coco", "s3://coco-bucket/dataset", "s3://coco-bucket/out",
                                overrides=["stage.parallel=local", "stage.extract_images=true"]))
    assert summary["path"] == "s3://coco-bucket/out/coco/instances.json"
    assert not (tmp_path / "s3:").exists()
    fs.invalidate_cache()
    local = tmp_path / "instances.json"
    fs.get("coco-bucket/out/coco/instances.json", str(local))
    assert len(COCO(str(local)).getImgIds()) == len(dataset.samples)
    assert sorted(fs.ls("coco-bucket/out/coco/images")) == sorted(
        f"coco-bucket/out/coco/images/{s.key}.jpg" for s in dataset.samples)
    leftovers = [p for p in fs.find("coco-bucket/out") if ".tmp-" in p or ".parts-" in p]
    assert not leftovers


def test_reading_stages_do_not_import_other_stages():
    """What stats, validate and export_coco share lives below the stages (config.paths, dataset.tables,
    execution.shard_map)."""
    import ast

    for name in ("stats", "validate", "export_coco"):
        module = REPO / "pipeline" / "stages" / f"{name}.py"
        tree = ast.parse(module.read_text())
        imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        imported += [a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names]
        assert not [m for m in imported if m and m.startswith("pipeline.stages")], module.name



def test_unlabelled_masks_never_pass_for_a_labelled_category(tmp_path):
    """In a dataset with categories, a mask without a category_id is exported as "object"
    under an id of its own, not as the category that has id 1; a class-agnostic dataset
    exports everything as "object", id 1."""
    from pipeline.dataset.listing import write_categories

    def label_every_other(sample):
        for i, ann in enumerate(sample.record["annotations"]):
            if i % 2 == 0:
                ann["category_id"] = 1

    labelled = make_dataset(tmp_path / "labelled", num_shards=2, images_per_shard=2, mutate=label_every_other)
    write_categories(str(labelled.root), [{"id": 1, "name": "cell", "supercategory": "cell"},
                                          {"id": 4, "name": "debris", "supercategory": "debris"}])
    coco = COCO(run_stage(compose("export_coco", labelled.root, tmp_path / "out1",
                                  overrides=["stage.parallel=local"]))["path"])
    assert sorted(coco.getCatIds()) == [1, 4, 5] and coco.loadCats(5)[0]["name"] == "object"
    positions = [i for s in labelled.samples for i in range(len(s.record["annotations"]))]
    assert len(coco.getAnnIds(catIds=[1])) == sum(1 for i in positions if i % 2 == 0) > 0
    assert len(coco.getAnnIds(catIds=[5])) == sum(1 for i in positions if i % 2 == 1) > 0
    assert not coco.getAnnIds(catIds=[4])

    agnostic = make_dataset(tmp_path / "agnostic", num_shards=1, images_per_shard=2)
    coco = COCO(run_stage(compose("export_coco", agnostic.root, tmp_path / "out2",
                                  overrides=["stage.parallel=local"]))["path"])
    assert coco.getCatIds() == [1] and len(coco.getAnnIds(catIds=[1])) == len(coco.getAnnIds()) > 0
