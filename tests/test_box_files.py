"""Box files that are not what they should be: each is refused before any work with the
file, the entry and the reason, or its bad boxes are dropped and reported one by one;
nothing is misapplied silently (a box on another image, a rounded category)."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.inputs import box_files
from pipeline.inputs.entries import InputError

IMAGE = {"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}
BOX = {"id": 10, "image_id": 1, "bbox": [1, 2, 10, 20], "category_id": 1}


def coco(images=(IMAGE,), annotations=(BOX,), **extra) -> dict:
    return {"images": list(images), "annotations": list(annotations), **extra}


REFUSED = [  # (file content, what the error names)
    (b"{not json", "not JSON"),
    (json.dumps([]).encode(), "no images list"),
    (json.dumps({"images": "a.jpg"}).encode(), "no images list"),
    (json.dumps(coco(images=[IMAGE, {**IMAGE, "file_name": "b.jpg"}])).encode(), "image id 1 is also the id of"),
    (json.dumps(coco(images=[{**IMAGE, "id": "one"}])).encode(), "images[0]: id 'one' is not a whole number"),
    (json.dumps(coco(images=[{**IMAGE, "id": 1.5}])).encode(), "id 1.5 is not a whole number"),
    (json.dumps(coco(images=[{**IMAGE, "file_name": None}])).encode(), "file_name None is not a file name"),
    (json.dumps(coco(images=[{**IMAGE, "width": -4}])).encode(), "width -4 is not a positive whole number"),
    (json.dumps(coco(images=["a.jpg"])).encode(), "images[0]: not an object"),
    (json.dumps(coco(annotations=[[1, 2]])).encode(), "annotations[0]: not an object"),
    (json.dumps({"images": [IMAGE], "annotations": {"a": 1}}).encode(), "not lists"),
]


@pytest.mark.parametrize(("content", "reason"), REFUSED)
def test_a_coco_file_that_cannot_be_trusted_is_refused_naming_the_file_and_entry(tmp_path, content, reason):
    path = tmp_path / "boxes.json"
    path.write_bytes(content)
    with pytest.raises(InputError) as refused:
        box_files.load(str(path))
    assert str(path) in str(refused.value) and reason in str(refused.value)


REPORTED = [  # (annotation, what the report says): the box is dropped, the rest goes on
    ({**BOX, "bbox": None}, "bbox is null"),
    ({**BOX, "bbox": [1, 2, 3]}, "is not 4 finite numbers"),
    ({**BOX, "bbox": [1, 2, "x", 4]}, "is not 4 finite numbers"),
    ({**BOX, "bbox": [1, 2, 0, 4]}, "has no area"),
    ({**BOX, "category_id": 2.9}, "category 2.9 is not a whole number"),
    ({**BOX, "category_id": -3}, "category -3 is not a whole number >= 0"),
    ({**BOX, "category_id": True}, "category True"),
    ({**BOX, "score": "high"}, "score 'high' is not a finite number"),
    ({**BOX, "keypoints": [1, 2]}, "are not x, y, visibility triples"),
    ({**BOX, "image_id": 7}, "names image id 7"),
    ({**BOX, "image_id": None}, "names image id None"),
]


@pytest.mark.parametrize(("annotation", "reason"), REPORTED)
def test_a_coco_box_that_cannot_prompt_is_dropped_and_reported(tmp_path, annotation, reason):
    path = tmp_path / "boxes.json"
    good = {**BOX, "id": 11, "bbox": [5, 5, 10, 10]}
    path.write_text(json.dumps(coco(annotations=[annotation, good])))
    boxes = box_files.load(str(path))
    assert len(boxes.invalid) == 1 and reason in boxes.invalid[0] and "annotation id 10" in boxes.invalid[0]
    assert [r["prompt_id"] for r in boxes.table.to_pylist() if r["x0"] is not None] == [11]


def test_one_file_name_twice_at_two_sizes_is_reported(tmp_path):
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps(coco(images=[IMAGE, {**IMAGE, "id": 2, "width": 128, "height": 96}],
                                    annotations=[BOX, {**BOX, "id": 11, "image_id": 2}])))
    boxes = box_files.load(str(path))
    assert len(boxes.invalid) == 1 and "are both 'a.jpg'" in boxes.invalid[0]
    frames = {(r["frame_width"], r["frame_height"]) for r in boxes.table.to_pylist()}
    assert frames == {(64, 48), (128, 96)}  # each box stays in the frame its image declares


def test_yolo_classes_must_be_whole_and_coordinates_normalised(tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "a.txt").write_text("1.7 0.5 0.5 0.2 0.2\n-3 0.5 0.5 0.2 0.2\n0 320 240 50 40\n2 0.5 0.5 0.2 0.2\n")
    boxes = box_files.load(str(labels))
    reasons = "\n".join(boxes.invalid)
    assert len(boxes.invalid) == 3 and "a.txt:1: class '1.7'" in reasons and "a.txt:2: class '-3'" in reasons
    assert "a.txt:3:" in reasons and "pixel coordinates" in reasons
    assert [r["category_id"] for r in boxes.table.to_pylist() if r["x0"] is not None] == [2]


def test_parquet_rows_are_checked_and_a_broken_file_is_refused(tmp_path):
    table = pa.table({"file_name": ["x.jpg", None, "y.jpg"], "bbox": [[1.0, 1.0, 5.0, 5.0], [1.0, 1.0, 5.0, 5.0],
                                                                     [1.0, 1.0, 5.0, 5.0]],
                      "category_id": [1.0, 2.0, 2.5]})
    pq.write_table(table, tmp_path / "boxes.parquet")
    boxes = box_files.load(str(tmp_path / "boxes.parquet"))
    assert len(boxes.invalid) == 2 and "row 1: file_name None" in boxes.invalid[0]
    assert "row 2: category 2.5" in boxes.invalid[1]
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match="broken.parquet: the file: not a readable Parquet table"):
        box_files.load(str(tmp_path / "broken.parquet"))
