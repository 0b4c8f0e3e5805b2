"""The model-in-the-loop stage end to end: real Ray (actors and Ray Train), Hydra
configs, WebDataset shards and both model loaders; tiny settings so it runs on a CPU."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.stages import run_stage
from pipeline.truth.synthetic import make_scene

# Sub-stage settings small enough for a CPU test: a 4x4 point grid, 2 training steps
# of 1 image, one held-out image. The random start model predicts low IoUs, so the
# quality filters are opened to give retrain something to learn from.
TINY = [
    "stage.rounds=2",
    "stage.fully_auto.images_per_unit=2",
    "amg.points_per_side=4",
    "amg.pred_iou_thresh=0.0",
    "amg.stability_score_thresh=0.0",
    "stage.retrain.steps=2",
    "stage.retrain.batch_size=1",
    "stage.retrain.checkpoint_every=1",
    "stage.retrain.log_every=1",
    "stage.retrain.optim.warmup_steps=1",
    "stage.retrain.interactive.num_rounds=2",
    "stage.retrain.interactive.num_rounds_without_point=1",
    "stage.retrain.interactive.loss_size=128",
    "stage.retrain.data.max_masks_per_image=2",
    "stage.retrain.data.pred_iou_thresh=0.0",
    "stage.retrain.data.stability_score_thresh=0.0",
    # Two steps of a random model are no better or worse than its start on one image: the
    # gate (tests/test_tune.py) would decide by noise which model the next round uses.
    "stage.retrain.gate.enabled=false",
    "stage.eval.num_images=1",
    "stage.eval.size=[128,128]",
    "stage.eval.max_masks_per_image=2",
    "stage.eval.clicks=[1,2]",
    "stage.eval.amg.points_per_side=4",
]


@pytest.fixture
def pool(tmp_path) -> Path:
    """An unlabeled pool: three synthetic scenes as JPEGs, without their masks."""
    root = tmp_path / "pool"
    root.mkdir()
    for seed in (11, 12, 13):
        Image.fromarray(make_scene(seed, size=(96, 128)).image).save(root / f"scene_{seed}.jpg", quality=92)
    return root


def _mtimes(paths: list[Path]) -> list[int]:
    return [p.stat().st_mtime_ns for p in paths]


def test_loop_rounds_report_registry_and_resume(ray_local, compose_config, tiny_checkpoint, pool, tmp_path,
                                                caplog):
    out = tmp_path / "out"
    args = ["+stage=loop", f"input={pool}", f"output={out}", "model=vit_tiny",
            f"stage.init_checkpoint={tiny_checkpoint}", *TINY]
    rounds = out / "rounds"
    caplog.set_level(logging.INFO, logger="pipeline")

    # 1. Stopped inside round 1 (retrain ends at step 1 of 2): round 1 is not finished.
    cut = run_stage(compose_config(*args, "stage.retrain.stop_at_step=1"))
    assert not cut["complete"] and cut["rounds_run"] == 0 and len(cut["rounds"]) == 1
    assert (rounds / "round_000/done.json").is_file()
    assert (rounds / "round_001/dataset/summary.json").is_file()
    assert not (rounds / "round_001/done.json").exists()
    partial = json.loads((out / "models/round_001/train_summary.json").read_text())
    assert partial["steps"] == 1 and not partial["complete"]
    report = json.loads((out / "loop_report.json").read_text())
    assert report["rounds_done"] == 0 and [r["round"] for r in report["rounds"]] == [0]

    # Resuming the cut round with another start model or other settings is refused
    # before any work, naming what differs.
    watched = [out / "loop_report.json", rounds / "round_000/done.json", rounds / "round_001/round.json"]
    before = _mtimes(watched)
    other_model = tmp_path / "other.pth"
    other_model.write_bytes(tiny_checkpoint.read_bytes())
    other_args = [a if not a.startswith("stage.init_checkpoint=") else f"stage.init_checkpoint={other_model}"
                  for a in args]
    for changed, named in ((other_args, "from_model"),
                           ([*args, "stage.retrain.optim.lr=1e-3"], "stage.retrain.optim.lr"),
                           ([*args, "amg.points_per_side=8"], "amg.points_per_side")):
        with pytest.raises(RuntimeError, match=rf"round 1 .* cut short .*{re.escape(named)}: "):
            run_stage(compose_config(*changed))
    assert _mtimes(watched) == before

    # 2. The same command finishes: round 1 resumes (annotation kept, training goes on
    # from its checkpoint at step 1), then round 2 runs from model 1.
    caplog.clear()
    done = run_stage(compose_config(*args))
    assert done["complete"] and done["rounds_run"] == 2 and done["rounds_skipped"] == 0
    annotated = json.loads((rounds / "round_001/dataset/summary.json").read_text())
    assert annotated["units_committed"] == 0 and annotated["units_skipped"] == annotated["units"] == 2
    assert any("resuming round_001 from" in r.getMessage() for r in caplog.records)
    assert not any("resuming round_002" in r.getMessage() for r in caplog.records)
    history = [json.loads(line) for line in (out / "models/round_001/history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2]

    # The report: one row per round plus round 0, same figures as each model's eval.json.
    report = json.loads((out / "loop_report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2] and report["rounds_done"] == 2
    r1, r2 = report["rounds"][1:]
    assert r1["from_model"] == str(tiny_checkpoint)
    assert r2["from_model"] == r1["model"] == str(out / "models/round_001/model.pth")
    for r in (r1, r2):
        assert r["images_annotated"] == 3 and r["training_steps"] == 2
        assert 0 < r["masks_kept"] <= r["masks_generated"]
        assert r["eval"] == json.loads((Path(r["model"]).parent / "eval.json").read_text())
        assert set(r["seconds"]) == {"fully_auto", "retrain", "eval"}
        assert 0.0 <= r["eval"]["point_miou_1"] <= 1.0
    # Round 2 annotated with model 1: its manifest records model 1's hash.
    import pyarrow.parquet as pq

    import sam_core

    shas = set(pq.read_table(rounds / "round_002/dataset/manifest").column("model_sha256").to_pylist())
    assert shas == {sam_core.checkpoint_sha256(r1["model"])}
    table = (out / "loop_report.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| round")]
    assert [row.split("|")[1].strip() for row in rows] == ["0", "1", "2"]

    # Registered models load strictly in sam_core and in the official package, and differ.
    from tests.sam_reference import official_sam

    states = []
    for version in ("round_001", "round_002"):
        path = out / "models" / version / "model.pth"
        state = torch.load(path, map_location="cpu", weights_only=True)
        official_sam("vit_tiny").load_state_dict(state, strict=True)
        ours = sam_core.sam_model_registry["vit_tiny"](checkpoint=str(path))
        assert torch.equal(ours.state_dict()["mask_decoder.iou_token.weight"], state["mask_decoder.iou_token.weight"])
        states.append(state)
    start = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    key = "mask_decoder.iou_token.weight"
    assert not torch.equal(start[key], states[0][key]) and not torch.equal(states[0][key], states[1][key])

    # 3. Rerun: every round is skipped and nothing is redone or rewritten.
    watched = [rounds / f"round_{n:03d}/done.json" for n in range(3)] + [
        out / "models/round_001/model.pth", out / "models/round_002/model.pth",
        rounds / "round_002/dataset/summary.json",
    ]
    before = _mtimes(watched)
    again = run_stage(compose_config(*args))
    assert again["complete"] and again["rounds_run"] == 0 and again["rounds_skipped"] == 2
    assert _mtimes(watched) == before
    assert json.loads((out / "loop_report.json").read_text())["rounds"] == report["rounds"]


def test_training_batches_skip_images_without_masks():
    """A round whose model kept no mask on an image still trains on the other images."""
    import numpy as np

    from pipeline.training.stream import to_batch
    from pipeline.truth.ground_truth import GroundTruth

    scene = make_scene(3, size=(96, 128))
    empty = GroundTruth("empty", scene.image, np.zeros((0, 96, 128), bool))
    full = GroundTruth("full", scene.image, scene.masks)
    data = {"max_masks_per_image": 2, "max_area_fraction": 0.9, "min_mask_area": 4, "shards_supervise_iou": True}
    assert to_batch([empty], 256, data, np.random.default_rng(0)) is None
    batch = to_batch([empty, full], 256, data, np.random.default_rng(0))
    assert batch.images.shape == (1, 3, 256, 256) and len(batch.masks) == 1 and len(batch.masks[0]) == 2


def test_generated_masks_train_the_iou_head_only_if_configured():
    import numpy as np

    from pipeline.training.stream import to_batch
    from pipeline.truth.ground_truth import GroundTruth

    scene = make_scene(3, size=(96, 128))
    labeled = GroundTruth("labeled", scene.image, scene.masks)
    generated = GroundTruth("generated", scene.image, scene.masks, generated=True)
    data = {"max_masks_per_image": 2, "max_area_fraction": 0.9, "min_mask_area": 4}
    for flag in (True, False):
        batch = to_batch([labeled, generated], 256, {**data, "shards_supervise_iou": flag}, np.random.default_rng(0))
        assert batch.supervise_iou == [True, flag]
