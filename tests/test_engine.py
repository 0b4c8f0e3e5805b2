"""The three-stage data engine end to end at toy size: the annotation tool's real server
and exported decoder driven by the simulated annotator (clicks, then brush strokes),
semi_auto's detector (Ray Train) and box prompts (Ray actors), the verifier, fully_auto,
retrain and the promotion gate after every round; stopped mid-round, refused with other
settings, resumed to the end."""
from __future__ import annotations

import json
import re

import pyarrow.parquet as pq
import pytest

from pipeline.dataset import manifest
from pipeline.dataset.listing import iter_samples
from pipeline.stages import run_stage
from tests.conftest import REPO

TOY = [
    "model=vit_tiny", f"stage.init_checkpoint={REPO / 'models' / 'sam_vit_tiny_synthetic.pth'}",
    "stage.scenes.size=[192,192]", "stage.scenes.assisted_manual=3", "stage.scenes.semi_auto=2",
    "stage.scenes.fully_auto=2", "stage.scenes.held_out=1", "stage.annotator.max_clicks=3",
    "stage.annotator.max_strokes=2",
    # Stage 1 in two rounds (2 images, then 1): a row and a gated retrain per round.
    "stage.rounds.assisted_manual=2", "stage.rounds.semi_auto=1", "stage.rounds.fully_auto=1",
    "stage.annotate.images_per_unit=1", "stage.semi_auto.images_per_unit=2", "stage.fully_auto.images_per_unit=2",
    "amg.points_per_side=4",
    # Two training steps of one small image per model.
    "stage.retrain.steps=2", "stage.retrain.batch_size=1", "stage.retrain.checkpoint_every=2",
    "stage.retrain.log_every=1", "stage.retrain.optim.warmup_steps=1", "stage.retrain.interactive.num_rounds=2",
    "stage.retrain.interactive.num_rounds_without_point=1", "stage.retrain.interactive.loss_size=128",
    "stage.retrain.data.max_masks_per_image=2",
    # A two-step detector is unsure of everything: take its best boxes as they are.
    "stage.semi_auto.detector.steps=2", "stage.semi_auto.detector.checkpoint_every=2",
    "stage.semi_auto.detector.model.min_size=128", "stage.semi_auto.detector.model.max_size=128",
    "stage.semi_auto.detector.data.synthetic.size=[192,192]",
    "stage.semi_auto.prompt.min_box_score=0", "stage.semi_auto.prompt.max_boxes=4",
    "stage.semi_auto.prompt.pred_iou_thresh=0", "stage.semi_auto.prompt.stability_score_thresh=0",
    "stage.verifier.synthetic.count=2", "stage.verifier.synthetic.size=[192,192]",
    # The control is the retrain stage on COCO truth (tests/test_retrain.py); its truth
    # files are tested below: left out here, it would add three trainings to the suite.
    "stage.control=false",
    "stage.eval.max_masks_per_image=4", "stage.eval.amg.points_per_side=4",
]


def test_engine_runs_three_stages_stops_mid_stage_and_resumes(ray_local, compose_config, tmp_path):
    out = tmp_path / "engine"
    args = ["+stage=engine", f"output={out}", *TOY]

    # 1. Stopped mid-round: the annotator saves one of round 1's two images, then stops.
    cut = run_stage(compose_config(*args, "stage.stop_after_images=1"))
    assert not cut["complete"] and [r["stage"] for r in cut["summary"]] == ["start"]
    first = out / "stages" / "1_assisted_manual" / "round_1" / "dataset"
    assert len(manifest.read_table(str(first))) == 1
    assert not (out / "stages" / "1_assisted_manual" / "round_1" / "done.json").exists()
    saved = [s.record for s in iter_samples(str(first), images=False)]
    assert len(saved) == 1 and saved[0]["annotations"]

    # 2. Other settings on a cut run are refused before any work, naming the difference.
    with pytest.raises(RuntimeError, match=re.escape("stage.retrain.steps: 2 then, 3 now")):
        run_stage(compose_config(*[a for a in args if not a.startswith("stage.retrain.steps")],
                                 "stage.retrain.steps=3"))

    # 3. The same command finishes every stage; the annotated image is not annotated again.
    done = run_stage(compose_config(*args))
    assert done["complete"], done
    assert [(r["stage"], r["round"]) for r in done["summary"]] == [
        ("start", 0), ("assisted_manual", 1), ("assisted_manual", 2), ("semi_auto", 1), ("fully_auto", 1)]
    rows = {r["stage"]: r for r in done["summary"] if r["round"] in (0, 1)}
    assert len(manifest.read_table(str(first))) == 2
    records = {s.key: s.record for s in iter_samples(str(first), images=False)}
    assert len(records) == 2 and saved[0] in records.values()  # the first image's masks, unchanged

    # Every figure of a row is there and computed from the data.
    drawn = [a for r in records.values() for a in r["annotations"]]
    assert rows["assisted_manual"]["images"] == 2
    assert rows["assisted_manual"]["clicks_per_mask"] == pytest.approx(sum(a["clicks"] for a in drawn) / len(drawn))
    assert all(a["provenance"] == "model_assisted" and 1 <= a["clicks"] <= 3 and 0 <= a["strokes"] <= 2
               for a in drawn)
    assert rows["assisted_manual"]["strokes_per_mask"] == pytest.approx(sum(a["strokes"] for a in drawn) / len(drawn))
    # Modelled time: 3 s a mask, 2 s a click, 5 s a stroke (conf/stage/engine.yaml).
    assert rows["assisted_manual"]["cost_s_per_mask"] == pytest.approx(
        sum(3 + 2 * a["clicks"] + 5 * a["strokes"] for a in drawn) / len(drawn))
    for name in ("assisted_manual", "semi_auto", "fully_auto"):
        row = rows[name]
        for key in ("masks_per_image", "label_miou", "point_miou_1", "box_miou", "model_s_per_mask"):
            assert row[key] is not None and row[key] >= 0, (name, key)
        assert row["control_point_miou_1"] is None and row["control_box_miou"] is None  # stage.control=false
    semi = json.loads((out / "stages" / "2_semi_auto" / "round_1" / "done.json").read_text())
    assert semi["prefilled"] > 0 and rows["semi_auto"]["prefilled_per_image"] == semi["prefilled"] / 2
    decisions = pq.read_table(out / "stages" / "2_semi_auto" / "round_1" / "decisions.parquet").to_pylist()
    assert len(decisions) == semi["prefilled"]
    accepted = sum(d["decision"] == "accepted" for d in decisions)
    assert accepted == semi["accepted_unchanged"] == semi["decisions"]["accepted"]
    for name in ("semi_auto", "fully_auto"):
        assert 0 <= rows[name]["automatic_recall_0.5"] <= 1 and 0 <= rows[name]["automatic_precision_0.5"] <= 1

    # Models between rounds: each candidate from the model in use before; the model in use
    # after is the candidate when the gate promoted it, else the one before.
    report = json.loads((out / "engine_report.json").read_text())
    stages = report["rows"]
    assert report["rounds_done"] == 4 and [r["stage"] for r in stages][1:] == [
        "assisted_manual", "assisted_manual", "semi_auto", "fully_auto"]
    for before, after in zip(stages, stages[1:]):
        assert after["from_model"] == before["model"]
        gate = after["gate"]["sets"]["gate_coco"]
        assert after["promoted"] == (gate["after"] >= gate["before"])  # the engine's tolerance is 0
        assert after["model"] == (after["candidate"] if after["promoted"] else before["model"])
    assert stages[-1]["candidate"].endswith("engine_3_1/model.pth") and "control_model" not in stages[-1]
    md = (out / "engine_report.md").read_text()
    assert md.count("\n| ") == 6 and (out / "engine_report.png").stat().st_size > 1000

    # 4. A third run does nothing again: no model retrained, the report unchanged.
    models = {p.parent.name: p.stat().st_mtime_ns for p in (out / "models").glob("*/model.pth")}
    again = run_stage(compose_config(*args))
    assert again["complete"] and again["summary"] == done["summary"]
    assert {p.parent.name: p.stat().st_mtime_ns for p in (out / "models").glob("*/model.pth")} == models


def test_pools_and_the_controls_truth_are_written_once_and_load_in_pycocotools(tmp_path):
    """Each stage's pool with its truth, and the truth of the pools so far (what control n
    trains on): unique ids, every image file there, the masks of the scenes themselves."""
    import numpy as np
    from omegaconf import OmegaConf
    from PIL import Image
    from pycocotools.coco import COCO

    from pipeline.stages.engine import ENGINE_STAGES as STAGES
    from pipeline.truth.pools import Truth, write_pools
    from pipeline.truth.synthetic import make_scene

    scenes = OmegaConf.create({"size": [64, 80], "seed_start": 700000, "assisted_manual": 2, "semi_auto": 1,
                               "fully_auto": 3})

    def write():
        return write_pools(str(tmp_path / "scenes"), [(n, int(scenes[n])) for n in STAGES],
                           {"domain": "shapes", "seed_start": 700000, "size": [64, 80]}, held_out=2)

    pools = write()
    seen = 0
    for name in STAGES:
        upto = COCO(pools[name]["upto"])
        seen += int(scenes[name])
        assert len(upto.getImgIds()) == seen and len(set(upto.getAnnIds())) == len(upto.dataset["annotations"])
        for info in upto.loadImgs(upto.getImgIds()):
            assert (tmp_path / "scenes" / info["file_name"]).is_file()
    last = COCO(pools["fully_auto"]["upto"])
    info = last.loadImgs(last.getImgIds())[-1]  # the last scene of the last pool
    scene = make_scene(700005, (64, 80))
    masks = np.stack([last.annToMask(a) for a in last.loadAnns(last.getAnnIds(imgIds=info["id"]))]).astype(bool)
    assert info["file_name"] == "fully_auto/scene_700005.png" and np.array_equal(masks, scene.masks)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "scenes" / info["file_name"])), scene.image)
    assert np.array_equal(Truth(pools["fully_auto"]["truth"])("/anywhere/scene_700005.png"), scene.masks)
    held_out = COCO(pools["held_out"]["truth"])  # test seeds: never a training scene
    assert [i["file_name"] for i in held_out.loadImgs(held_out.getImgIds())] == [
        "held_out/scene_1000000000.png", "held_out/scene_1000000001.png"]
    before = (tmp_path / "scenes" / "done.json").stat().st_mtime_ns
    write()  # written once
    assert (tmp_path / "scenes" / "done.json").stat().st_mtime_ns == before
