"""export_label_studio end to end: every mask comes back pixel for pixel through Label
Studio's own brush decoder (label_studio_converter.brush.decode_rle), each task's
prediction names the control, object and labels of the labeling config written beside
it, and categories become brush labels."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np

from pipeline.dataset.label_studio import brush_rle
from pipeline.stages import run_stage

from .dataset_factory import compose, make_dataset


def _decode(result: dict) -> np.ndarray:
    from label_studio_converter.brush import decode_rle

    h, w = result["original_height"], result["original_width"]
    return decode_rle(result["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0


def test_masks_come_back_exactly_through_label_studios_decoder(tmp_path):
    dataset = make_dataset(tmp_path / "dataset", num_shards=2, images_per_shard=3)
    summary = run_stage(compose("export_label_studio", dataset.root, tmp_path / "out"))
    folder = tmp_path / "out" / "label_studio"
    tasks = json.loads((folder / "tasks.json").read_text())
    config = ET.fromstring((folder / "labeling_config.xml").read_text())
    brush = config.find("BrushLabels")
    labels = {label.get("value") for label in brush.findall("Label")}
    image_tag = config.find("Image").get("name")
    assert summary["tasks"] == len(tasks) == len(dataset.samples)
    assert summary["masks"] == sum(len(s.masks) for s in dataset.samples) > 0
    for task in tasks:
        sample = dataset.sample(task["data"]["key"])
        assert task["data"][image_tag] == f"/data/local-files/?d=label_studio/images/{sample.key}.jpg"
        assert (folder / "images" / f"{sample.key}.jpg").is_file()
        results = task["predictions"][0]["result"]
        assert len(results) == len(sample.masks)
        for result, mask in zip(results, sample.masks):
            assert result["from_name"] == brush.get("name") and result["to_name"] == image_tag
            assert result["type"] == "brushlabels" and set(result["value"]["brushlabels"]) <= labels
            np.testing.assert_array_equal(_decode(result), mask.astype(bool))


def test_long_runs_and_edge_cases_decode_exactly():
    """Runs longer than the longest length field (65,536 values), single pixels, empty
    and full masks."""
    rng = np.random.default_rng(0)
    cases = [np.zeros((300, 300), bool), np.ones((300, 300), bool), rng.random((40, 50)) < 0.5]
    dot = np.zeros((7, 9), bool)
    dot[3, 4] = True
    cases.append(dot)
    for mask in cases:
        h, w = mask.shape
        assert np.array_equal(_decode({"original_height": h, "original_width": w,
                                       "value": {"rle": brush_rle(mask)}}), mask)


def test_categories_become_brush_labels(tmp_path):
    from pipeline.dataset.listing import write_categories

    dataset = make_dataset(tmp_path / "dataset", num_shards=1, images_per_shard=1, masks_per_image=(2,))
    write_categories(str(dataset.root), [{"id": 5, "name": "cell", "supercategory": "cell"}])
    run_stage(compose("export_label_studio", dataset.root, tmp_path / "out",
                      overrides=["stage.image_url_prefix=https://host/img/"]))
    folder = tmp_path / "out" / "label_studio"
    config = ET.fromstring((folder / "labeling_config.xml").read_text())
    task, = json.loads((folder / "tasks.json").read_text())
    assert task["data"]["image"].startswith("https://host/img/")
    # The factory's masks carry no category: labelled "object", which the config lists too.
    assert [label.get("value") for label in config.iter("Label")] == ["cell", "object"]
    assert {r["value"]["brushlabels"][0] for r in task["predictions"][0]["result"]} == {"object"}
