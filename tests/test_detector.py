"""The box detector: its data (boxes of SA-1B records and synthetic scenes, the held-out
split), backbone weights by path, box AP with pycocotools, and the detector stage end to
end with real Ray Train on a tiny scene set: a run cut short and resumed, registered,
reloaded, predicting boxes."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.dataset.filters import is_held_out
from pipeline.dataset.shards import ShardWriter, sa1b_record
from pipeline.models import detector
from pipeline.stages import run_stage
from pipeline.truth.synthetic import make_scene

SIZE = (128, 128)
TINY = [
    "stage.batch_size=2", "stage.log_every=1", "stage.checkpoint_every=1", "stage.optim.warmup_steps=2",
    "stage.model.min_size=128", "stage.model.max_size=128", f"stage.data.synthetic.size=[{SIZE[0]},{SIZE[1]}]",
    "stage.eval.num_images=3", f"stage.eval.size=[{SIZE[0]},{SIZE[1]}]", "cluster.num_cpus=2",
]


def write_dataset(folder, seeds) -> dict[str, np.ndarray]:
    """A folder with one SA-1B tar of synthetic scenes (their true masks as annotations);
    returns each key's true XYXY boxes."""
    folder.mkdir(parents=True)
    boxes = {}
    with ShardWriter(str(folder / "sa_000000.tar")) as writer:
        for image_id, seed in enumerate(seeds):
            scene = make_scene(seed, SIZE)
            masks = []
            for m in scene.masks:
                rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                masks.append({"segmentation": rle, "bbox": mask_utils.toBbox(rle).tolist(), "area": int(m.sum()),
                              "predicted_iou": 1.0, "stability_score": 1.0, "crop_box": [0, 0, SIZE[1], SIZE[0]],
                              "point_coords": [[0.0, 0.0]]})
            buffer = io.BytesIO()
            Image.fromarray(scene.image).save(buffer, format="JPEG", quality=95)
            key = f"sa_{image_id}"
            writer.write(key, buffer.getvalue(), sa1b_record(key, image_id, SIZE[1], SIZE[0], masks))
            boxes[key] = detector.from_scene(scene, 0).boxes
    return boxes


def test_boxes_of_records_and_scenes_and_the_held_out_split(tmp_path):
    scene = make_scene(3, SIZE)
    from_scene = detector.from_scene(scene, min_area=0)
    ys, xs = np.nonzero(scene.masks[0])
    assert from_scene.boxes[0].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    record = {"annotations": [{"bbox": [2, 3, 10, 4]}, {"bbox": [0, 0, 3, 3]}]}
    assert detector.boxes_from_record(record, min_area=16).tolist() == [[2, 3, 12, 7]]
    flipped = detector.flip(detector.BoxSample("k", np.zeros((8, 20, 3), np.uint8),
                                               np.array([[2, 1, 5, 4]], np.float32)))
    assert flipped.boxes.tolist() == [[15, 1, 18, 4]]

    keys = [f"sa_{i}" for i in range(2000)]
    held = [k for k in keys if is_held_out(k, 0.1)]
    assert 150 < len(held) < 250 and held == [k for k in keys if is_held_out(k, 0.1)]
    assert not any(is_held_out(k, 0.0) for k in keys)


def test_resnet50_backbone_weights_load_by_path_and_bad_files_are_refused(tmp_path):
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None)
    torch.save(resnet.state_dict(), tmp_path / "resnet50.pth")
    settings = {"arch": "fasterrcnn_resnet50_fpn", "backbone_weights": str(tmp_path / "resnet50.pth"),
                "trainable_backbone_layers": 3, "min_size": 128, "max_size": 128, "detections_per_image": 10}
    model = detector.build_detector(settings)
    body = model.backbone.body.state_dict()
    assert torch.equal(body["layer4.2.conv3.weight"], resnet.state_dict()["layer4.2.conv3.weight"])
    assert torch.equal(body["bn1.running_var"], resnet.state_dict()["bn1.running_var"])
    assert (not model.backbone.body.conv1.weight.requires_grad
            and model.backbone.body.layer4[0].conv1.weight.requires_grad)

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(ValueError, match="do not fit a torchvision ResNet-50"):
        detector.build_detector({**settings, "backbone_weights": str(tmp_path / "resnet18.pth")})
    torch.save({"weights": resnet.conv1}, tmp_path / "pickled.pth")  # a module: a pickle that builds objects
    with pytest.raises(ValueError, match="weights_only=True"):
        detector.build_detector({**settings, "backbone_weights": str(tmp_path / "pickled.pth")})
    with pytest.raises(ValueError, match="supported with fasterrcnn_resnet50_fpn"):
        detector.build_detector({**settings, "arch": "fasterrcnn_mobilenet_v3_large_320_fpn"})


class _Answers(torch.nn.Module):
    """Answers each image with fixed detections, to check box_ap's bookkeeping."""

    def __init__(self, answers):
        super().__init__()
        self.answers = list(answers)

    def forward(self, images):
        return [self.answers.pop(0) for _ in images]


def test_box_ap_of_perfect_shifted_and_no_detections():
    samples = [detector.from_scene(make_scene(s, SIZE), 16) for s in (1, 2)]

    def answers(shift, keep=True):
        return _Answers({"boxes": torch.as_tensor(s.boxes + shift) if keep else torch.zeros(0, 4),
                         "scores": torch.linspace(1, 0.5, len(s.boxes)) if keep else torch.zeros(0)} for s in samples)

    perfect = detector.box_ap(answers(0), samples, torch.device("cpu"), batch_size=1)
    assert perfect["box_ap"] == pytest.approx(1.0) and perfect["boxes"] == sum(len(s.boxes) for s in samples)
    shifted = detector.box_ap(answers(3), samples, torch.device("cpu"))
    assert 0 < shifted["box_ap"] < shifted["box_ap50"] <= 1.0
    assert detector.box_ap(answers(0, keep=False), samples, torch.device("cpu"))["box_ap"] == 0.0


def test_detector_stage_trains_resumes_registers_and_predicts(compose_config, tmp_path, ray_local):
    boxes = write_dataset(tmp_path / "ds", range(12))
    held = [k for k in boxes if is_held_out(k, 0.3)]
    assert 0 < len(held) < len(boxes)
    overrides = ["+stage=detector", f"output={tmp_path / 'out'}", f"stage.data.datasets={tmp_path / 'ds'}",
                 "stage.data.holdout_fraction=0.3", "stage.steps=3", *TINY]
    folder = tmp_path / "out" / "models" / "detector_v001"
    cut = run_stage(compose_config(*overrides, "stage.stop_at_step=2"))
    assert cut["steps"] == 2 and not cut["complete"]
    before = (folder / "history.jsonl").read_text().splitlines()
    summary = run_stage(compose_config(*overrides))  # the same command: resumes the same run
    assert summary["version"] == "v001" and summary["steps"] == 3 and summary["complete"]

    history = [json.loads(line) for line in (folder / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3] and all(np.isfinite(h["loss"]) for h in history)
    assert history[:2] == [json.loads(line) for line in before], "the resumed run continues, it does not retrain"
    ev = json.loads((folder / "eval.json").read_text())
    first = held[:3]  # stage.eval.num_images of the datasets' held-out share, in shard order
    assert ev == summary["eval"] and ev["images"] == len(first)
    assert ev["boxes"] == sum(len(boxes[k]) for k in first) and 0.0 <= ev["box_ap"] <= 1.0
    assert (json.loads((folder / "detector.json").read_text())["model"]["arch"]
            == "fasterrcnn_mobilenet_v3_large_320_fpn")

    sha = detector.detector_identity(str(folder))
    model, _ = detector.load_detector(str(folder), expected_sha256=sha)
    image = make_scene(99, SIZE).image
    (b, s), = detector.predict(model, [image], torch.device("cpu"))
    assert b.shape == (len(s), 4) and len(s) > 0 and np.all(np.diff(s) <= 0)
    assert (b[:, 0] >= 0).all() and (b[:, 2] <= SIZE[1]).all() and (b[:, 0] < b[:, 2]).all()
    again, _ = detector.load_detector(str(folder / "model.pth"))
    (b2, s2), = detector.predict(again, [image], torch.device("cpu"))
    assert np.array_equal(b, b2) and np.array_equal(s, s2)
    with pytest.raises(ValueError, match="changed after the run recorded them"):
        detector.load_detector(str(folder), expected_sha256="0" * 64)

    # Rerunning the finished command trains nothing and finds the same version; other
    # settings are a new version.
    checkpoints = sorted(p.name for p in (tmp_path / "out" / "train_runs" / "detector_v001").iterdir())
    assert run_stage(compose_config(*overrides)) == json.loads((folder / "train_summary.json").read_text())
    assert sorted(p.name for p in (tmp_path / "out" / "train_runs" / "detector_v001").iterdir()) == checkpoints
    assert sorted(p.name for p in (tmp_path / "out" / "models").iterdir()) == ["detector_v001"]
    with pytest.raises(ValueError, match="trained with other settings"):
        run_stage(compose_config(*overrides, "stage.version=v001", "stage.optim.lr=0.01"))
