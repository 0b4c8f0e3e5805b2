"""The semi-automatic stage end to end on a tiny scene set: the detector trained with
real Ray Train on a dataset's masks, its confident boxes prompting the shipped model on
real Ray actors, confident masks marked automatic; a rerun does nothing twice."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline.dataset import manifest
from pipeline.dataset.shards import iter_shard
from pipeline.inputs.entries import InputError
from pipeline.inputs.images import prepare_image
from pipeline.masks.sources import DetectorSource
from pipeline.models import detector
from pipeline.stages import run_stage
from pipeline.truth.synthetic import make_scene, scene_seeds
from tests.conftest import REPO
from tests.test_detector import SIZE, write_dataset

DETECTOR = [
    "stage.detector.steps=2", "stage.detector.batch_size=2", "stage.detector.checkpoint_every=1",
    "stage.detector.model.min_size=128", "stage.detector.model.max_size=128",
    f"stage.detector.data.synthetic.size=[{SIZE[0]},{SIZE[1]}]", "stage.detector.eval.num_images=2",
]
# A detector trained for two steps is unsure of everything: take its best boxes as they are.
PROMPT = ["stage.prompt.min_box_score=0", "stage.prompt.max_boxes=4", "stage.prompt.pred_iou_thresh=0",
          "stage.prompt.stability_score_thresh=0"]


def test_semi_auto_prefills_detector_boxes_as_automatic_masks(compose_config, tmp_path, ray_local):
    write_dataset(tmp_path / "collected", range(8))
    images = tmp_path / "images"
    images.mkdir()
    for seed in scene_seeds("test", 200, 3):
        Image.fromarray(make_scene(seed, SIZE).image).save(images / f"scene_{seed}.jpg", quality=95)
    out = tmp_path / "queue"
    overrides = ["+stage=semi_auto", f"input={images}", f"output={out}", f"stage.masks={tmp_path / 'collected'}",
                 "model=vit_tiny", "cluster.num_cpus=2", *DETECTOR, *PROMPT]
    with pytest.raises(InputError, match="stage.masks"):
        run_stage(compose_config(*overrides[:3], "model=vit_tiny"))

    summary = run_stage(compose_config(*overrides))
    folder = out / "models" / "detector_v001"
    assert summary["detector"]["path"] == str(folder) and summary["detector"]["complete"]
    assert summary["images_ok"] == 3 and summary["units_failed"] == 0
    model, _ = detector.load_detector(str(folder))
    masks = 0
    for shard in sorted((out / "shards").iterdir()):
        for sample in iter_shard(str(shard)):
            anns = sample.record["annotations"]
            rgb = np.asarray(Image.open(io.BytesIO(sample.jpg)).convert("RGB"))
            (boxes, scores), = detector.predict(model, [rgb], torch.device("cpu"))
            assert 0 < len(anns) <= 4 and all(a["provenance"] == "automatic" for a in anns)
            # The prompts are the detector's best boxes on the stored image, best first.
            got = np.array([a["prompt_box"] for a in anns])
            want = boxes[: len(anns)].copy()
            want[:, 2:] -= want[:, :2]
            assert np.allclose(got, want, atol=1e-3)
            assert np.allclose([a["score"] for a in anns], scores[: len(anns)], atol=1e-5)
            masks += len(anns)
    assert masks == summary["masks"] and summary["prefilled_masks_per_image"] == pytest.approx(masks / 3)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["detector_sha256"] == detector.detector_identity(str(folder))

    again = run_stage(compose_config(*overrides))  # nothing trained or annotated twice
    assert again["units_committed"] == 0 and again["units_skipped"] == summary["units"]
    assert sorted(p.name for p in (out / "models").iterdir()) == ["detector_v001"]
    assert len(manifest.read_table(str(out))) == 3

    # Confident masks only: the source keeps exactly the masks at or above its thresholds.
    spec = {"model": {"arch": "vit_tiny", "checkpoint": str(REPO / "models" / "sam_vit_tiny_synthetic.pth"),
                      "device": "cpu"},
            "detector": str(folder), "prompt": {"min_box_score": 0, "max_boxes": 8, "multimask_output": False,
                                                 "boxes_per_batch": None, "stability_score_offset": 1.0,
                                                 "pred_iou_thresh": 0, "stability_score_thresh": 0}}
    image = prepare_image((images / next(iter(sorted(p.name for p in images.iterdir())))).read_bytes())
    everything = DetectorSource(spec)(None, image)
    cut = float(np.median([r["predicted_iou"] for r in everything]))
    confident = DetectorSource({**spec, "prompt": {**spec["prompt"], "pred_iou_thresh": cut}})(None, image)
    assert [r["prompt_box"] for r in confident] == [r["prompt_box"] for r in everything if r["predicted_iou"] >= cut]
    assert 0 < len(confident) < len(everything)
